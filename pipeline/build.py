"""The client side of a build: init, plan, submit a bounded window, finalise.

Phases, each safe to repeat (bio2zarr style):

1. **init** - read the page list (not the manifests), load the model on the
   workers, then create the template or check that the existing store was made
   with the same model, weights, panel cap, dimension, chunking and inputs.
2. **partition** - list the finished-chunk index and plan only the rest.
3. **run** - keep a few tasks per worker thread in flight, top up as they end.
4. **finalise** - release the lock; report what is left.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import dask

from . import __version__
from .errors import BadArgument, BuildError, BuildStopped
from .faults import WorldStop, advice, bounded, classify
from .inputs import InputError, PageSource, over_network
from .model.protocol import info_dict as _info_of
from .model.registry import BUILTIN, UNTRAINED_NOTICE, ModelNotFound, check_model, default_model, resolve_factory
from .plan import default_chunk_pages, plan_build
from .progress import Progress
from .startup import SPAWN_FLAG, WARM_MODULES, spawn_flag_path, start_workers_early, worker_modules
from .store import index as chunk_index
from .store.debris import clean_debris
from .store.grow import grow_store
from .store.location import StoreLocation
from .store.conditional import supports_conditional_writes
from .store.lock import WriterLock, clear_running, lease_seconds, refuse_if_locked
from .store.stopped import clear_stop, record_stop
from .store.template import CODECS, EMBEDDING_DTYPES, StoreConfig, read_config, write_template
from .submit import ALLOWED_FAILURES, METRICS, WORKER_SATURATION, build_span, run_tasks, say, sigterm_as_interrupt
from .types import JobSpec

MODEL_FACTORY = "pipeline.model.registry:load_model"
#: Pages per batch on a GPU when none is given: the size the H200 figures were measured at
#: (benchmarks/gpu_check.sh); JobSpec's 16 suits CPU workers.
GPU_BATCH_SIZE = 64


@dataclass
class BuildResult:
    store: str
    n_pages: int
    done: int
    failed: int
    planned_pages: int
    seconds: float
    dashboard: str | None = None
    reasons: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # task seconds by phase, summed over this run's tasks

    @property
    def pending(self) -> int:
        return self.n_pages - self.done - self.failed

    @property
    def pages_per_s(self) -> float:
        return self.planned_pages / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 0 if self.failed == 0 and self.pending == 0 else 3


def _validate(chunk_pages, batch_size, max_panels, workers, threads_per_worker, embedding_dtype, codec, device):
    for name, value in (("--chunk-pages", chunk_pages), ("--batch-size", batch_size), ("--max-panels", max_panels),
                        ("--workers", workers), ("--threads-per-worker", threads_per_worker)):
        if value is not None and value <= 0:
            raise BadArgument(f"{name} must be a positive number, got {value}")
    if embedding_dtype not in EMBEDDING_DTYPES:
        raise BadArgument(f"--embedding-dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {embedding_dtype!r}")
    if codec not in CODECS:
        raise BadArgument(f"--codec must be one of {', '.join(CODECS)}, got {codec!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise BadArgument(f"--device must be auto, cpu or cuda, got {device!r}")


def _resolve_device(device: str, handle) -> str:
    if device != "auto":
        return device
    return "cuda" if handle.gpu else "cpu"


def _batch_size(asked: int | None, device: str) -> int:
    """The batch asked for, else one that suits the device: a GPU wants more pages per kernel launch."""
    return asked or (GPU_BATCH_SIZE if device == "cuda" else JobSpec.batch_size)


def _local_threads(handle) -> list[int] | None:
    """Threads of each worker a local cluster started, joined or not yet; None for other clusters."""
    spec = getattr(handle.cluster, "worker_spec", None)
    return [int((s.get("options") or {}).get("nthreads") or 1) for s in spec.values()] if spec else None


def _task_slots(handle, resources: dict | None) -> int:
    """Tasks the cluster runs at once: one per thread, or one per worker where tasks ask for its GPU."""
    if handle.client is None:
        return 1
    threads = _local_threads(handle) or list(handle.client.nthreads().values())
    return max(1, len(threads) if resources else sum(threads))


def _worker_cores(handle) -> int | None:
    """The cores each worker of a local cluster has to itself (its Dask threads are 1, not its cores),
    from which its tasks size their read threads (``tasks._read_threads``); None elsewhere: a task
    asks the worker it runs on."""
    local = _local_threads(handle)
    n_workers = len(local) if local else handle.n_workers
    if handle.kind != "local" or n_workers < 1:
        return None
    from dask.system import CPU_COUNT

    return int(CPU_COUNT) // n_workers


def _model_info(client, resident: str, factory: str, kwargs: dict) -> dict:
    """The model's info, from every worker: they must all have loaded the same weights."""
    from cluster import get_resident, resident_map

    if client is None:
        return _info_of(get_resident(resident, fallback=(factory, kwargs)))
    infos = resident_map(client, resident, _info_of)  # beside busy task threads: needs no free one
    digests = {}
    for worker, info in infos.items():
        digests.setdefault(info["weights_digest"], worker)
    if len(digests) > 1:
        (d1, w1), (d2, w2) = list(digests.items())[:2]
        raise BuildError(f"the workers loaded different model weights: {w1} has {d1[:12]}, {w2} has {d2[:12]} "
                         "(the same --checkpoint path holds different files on different machines)")
    return next(iter(infos.values()))


