"""The cluster a build runs on, and the model loaded on its workers.

``open_workers`` starts (or joins) the cluster and checks its workers; ``load_model`` loads the model
on every worker and checks that they all loaded the same weights.  A script that calls ``build``
without the ``__main__`` guard is told so once (``refuse_while_bootstrapping``), not left hanging.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import dask

from .errors import BadArgument, BuildError
from .model.protocol import info_dict as _info_of
from .options import BuildOptions
from .startup import SPAWN_FLAG, WARM_MODULES, spawn_flag_path, worker_modules
from .submit import ALLOWED_FAILURES, WORKER_SATURATION, say

MODEL_FACTORY = "pipeline.model.registry:load_model"
BOOTSTRAPPING = ("pipeline.build was called while a worker process was starting and re-importing your script: "
                 "put the call under `if __name__ == \"__main__\":`")


@dataclass(frozen=True)
class Workers:
    """An open cluster whose workers passed the pre-flight checks."""

    handle: Any  # cluster.ClusterHandle
    device: str  # cpu or cuda: "auto" resolved against the cluster
    resources: dict | None  # what each task asks of its worker: a GPU on GPU clusters
    task_slots: int  # tasks the cluster runs at once

    @property
    def client(self):
        return self.handle.client

    @property
    def dashboard_link(self) -> str | None:
        return self.handle.dashboard_link


@dataclass(frozen=True)
class LoadedModel:
    """The model resident on every worker: its name there, its factory's arguments, and its info."""

    resident: str
    kwargs: dict
    info: dict


@contextlib.contextmanager
def open_workers(opts: BuildOptions, model: str) -> Iterator[Workers]:
    """The cluster ``opts.cluster`` with its workers joined and checked; closed on exit."""
    # distributed's defaults must be in dask's config before the ``distributed.*`` settings below are set:
    # imported inside them (a sync build imports it late), its whole section left with them on exit,
    # and a later ``xr.open_zarr(...).load()`` in this process failed with KeyError: 'distributed'
    import distributed  # noqa: F401
    from cluster import open_cluster
    from cluster.logs import dask_logs_to_file

    from .preflight import check_cluster

    dask_log = (contextlib.nullcontext() if opts.cluster == "sync" else
                dask_logs_to_file("pagecube-dask-", report=lambda line: say(f"pagecube: {line}")))
    settings = {"distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
                "distributed.scheduler.worker-saturation": WORKER_SATURATION}
    cluster = open_cluster(opts.cluster, workers=opts.workers, threads_per_worker=opts.threads_per_worker,
                           device=opts.device, dashboard_address=opts.dashboard_address, security=opts.security,
                           timeout=opts.preflight_timeout, preload_modules=worker_modules(model),
                           warm_modules=WARM_MODULES)
    with dask_log as dlog, _spawn_flag() as flag, dask.config.set(settings), _QuietClose(cluster, flag) as handle:
        device = opts.device if opts.device != "auto" else ("cuda" if handle.gpu else "cpu")
        if handle.dashboard_link:
            logs = f" (Dask's own logs: {dlog.path})" if dlog is not None else ""
            say(f"pagecube: Dask dashboard at {handle.dashboard_link}{logs}")
        for line in check_cluster(handle, device, opts.preflight_timeout):
            say(f"pagecube: warning: {line}")
        resources = {"GPU": 1} if device == "cuda" and handle.client is not None else None
        yield Workers(handle, device, resources, _task_slots(handle, resources))


def local_threads(handle) -> list[int] | None:
    """Threads of each worker a local cluster started, joined or not yet; None for other clusters."""
    spec = getattr(handle.cluster, "worker_spec", None)
    return [int((s.get("options") or {}).get("nthreads") or 1) for s in spec.values()] if spec else None


def _task_slots(handle, resources: dict | None) -> int:
    """Tasks the cluster runs at once: one per thread, or one per worker where tasks ask for its GPU."""
    if handle.client is None:
        return 1
    threads = local_threads(handle) or list(handle.client.nthreads().values())
    return max(1, len(threads) if resources else sum(threads))


def load_model(workers: Workers, model: str, opts: BuildOptions) -> LoadedModel:
    """``model`` loaded on every worker (here, on ``--cluster sync``), with the same weights everywhere."""
    from cluster import install_resident

    client = workers.client
    kwargs = {"name": model, "max_panels": opts.max_panels, "embedding_dim": opts.embedding_dim,
              "checkpoint": opts.checkpoint, "seed": opts.seed, **(opts.model_options or {}),
              "device": workers.device}
    try:
        resident = install_resident(client, MODEL_FACTORY, kwargs) if client is not None else "pagecube-model-sync"
        return LoadedModel(resident, kwargs, _model_info(client, resident, MODEL_FACTORY, kwargs))
    except BuildError:
        raise
    except Exception as exc:
        _model_load_failed(exc, model, opts.checkpoint)


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


def _model_load_failed(exc: BaseException, model: str, checkpoint: str | None):
    """One clear line for a model that did not load on the workers (a refused checkpoint is a bad argument)."""
    msg = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    if type(exc).__name__ == "CheckpointError" or "CheckpointError:" in msg:
        tail = msg.split("CheckpointError:", 1)[-1].strip()
        raise BadArgument(f"--checkpoint refused: {tail}") from None
    raise BuildError(f"model {model!r} could not be loaded: {msg}") from None


def show_on_dashboard(workers: Workers, store, image_root: str | None) -> None:
    """Page counters on the scheduler, and the live pagecube page on its dashboard (never fails the build)."""
    from cluster import install_event_counters

    from .submit import METRICS
    from .watch import install_page

    client = workers.client
    if client is None:
        return
    install_event_counters(client, "pagecube", METRICS, namespace="pagecube_pages")
    try:
        link = install_page(client, store, image_root, workers.dashboard_link)
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


def refuse_while_bootstrapping() -> None:
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
    """The flag file of :func:`refuse_while_bootstrapping`, named to worker processes spawned here."""
    flag = spawn_flag_path()  # the same for every build of this process: a forkserver's workers start with it
    open(flag, "w").close()  # empty: what an earlier build's workers wrote is not this one's
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{SPAWN_FLAG}": flag}):
            yield flag
    finally:
        os.environ.pop(SPAWN_FLAG, None)  # the nanny exported it here; later processes must not see it
