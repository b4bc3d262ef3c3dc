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

import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import dask

from . import __version__
from .errors import BadArgument, BuildError
from .inputs import InputError, PageSource
from .model.registry import ModelNotFound, resolve_factory
from .plan import default_chunk_pages, plan_build
from .progress import Progress
from .store import index as chunk_index
from .store.debris import clean_debris
from .store.grow import grow_store
from .store.location import StoreLocation
from .store.lock import WriterLock, refuse_if_locked, clear_running, deaths_running, running_mark
from .store.template import CODECS, EMBEDDING_DTYPES, StoreConfig, read_config, write_template
from .tasks import run_chunk
from .types import JobSpec, Receipt

MODEL_FACTORY = "pipeline.model.registry:load_model"
WINDOW_PER_THREAD = 2
TASK_RETRIES = 2  # raised exceptions (I/O hiccups); worker deaths are bounded by allowed-failures
#: Worker loss.  Dask's ``distributed.scheduler.allowed-failures`` (default 3) is set to 0 for
#: clusters this process starts (a remote scheduler keeps its own): every worker death reaches the
#: client at once as ``KilledWorker`` and one policy, below, decides.  A worker lost to a preemption
#: or an OOM kill takes its tasks with it: they are submitted afresh (safe: tasks are idempotent).
#: A task whose pages crash every process that runs them (a native-library crash, a page that
#: exhausts memory) would kill workers for ever: once DEATHS_TO_FAIL processes died while really
#: running it, its unfinished pages are marked failed with that reason (``_fail_range``) and the
#: build ends.
ALLOWED_FAILURES = 0
#: Dask blames every task a dying worker held, including tasks queued behind (or overlapping) the
#: one that crashed it.  So after KilledWorker the client counts how many processes died while
#: really running the task's chunk (``running`` marks a dead process leaves in the store): fewer
#: than DEATHS_TO_FAIL and the task is submitted afresh (at most KILLED_RESUBMITS times);
#: otherwise its unfinished pages are failed with the count as the reason.
DEATHS_TO_FAIL = 3  # two can be bad luck: an unrelated worker loss plus sharing a process with a crasher
KILLED_RESUBMITS = 5
#: Tasks sent to a worker per thread.  1.0: a worker holds only the tasks it is running, so a
#: worker death counts against those alone (Dask's default 1.1 rounds up to one queued task
#: more per worker, which would take the blame for a neighbour that crashes its worker).  The
#: client's window already keeps the next tasks ready on the scheduler.
WORKER_SATURATION = 1.0


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

    @property
    def pending(self) -> int:
        return self.n_pages - self.done - self.failed

    @property
    def pages_per_s(self) -> float:
        return self.planned_pages / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 0 if self.failed == 0 and self.pending == 0 else 3


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


def _model_info(resident: str, factory: str, kwargs: dict) -> dict:
    from cluster import get_resident

    model = get_resident(resident, fallback=(factory, kwargs))
    return asdict(model.info)