def build(
    pages: str,
    out: str,
    *,
    image_root: str | None = None,
    cluster: str = "local",
    workers: int | None = None,
    threads_per_worker: int | None = None,
    chunk_pages: int | None = None,
    batch_size: int | None = None,
    max_panels: int = 12,
    model: str | None = None,
    checkpoint: str | None = None,
    embedding_dim: int | None = None,
    model_options: dict | None = None,
    device: str = "auto",
    embedding_dtype: str = "float32",
    codec: str = "zstd",
    overwrite: bool = False,
    init_only: bool = False,
    retry_failed: bool = False,
    verify: bool = False,
    take_over_lock: bool = False,
    storage_options: dict | None = None,
    security=None,
    dashboard_address: str = "127.0.0.1:0",
    progress: bool = True,
    seed: int = 0,
    preflight_timeout: float = 60.0,
    no_workers_timeout: float | None = None,
) -> BuildResult:
    """Build (or resume) the store ``out`` from the page list ``pages``.

    ``cluster`` may also be the address of a scheduler you keep running
    (``tcp://...``/``tls://...``); ``preflight_timeout`` bounds the pre-flight
    checks (workers joined, resources, model loaded, store writable) in seconds.
    ``no_workers_timeout``: once the build runs, how long to wait for a worker while the
    cluster has none that can run the tasks before stopping with the finished chunks kept
    (None: 60 s on a local cluster, 600 s elsewhere; 0: wait for ever).
    ``batch_size=None``: 16 pages on CPU workers, ``GPU_BATCH_SIZE`` on GPUs.
    ``model=None`` resumes a store with its own built-in model, else takes
    ``tiny`` for a ``checkpoint``, ``pretrained`` where it is installed and
    ``tiny`` (untrained) where not.
    """
    _refuse_while_bootstrapping()
    _validate(chunk_pages, batch_size, max_panels, workers, threads_per_worker, embedding_dtype, codec, device)
    if no_workers_timeout is not None and not no_workers_timeout >= 0:
        raise BadArgument(f"--no-workers-timeout must be 0 (wait for ever) or a positive number of seconds, "
                          f"got {no_workers_timeout:g}")
    try:
        lease_seconds()
    except ValueError as exc:
        raise BadArgument(str(exc)) from None
    if checkpoint is not None and "://" not in checkpoint:
        _check_readable(checkpoint)
    _check_cluster_target(cluster)
    defaulted = model is None
    if defaulted:  # a checkpoint is for a trainable model: tiny's
        model = "tiny" if checkpoint is not None else default_model()
    fallback = defaulted and checkpoint is None and model == "tiny"  # pretrained is not installed here
    start_workers_early(cluster, device, model)  # the workers' imports run while this process reads inputs
    try:
        # in process the model is imported here anyway; for workers, a check that does not import torch
        resolve_factory(model) if cluster == "sync" else check_model(model)
    except ModelNotFound as exc:
        raise BadArgument(str(exc)) from None
    try:
        source = PageSource(pages, storage_options)
    except InputError as exc:
        raise BadArgument(str(exc)) from None
    loc = StoreLocation.of(out, storage_options)
    if loc.is_local and os.path.exists(loc.root) and not os.path.isdir(loc.root):
        raise BadArgument(f"--out {out} is an existing file, not a store folder; give a new path "
                          "(--overwrite replaces only stores)")
    _refuse_foreign_folder(loc, out)
    n_pages = len(source)

    refuse_if_locked(loc, take_over_lock)  # before starting a cluster for nothing
    existing = None
    grow_from = 0
    if loc.exists() and not overwrite:
        try:
            existing, _ = read_config(loc)
        except Exception as exc:
            refuse_if_locked(loc, take_over_lock)  # a template being written right now
            raise BadArgument(f"{loc} exists but is not a pagecube store ({exc}); use --overwrite to replace it") from None
        if chunk_pages is not None and chunk_pages != existing.chunk_pages:
            raise BadArgument(f"store {loc} was made with --chunk-pages {existing.chunk_pages}, not {chunk_pages}; "
                              "use --overwrite to start afresh")
        chunk_pages = existing.chunk_pages
        if existing.max_panels != max_panels:
            raise BadArgument(f"store {loc} was made with --max-panels {existing.max_panels}, not {max_panels}; "
                              "use --overwrite to start afresh")
        grow_from = _growth(loc, existing, source)
        if defaulted and existing.model in BUILTIN:
            model = existing.model  # rerunning the same command resumes, whatever is installed now
    if fallback and model == "tiny":
        say(UNTRAINED_NOTICE)

    from cluster import NoWorkers, install_event_counters, install_resident, open_cluster
    from cluster.logs import dask_logs_to_file

    from .preflight import check_cluster, check_pages, check_store

    model_kwargs = {"name": model, "max_panels": max_panels, "embedding_dim": embedding_dim,
                    "checkpoint": checkpoint, "seed": seed, **(model_options or {})}
    t_start = time.monotonic()
    dask_log = (contextlib.nullcontext() if cluster == "sync" else
                dask_logs_to_file("pagecube-dask-", report=lambda line: say(f"pagecube: {line}")))
    with dask_log as dlog, _spawn_flag() as flag, dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
                          "distributed.scheduler.worker-saturation": WORKER_SATURATION}), \
            _QuietClose(open_cluster(cluster, workers=workers, threads_per_worker=threads_per_worker, device=device,
                                     dashboard_address=dashboard_address, security=security,
                                     timeout=preflight_timeout, preload_modules=worker_modules(model),
                                     warm_modules=WARM_MODULES), flag) as handle:
        dev = _resolve_device(device, handle)
        batch_size = _batch_size(batch_size, dev)
        model_kwargs["device"] = dev
        if handle.dashboard_link:
            logs = f" (Dask's own logs: {dlog.path})" if dlog is not None else ""
            say(f"pagecube: Dask dashboard at {handle.dashboard_link}{logs}")
        client = handle.client
        for line in check_cluster(handle, dev, preflight_timeout):
            say(f"pagecube: warning: {line}")
        resources = {"GPU": 1} if dev == "cuda" and client is not None else None
        chunk_pages = chunk_pages or default_chunk_pages(n_pages, _task_slots(handle, resources))
        check_store(handle, loc)  # before the model loads: a store only this machine sees is refused in seconds
        check_pages(handle, source, image_root, max_panels)
        try:
            resident = install_resident(client, MODEL_FACTORY, model_kwargs) if client is not None \
                else "pagecube-model-sync"
            info = _model_info(client, resident, MODEL_FACTORY, model_kwargs)
        except BuildError:
            raise
        except Exception as exc:
            _model_load_failed(exc, model, checkpoint)
        if client is not None:
            install_event_counters(client, "pagecube", METRICS, namespace="pagecube_pages")
            _install_page(client, loc, image_root, handle.dashboard_link)

        config = StoreConfig(
            n_pages=n_pages, chunk_pages=chunk_pages, max_panels=max_panels,
            embedding_dim=int(info["embedding_dim"]), embedding_dtype=embedding_dtype,
            model=info["name"], weights_digest=info["weights_digest"], input_digest=source.digest(),
        )
        if existing is not None:
            # the page list (n_pages, input_digest) was checked by _growth: same list, or appended to
            diffs = config.differences(existing, ignore=("n_pages", "input_digest"))
            if diffs:
                raise BadArgument(f"store {loc} was made with different settings: {'; '.join(diffs)}; "
                                  "use --overwrite to start afresh (or a new --out)")

        if not supports_conditional_writes(loc):
            say(f"pagecube: warning: store {loc} does not support conditional writes (If-None-Match, If-Match): "
                "two builds that start at the same instant are not kept apart")
        with _stops_for_the_world(loc, n_pages), WriterLock(loc, take_over=take_over_lock) as lock:
            if lock.took_over_from:
                say(f"pagecube: took over the store lock from {lock.took_over_from}")
            clear_stop(loc)  # this build holds the store now: an earlier stop is no longer what it is
            clean_debris(loc)
            clear_running(loc)  # marks of an earlier build's dead processes do not count now
            if grow_from:
                grow_store(loc, n_pages, config.input_digest, chunk_pages, grow_from)
                say(f"pagecube: grew store {loc} from {grow_from} to {n_pages} pages")
            if existing is None:
                write_template(loc, config, {
                    "model_weights_source": info["weights_source"],
                    "pagecube_version": __version__,
                    "inputs": os.fspath(pages),
                    "title": "pagecube embedding store",
                }, codec=codec)
                say(f"pagecube: created store {loc} for {n_pages} pages "
                     f"({config.n_pages // chunk_pages + bool(n_pages % chunk_pages)} chunks of {chunk_pages})")
            if init_only:
                return BuildResult(str(loc), n_pages, 0, 0, 0, time.monotonic() - t_start, handle.dashboard_link)

            entries = chunk_index.list_entries(loc)
            complete = {c for c, e in entries.items() if not (retry_failed and e.failed)}
            plan = plan_build(n_pages, chunk_pages, complete)
            if plan.complete_chunks:
                say(f"pagecube: resuming: {plan.complete_chunks} of {plan.n_chunks} chunks already complete")
            job = JobSpec(
                store_url=loc.url, storage_options=loc.storage_options, run_id=lock.info.run_id,
                n_pages=n_pages, chunk_pages=chunk_pages, max_panels=max_panels,
                embedding_dim=config.embedding_dim, embedding_dtype=embedding_dtype,
                model_resident=resident, model_factory=MODEL_FACTORY, model_kwargs=model_kwargs,
                image_root=image_root, batch_size=batch_size, retry_failed=retry_failed, verify=verify,
                worker_cores=_worker_cores(handle),
                pages_over_network=over_network(pages) or over_network(image_root),
            )
            already = sum(e.done for c, e in entries.items() if c in complete)
            bar = Progress(plan.pages_planned, already_done=already, enabled=progress)
            t_run = time.monotonic()
            reasons: list[str] = []
            try:
                with sigterm_as_interrupt(), build_span(client, job.run_id):
                    receipts = run_tasks(plan, source, job, handle, resources, bar, reasons, lease=lock,
                                         no_workers_timeout=no_workers_timeout)
            except KeyboardInterrupt:
                bar.close()
                say(f"pagecube: interrupted; finished chunks are kept. Resume with the same command "
                     f"(pagecube build {pages} --out {out})")
                raise
            except NoWorkers as exc:
                bar.close()
                clear_running(loc)  # the marks of the processes that died: not this build's to count any more
                left = n_pages - sum(e.done + e.failed for e in chunk_index.list_entries(loc).values())
                raise BuildError(f"{exc} (--no-workers-timeout); stopped with {left} of {n_pages} pages "
                                 "unfinished (finished chunks are kept); run the same command again to resume") \
                    from None
            finally:
                bar.close()
            seconds = time.monotonic() - t_run
            clear_running(loc)

    entries = chunk_index.list_entries(loc)
    done = sum(e.done for e in entries.values())
    failed = sum(e.failed for e in entries.values())
    phases: dict[str, float] = {}
    for r in receipts:
        for name, value in r.seconds.items():
            phases[name] = phases.get(name, 0.0) + value
    del receipts
    return BuildResult(str(loc), n_pages, done, failed, plan.pages_planned, seconds, handle.dashboard_link, reasons,
                       phases)


