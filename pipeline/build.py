"""The client side of a build: init, plan, run a bounded window of tasks, finalise.

Phases, each safe to repeat (bio2zarr style):

1. **init** - read the page list (not the manifests) and check it against the store, start the
   workers and load the model on them, then create the template or check that the existing store
   was made with the same model, weights, panel cap, dimension, chunking and inputs; take the lock
   (``pipeline.init``, ``pipeline.workers``).
2. **plan** - list the finished-chunk index and plan only the rest (``pipeline.plan``).
3. **run** - keep a few tasks per worker thread in flight, top up as they end (``pipeline.submit``).
4. **finalise** - release the lock; report what is left.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .errors import BuildError
from .init import Inputs, Ready, get_ready, read_inputs, take_store
from .inputs import over_network
from .options import BuildOptions
from .plan import plan_build
from .progress import Progress
from .stopping import page_shows_the_end, stops_for_the_world
from .store.store import Store
from .submit import build_span, run_tasks, say, sigterm_as_interrupt
from .types import BuildPlan, JobSpec
from .workers import MODEL_FACTORY, Workers, local_threads, open_workers, refuse_while_bootstrapping

if TYPE_CHECKING:
    from .store.lock import WriterLock

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


@dataclass(frozen=True)
class RunOutcome:
    """What the run phase leaves for the result: each task's receipt, the failures' reasons, its seconds."""

    receipts: list
    reasons: list[str]
    seconds: float


def build(pages: str, out: str, options: BuildOptions | None = None, **fields) -> BuildResult:
    """Build (or resume) the store ``out`` from the page list ``pages``.

    The options, their defaults and what each does: :class:`pipeline.BuildOptions`, given whole
    as ``options`` or one by one as keywords (``build(pages, out, workers=2)``; keywords win).
    """
    refuse_while_bootstrapping()
    unknown = sorted(set(fields) - BuildOptions.names())
    if unknown:  # as Python says it for a function's own keywords
        raise TypeError(f"build() got an unexpected keyword argument {unknown[0]!r}")
    opts = replace(options if options is not None else BuildOptions(), **fields)
    opts.validate()
    inputs = read_inputs(pages, out, opts)
    store, n_pages = inputs.store, inputs.n_pages
    t_start = time.monotonic()
    with open_workers(opts, inputs.model) as workers:
        ready = get_ready(inputs, workers, opts)
        with page_shows_the_end(workers.client, store), stops_for_the_world(store, n_pages), \
                store.lock(take_over=opts.take_over_lock) as lock:
            take_store(inputs, ready, lock, opts.codec)
            if opts.init_only:
                return BuildResult(str(store), n_pages, 0, 0, 0, time.monotonic() - t_start, workers.dashboard_link)
            plan, already = _plan(store, n_pages, ready.chunk_pages, opts.retry_failed)
            job = _job(inputs, workers, ready, lock.info.run_id, opts)
            outcome = _run(plan, inputs, job, workers, lock, already, opts)
    return _finalise(store, n_pages, plan, outcome, workers.dashboard_link)


def _plan(store: Store, n_pages: int, chunk_pages: int, retry_failed: bool) -> tuple[BuildPlan, int]:
    """The chunks still to do, and the pages already done in the chunks it skips (the progress bar starts there)."""
    entries = store.chunks()
    complete = {c for c, e in entries.items() if not (retry_failed and e.failed)}
    plan = plan_build(n_pages, chunk_pages, complete)
    if plan.complete_chunks:
        say(f"pagecube: resuming: {plan.complete_chunks} of {plan.n_chunks} chunks already complete")
    return plan, sum(e.done for c, e in entries.items() if c in complete)


def _job(inputs: Inputs, workers: Workers, ready: Ready, run_id: str, opts: BuildOptions) -> JobSpec:
    """What every task of this run is told: the store, the model on its worker, how to read and write."""
    store = inputs.store
    return JobSpec(
        store_url=store.url, storage_options=store.storage_options, run_id=run_id,
        n_pages=inputs.n_pages, chunk_pages=ready.chunk_pages, max_panels=opts.max_panels,
        embedding_dim=ready.config.embedding_dim, embedding_dtype=opts.embedding_dtype,
        model_resident=ready.model.resident, model_factory=MODEL_FACTORY, model_kwargs=ready.model.kwargs,
        image_root=opts.image_root, batch_size=_batch_size(opts.batch_size, workers.device),
        retry_failed=opts.retry_failed, verify=opts.verify, worker_cores=_worker_cores(workers.handle),
        pages_over_network=over_network(inputs.pages) or over_network(opts.image_root),
    )


def _batch_size(asked: int | None, device: str) -> int:
    """The batch asked for, else one that suits the device: a GPU wants more pages per kernel launch."""
    return asked or (GPU_BATCH_SIZE if device == "cuda" else JobSpec.batch_size)


def _worker_cores(handle) -> int | None:
    """The cores each worker of a local cluster has to itself (its Dask threads are 1, not its cores),
    from which its tasks size their read threads (``tasks._read_threads``); None elsewhere: a task
    asks the worker it runs on."""
    local = local_threads(handle)
    n_workers = len(local) if local else handle.n_workers
    if handle.kind != "local" or n_workers < 1:
        return None
    from dask.system import CPU_COUNT

    return int(CPU_COUNT) // n_workers


def _run(plan: BuildPlan, inputs: Inputs, job: JobSpec, workers: Workers, lock: WriterLock, already: int,
         opts: BuildOptions) -> RunOutcome:
    """The bounded window of tasks, with one line for a Ctrl-C or a cluster left without workers."""
    from cluster import NoWorkers

    store, n_pages = inputs.store, inputs.n_pages
    bar = Progress(plan.pages_planned, already_done=already, enabled=opts.progress)
    t_run = time.monotonic()
    reasons: list[str] = []
    try:
        with sigterm_as_interrupt(), build_span(workers.client, job.run_id):
            receipts = run_tasks(plan, inputs.source, job, workers.handle, workers.resources, bar, reasons,
                                 lease=lock, no_workers_timeout=opts.no_workers_timeout)
    except KeyboardInterrupt as stop:
        bar.close()
        say(f"pagecube: interrupted; finished chunks are kept. Resume with the same command "
            f"(pagecube build {inputs.pages} --out {inputs.out})")
        stop.said = True  # the command line says no more
        raise
    except NoWorkers as exc:
        bar.close()
        store.clear_running()  # the marks of the processes that died: not this build's to count any more
        left = n_pages - sum(store.counts())
        raise BuildError(f"{exc} (--no-workers-timeout); stopped with {left} of {n_pages} pages "
                         "unfinished (finished chunks are kept); run the same command again to resume") from None
    finally:
        bar.close()
    seconds = time.monotonic() - t_run
    store.clear_running()
    return RunOutcome(receipts, reasons, seconds)


def _finalise(store: Store, n_pages: int, plan: BuildPlan, outcome: RunOutcome, dashboard: str | None) -> BuildResult:
    """The store's counts after the run, and where this run's task time went."""
    done, failed = store.counts()
    phases: dict[str, float] = {}
    for r in outcome.receipts:
        for name, value in r.seconds.items():
            phases[name] = phases.get(name, 0.0) + value
    return BuildResult(str(store), n_pages, done, failed, plan.pages_planned, outcome.seconds, dashboard,
                       outcome.reasons, phases)