def build(
    pages: str,
    out: str,
    *,
    image_root: str | None = None,
    cluster: str = "local",
    workers: int | None = None,
    threads_per_worker: int | None = None,
    chunk_pages: int | None = None,
    batch_size: int = 16,
    max_panels: int = 12,
    model: str = "tiny",
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
) -> BuildResult:
    """Build (or resume) the store ``out`` from the page list ``pages``.

    ``cluster`` may also be the address of a scheduler you keep running
    (``tcp://...``/``tls://...``); ``preflight_timeout`` bounds the pre-flight
    checks (workers joined, resources, model loaded, store writable) in seconds.
    """
    _validate(chunk_pages, batch_size, max_panels, workers, threads_per_worker, embedding_dtype, codec, device)
    if checkpoint is not None and "://" not in checkpoint:
        _check_readable(checkpoint)
    _check_cluster_target(cluster)
    try:
        resolve_factory(model)
    except ModelNotFound as exc:
        raise BadArgument(str(exc)) from None
    try:
        source = PageSource(pages, storage_options)
    except InputError as exc:
        raise BadArgument(str(exc)) from None
    loc = StoreLocation.of(out, storage_options)
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
    chunk_pages = chunk_pages or default_chunk_pages(n_pages)

    from cluster import install_event_counters, install_resident, open_cluster

    from .preflight import check_cluster, check_store

    model_kwargs = {"name": model, "max_panels": max_panels, "embedding_dim": embedding_dim,
                    "checkpoint": checkpoint, "seed": seed, **(model_options or {})}
    t_start = time.monotonic()
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
                          "distributed.scheduler.worker-saturation": WORKER_SATURATION}), \
            _QuietClose(open_cluster(cluster, workers=workers, threads_per_worker=threads_per_worker, device=device,
                                     dashboard_address=dashboard_address, security=security,
                                     timeout=preflight_timeout)) as handle:
        dev = _resolve_device(device, handle)
        model_kwargs["device"] = dev
        if handle.dashboard_link:
            _say(f"pagecube: Dask dashboard at {handle.dashboard_link}")
        client = handle.client
        for line in check_cluster(handle, dev, preflight_timeout):
            _say(f"pagecube: warning: {line}")
        try:
            if client is not None:
                resident = install_resident(client, MODEL_FACTORY, model_kwargs)
                resources = {"GPU": 1} if dev == "cuda" else None
                info = client.submit(_model_info, resident, MODEL_FACTORY, model_kwargs, pure=False,
                                     resources=resources).result(timeout=preflight_timeout)
            else:
                resident = "pagecube-model-sync"
                resources = None
                info = _model_info(resident, MODEL_FACTORY, model_kwargs)
        except Exception as exc:
            _model_load_failed(exc, model, checkpoint)
        check_store(handle, loc, preflight_timeout, resources)
        if client is not None:
            install_event_counters(client, "pagecube", METRICS, namespace="pagecube_pages")

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

        with WriterLock(loc, take_over=take_over_lock) as lock:
            if lock.took_over_from:
                _say(f"pagecube: took over the store lock from {lock.took_over_from}")
            clean_debris(loc)
            clear_running(loc)  # marks of an earlier build's dead processes do not count now
            if grow_from:
                grow_store(loc, n_pages, config.input_digest, chunk_pages, grow_from)
                _say(f"pagecube: grew store {loc} from {grow_from} to {n_pages} pages")
            if existing is None:
                write_template(loc, config, {
                    "model_weights_source": info["weights_source"],
                    "pagecube_version": __version__,
                    "inputs": os.fspath(pages),
                    "title": "pagecube embedding store",
                }, codec=codec)
                _say(f"pagecube: created store {loc} for {n_pages} pages "
                     f"({config.n_pages // chunk_pages + bool(n_pages % chunk_pages)} chunks of {chunk_pages})")
            if init_only:
                return BuildResult(str(loc), n_pages, 0, 0, 0, time.monotonic() - t_start, handle.dashboard_link)

            entries = chunk_index.list_entries(loc)
            complete = {c for c, e in entries.items() if not (retry_failed and e.failed)}
            plan = plan_build(n_pages, chunk_pages, complete)
            if plan.complete_chunks:
                _say(f"pagecube: resuming: {plan.complete_chunks} of {plan.n_chunks} chunks already complete")
            job = JobSpec(
                store_url=loc.url, storage_options=loc.storage_options, run_id=lock.info.run_id,
                n_pages=n_pages, chunk_pages=chunk_pages, max_panels=max_panels,
                embedding_dim=config.embedding_dim, embedding_dtype=embedding_dtype,
                model_resident=resident, model_factory=MODEL_FACTORY, model_kwargs=model_kwargs,
                image_root=image_root, batch_size=batch_size, retry_failed=retry_failed, verify=verify,
            )
            already = sum(e.done for c, e in entries.items() if c in complete)
            bar = Progress(plan.pages_planned, already_done=already, enabled=progress)
            t_run = time.monotonic()
            reasons: list[str] = []
            try:
                with _sigterm_as_interrupt(), _build_span(client, job.run_id):
                    receipts = _run(plan, source, job, handle, resources, bar, reasons)
            except KeyboardInterrupt:
                bar.close()
                _say(f"pagecube: interrupted; finished chunks are kept. Resume with the same command "
                     f"(pagecube build {pages} --out {out})")
                raise
            finally:
                bar.close()
            seconds = time.monotonic() - t_run
            clear_running(loc)

    entries = chunk_index.list_entries(loc)
    done = sum(e.done for e in entries.values())
    failed = sum(e.failed for e in entries.values())
    del receipts
    return BuildResult(str(loc), n_pages, done, failed, plan.pages_planned, seconds, handle.dashboard_link, reasons)


class _QuietClose:
    """A cluster that fails to shut down (a worker still restarting after a crash) must not turn a
    finished build into an error: the store is complete by then, so say so and go on."""

    def __init__(self, cm):
        self.cm = cm

    def __enter__(self):
        return self.cm.__enter__()

    def __exit__(self, *exc):
        try:
            return self.cm.__exit__(*exc)
        except Exception as err:
            if exc[0] is not None:
                raise
            _say(f"pagecube: warning: the cluster did not shut down cleanly ({type(err).__name__}); "
                 "the build itself finished")
            return False


#: Counters tasks log under the Dask event topic "pagecube"; served on the scheduler's /metrics as
#: pagecube_pages_done_total and pagecube_pages_failed_total when prometheus_client is installed there.
METRICS = {"done": "Pages written with status done by pagecube builds",
           "failed": "Pages marked failed by pagecube builds"}


def _build_span(client, run_id: str):
    """A Dask span named after the build: its tasks' fine performance metrics (read, inference, write)
    are grouped under it on the dashboard and in the scheduler's spans extension."""
    if client is None:
        import contextlib

        return contextlib.nullcontext()
    import distributed

    return distributed.span(f"pagecube-build-{run_id}")