@contextlib.contextmanager
def _stops_for_the_world(loc: StoreLocation, n_pages: int):
    """A fault of the world (a task that gave up, or the store failing the client) stops the build with
    one line and exit code 75 (``BuildStopped``), recorded in the store for ``status`` to show."""
    try:
        yield
    except WorldStop as stop:
        raise _stopped(loc, stop, n_pages) from None
    except BuildError:
        raise
    except Exception as exc:
        fault = classify(exc)
        if fault is None:
            raise
        raise _stopped(loc, WorldStop("store", loc.url, fault.kind, fault.cause), n_pages) from None


def _stopped(loc: StoreLocation, stop: WorldStop, n_pages: int) -> BuildStopped:
    """The stop line (what, where, the pages kept, what to do), recorded in the store where it still takes it."""
    lines = [f"{stop}; the pages done before are kept; {advice(stop.kind)}"]

    def count_and_record() -> None:
        done = sum(e.done for e in chunk_index.list_entries(loc).values())
        lines.append(f"{stop}; {done} of {n_pages} pages are done and kept; {advice(stop.kind)}")
        for step in (lambda: clear_running(loc),  # the marks of tasks that gave up: not deaths to count
                     lambda: record_stop(loc, stop.kind, lines[-1])):
            try:
                step()
            except Exception:  # noqa: BLE001 - a read-only store keeps them; status then shows the lock left
                pass

    if not (stop.where == "store" and stop.kind in ("timeout", "unreachable")):  # else nothing answers there
        try:  # bounded: a store that does not answer must not hold the stop line back
            bounded(count_and_record)
        except Exception:  # noqa: BLE001 - a store that refuses reads: the line says less
            pass
    line = lines[-1]
    return BuildStopped(line, stop.kind)


def _install_page(client, loc: StoreLocation, image_root: str | None, dashboard_link: str | None) -> None:
    """The live pagecube page on the scheduler's dashboard server; a build never fails for it."""
    from .watch import install_page

    try:
        link = install_page(client, loc, image_root, dashboard_link)
    except Exception as exc:  # noqa: BLE001 - e.g. a scheduler that cannot import pagecube's page
        say(f"pagecube: warning: no pagecube page on the dashboard ({type(exc).__name__}: {exc})".splitlines()[0])
        return
    if link:
        say(f"pagecube: pagecube page at {link}")


class _QuietClose:
    """A cluster that fails to shut down (a worker still restarting after a crash) must not turn a
    finished build into an error: the store is complete by then, so say so and go on.  One that fails
    to start because its workers re-ran an unguarded script (they wrote to ``flag``) says so."""

    def __init__(self, cm, flag: str | None = None):
        self.cm, self.flag = cm, flag

    def __enter__(self):
        try:
            return self.cm.__enter__()
        except Exception:
            if self.flag and os.path.isfile(self.flag) and os.path.getsize(self.flag):
                raise BuildError(f"the Dask workers did not start: {BOOTSTRAPPING}") from None
            raise

    def __exit__(self, *exc):
        try:
            return self.cm.__exit__(*exc)
        except Exception as err:
            if exc[0] is not None:
                raise
            say(f"pagecube: warning: the cluster did not shut down cleanly ({type(err).__name__}); "
                 "the build itself finished")
            return False