class _sigterm_as_interrupt:
    """SIGTERM stops a build the same clean way as Ctrl-C."""

    def __enter__(self):
        self._old = None
        try:
            self._old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _take_receipt(receipt: Receipt, bar: Progress, reasons: list[str]) -> None:
    if receipt.skipped:
        bar.update(receipt.done, receipt.failed)
        return
    bar.update(receipt.done, receipt.failed)
    for r in receipt.reasons:
        if len(reasons) < 20:
            reasons.append(f"pages [{receipt.start}, {receipt.stop}): {r}")


def _run(plan, source, job, handle, resources, bar, reasons) -> list[Receipt]:
    receipts: list[Receipt] = []
    client = handle.client
    if client is None:
        for task in plan.tasks:
            d = dask.delayed(run_chunk, pure=False)(task, source.slice(task.start, task.stop), job,
                                                    dask_key_name=f"{task.key}-{job.run_id}")
            try:
                receipt = d.compute(scheduler="sync")
            except Exception as exc:  # as on a cluster: the range's pages fail with the reason, the build goes on
                receipt = _fail_range(job, task, _task_failure(exc, task))
            receipts.append(receipt)
            _take_receipt(receipt, bar, reasons)
        return receipts

    from distributed import as_completed

    threads = max(1, sum(client.nthreads().values()))
    window = max(2, WINDOW_PER_THREAD * threads)
    todo = iter(plan.tasks)

    def submit(task, attempt: int = 0):
        again = f"-again{attempt}" if attempt else ""
        d = dask.delayed(_run_chunk_marked, pure=False)(task, source.slice(task.start, task.stop), job,
                                                        dask_key_name=f"{task.key}-{job.run_id}{again}")
        fut = client.compute(d, retries=TASK_RETRIES, resources=resources)
        fut.pagecube_task = task
        return fut

    # no list of the first futures is kept: a finished future held here keeps its result pinned to
    # its worker, and a worker death would then recompute it
    ac = as_completed([submit(t) for _, t in zip(range(window), todo)])
    killed: dict = {}
    try:
        for fut in ac:
            task = fut.pagecube_task
            try:
                receipt = fut.result()
            except Exception as exc:
                deaths = 0
                if type(exc).__name__ == "KilledWorker":
                    deaths = deaths_running(StoreLocation(job.store_url, job.storage_options), task.chunk)
                    if deaths < DEATHS_TO_FAIL and killed.get(task, 0) < KILLED_RESUBMITS:
                        killed[task] = killed.get(task, 0) + 1
                        _say(f"pagecube: a worker died while holding pages [{task.start}, {task.stop}); "
                             "running them again in a fresh task")
                        ac.add(submit(task, killed[task]))
                        continue
                receipt = _fail_range(job, task, _task_failure(exc, task, deaths))
                try:  # the scheduler's page counters count these failures too
                    client.log_event("pagecube", {"done": 0, "failed": receipt.failed})
                except Exception:  # pragma: no cover - counting never fails a build
                    pass
            receipts.append(receipt)
            _take_receipt(receipt, bar, reasons)
            nxt = next(todo, None)
            if nxt is not None:
                ac.add(submit(nxt))
    except BaseException:
        client.cancel(list(ac.futures))
        raise
    return receipts


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


def _run_chunk_marked(task, source, job):
    """``run_chunk`` inside a running mark, so that a process death while running it can be counted."""
    with running_mark(StoreLocation(job.store_url, job.storage_options), task.chunk):
        return run_chunk(task, source, job)


def _task_failure(exc: BaseException, task, deaths: int = 0) -> str:
    if type(exc).__name__ == "KilledWorker":
        if deaths:
            return (f"worker processes died {deaths} times while running pages [{task.start}, {task.stop}) "
                    "(a page may crash or exhaust the worker); not retried further")
        return (f"workers kept dying while holding pages [{task.start}, {task.stop}) "
                f"({KILLED_RESUBMITS + 1} tries); not retried further")
    return f"task failed: {type(exc).__name__}: {exc}".splitlines()[0]


def _fail_range(job: JobSpec, task, reason: str) -> Receipt:
    """A task that kept failing (or killing workers): its unfinished pages become failed, with the reason."""
    from .store.schema import STATUS_DONE, STATUS_FAILED
    from .store.writer import open_store_group

    loc = StoreLocation(job.store_url, job.storage_options)
    group = open_store_group(loc, job.run_id + "-client")
    status = group["status"][task.start:task.stop]
    todo = status != STATUS_DONE
    error = group["error"][task.start:task.stop]
    error[todo] = reason
    status[todo] = STATUS_FAILED
    group["error"][task.start:task.stop] = error
    group["status"][task.start:task.stop] = status
    done = int((status == STATUS_DONE).sum())
    for offset in range(0, len(task), job.chunk_pages):
        part = status[offset: offset + job.chunk_pages]
        chunk_index.write_entry(loc, chunk_index.ChunkEntry(task.chunk + offset // job.chunk_pages,
                                                            int((part == STATUS_DONE).sum()),
                                                            int((part == STATUS_FAILED).sum())))
    clear_running(loc, task.chunk)
    return Receipt(task.start, task.stop, done, int(todo.sum()), reasons=(reason,))