BOOTSTRAPPING = ("pipeline.build was called while a worker process was starting and re-importing your script: "
                 "put the call under `if __name__ == \"__main__\":`")


def _refuse_while_bootstrapping() -> None:
    """A script without the ``__main__`` guard runs ``build`` again in every worker Dask spawns (the spawn
    start method re-imports the main module); that build would start its own cluster and hang.  In a
    worker of ours, note it for the build that started us and exit quietly: that build says it once."""
    import multiprocessing

    if not getattr(multiprocessing.current_process(), "_inheriting", False):  # what multiprocessing checks
        return
    flag = os.environ.get(SPAWN_FLAG)
    if flag and os.path.isfile(flag):
        with open(flag, "a") as f:
            f.write(f"{os.getpid()}\n")
        raise SystemExit(1)
    raise BuildError(BOOTSTRAPPING)


@contextlib.contextmanager
def _spawn_flag():
    """The flag file of :func:`_refuse_while_bootstrapping`, named to worker processes spawned here."""
    flag = spawn_flag_path()  # the same for every build of this process: a forkserver's workers start with it
    open(flag, "w").close()  # empty: what an earlier build's workers wrote is not this one's
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{SPAWN_FLAG}": flag}):
            yield flag
    finally:
        os.environ.pop(SPAWN_FLAG, None)  # the nanny exported it here; later processes must not see it


def _refuse_foreign_folder(loc: StoreLocation, out) -> None:
    """A new store empties its folder first: never one that holds other files (``--out my-pages`` by mistake)."""
    fs = loc.fs
    if loc.exists() or fs.exists(loc.meta_path()) or not fs.exists(loc.root) or not fs.isdir(loc.root):
        return
    if fs.ls(loc.root, detail=False):
        raise BadArgument(f"--out {out} is a folder that holds other files, not a pagecube store; give a new path "
                          "(pagecube would empty it; --overwrite replaces only stores)")


def _check_cluster_target(cluster) -> None:
    from cluster.targets import VALID_TARGETS

    target = os.fspath(cluster) if isinstance(cluster, (str, os.PathLike)) else None
    if target is None:
        raise BadArgument(f"--cluster must be one of: {VALID_TARGETS}")
    if target in ("local", "sync") or target.startswith(("tcp://", "tls://")):
        return
    if target.endswith((".yaml", ".yml")) or os.path.isfile(target):
        if not os.path.isfile(target):
            raise BadArgument(f"cluster spec not found: {target}")
        return
    raise BadArgument(f"unknown --cluster {target!r}; use one of: {VALID_TARGETS}")


def _check_readable(checkpoint: str) -> None:
    if not os.path.isfile(checkpoint):
        raise BadArgument(f"checkpoint not found: {checkpoint}")
    try:
        with open(checkpoint, "rb") as f:
            head = f.read(1)
    except OSError as exc:
        raise BadArgument(f"cannot read checkpoint {checkpoint}: {exc.strerror or exc}") from None
    if not head:
        raise BadArgument(f"checkpoint {checkpoint} is empty")


def _model_load_failed(exc: BaseException, model: str, checkpoint: str | None):
    """One clear line for a model that did not load on the workers (a refused checkpoint is a bad argument)."""
    msg = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    if type(exc).__name__ == "CheckpointError" or "CheckpointError:" in msg:
        tail = msg.split("CheckpointError:", 1)[-1].strip()
        raise BadArgument(f"--checkpoint refused: {tail}") from None
    raise BuildError(f"model {model!r} could not be loaded: {msg}") from None


def _growth(loc: StoreLocation, existing: StoreConfig, source: PageSource) -> int:
    """Old page count when the store may grow to ``source`` (its list is a prefix of the new one), else 0.

    A list that changed in any other way is refused here with one line.
    """
    n_old, n_new = existing.n_pages, len(source)
    full = source.digest()
    if n_new == n_old:
        if existing.input_digest != full:
            raise BadArgument(f"the page list changed since store {loc} was made (same length, different "
                              "entries); only appending pages at the end is supported: use --overwrite or a new --out")
        return 0
    # the second form: a growth interrupted after the new digest was written but before re-consolidation
    if n_new > n_old and existing.input_digest in (source.digest(n_old), full):
        return n_old
    what = "is shorter than" if n_new < n_old else "does not start with"
    raise BadArgument(f"the page list ({n_new} pages) {what} the {n_old} pages store {loc} was built from; "
                      "only appending pages at the end is supported: use --overwrite or a new --out")
