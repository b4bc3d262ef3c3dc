"""The task: one chunk-aligned page range, read -> infer -> write -> receipt.

Runs on a Dask worker (or in-process for ``--cluster sync``).  The model is
fetched from the worker, never shipped in the graph.  Pages are read and
prepared in a thread pool while earlier batches run through the model.  The
task is safe to run twice: the same pages give the same bytes, and a range
whose pages are all finished is only re-indexed.  Each step keeps its own
module: ``task_read`` (pages read and prepared, faults of the world retried),
``task_infer`` (batches through the model) and ``task_write`` (the region
assembled, then written with ``status`` last).

Overlap between tasks (opt-in, ``PAGECUBE_OVERLAP_TASKS=1`` on the workers):
once every page of a task is read and prepared, the task secedes from the
worker's thread pool, so the worker starts the next task (its reads, then its
batches) while this one runs its last batch and writes its region.  The model
runs one batch at a time per worker (a lock), so the overlap never
oversubscribes it; the receipt still comes back only after the region and
``status`` are stored.  Off by default: worker-death attribution (running
marks) assumes one chunk running per worker at a time.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from .faults import Budget, WorldStop, retrying
from .inputs import SliceSpec
from .store.schema import region_counts
from .task_infer import Batches
from .task_phases import meter, phase
from .task_read import PageReader
from .task_write import Region, is_finished, reindex, write
from .types import ChunkTask, JobSpec, Receipt

logger = logging.getLogger("pagecube.tasks")


def run_chunk(task: ChunkTask, source: SliceSpec, job: JobSpec) -> Receipt:
    """The task; a fault of the world it cannot ride out (``pipeline.faults``) ends it without writing
    ``status`` for its pages, and its receipt says why (``Receipt.stopped``) so the build stops."""
    try:
        return _run_chunk(task, source, job, Budget())
    except WorldStop as stop:
        logger.info("pagecube: pages [%d, %d) left as they were: %s", task.start, task.stop, stop)
        return Receipt(task.start, task.stop, 0, 0, worker=_worker_name(),
                       stopped=(stop.where, stop.location, stop.kind, stop.cause))


def _run_chunk(task: ChunkTask, source: SliceSpec, job: JobSpec, budget: Budget) -> Receipt:
    """Read -> infer -> write, each store access retried within ``budget``; a finished range is only
    re-indexed, and a range another task finished meanwhile is left as that task wrote it."""
    store = job.store

    def in_store(fn):
        return retrying(fn, budget, "store", store.url)

    writer = in_store(lambda: store.writer(job.run_id))
    before = in_store(lambda: writer.read("status", task.start, task.stop))
    if is_finished(before, job.retry_failed):
        in_store(lambda: reindex(store, job, task, before))
        return _skipped(task, before)

    model = _get_model(job)
    refs = retrying(source.refs, budget, "pages", source.url or "the page list")
    if len(refs) != len(task):
        raise RuntimeError(f"page list changed: expected {len(task)} pages for [{task.start}, {task.stop}), "
                           f"found {len(refs)}")
    region = Region.empty(task, job, before)
    if region.keep.any():
        in_store(lambda: region.keep_done(writer))
    region.arrays["manifest_path"][:] = [ref.label for ref in refs]

    seconds: dict[str, float] = {}
    _read_and_infer(region, refs, model, job, budget, seconds)
    region.stamp()
    with phase(seconds, "write"):
        finished_elsewhere = in_store(lambda: write(writer, region, task, job, seconds))
    if finished_elsewhere is not None:
        return _skipped(task, finished_elsewhere)

    done, failed = region.counts()
    device = getattr(model, "device", "")
    _log_counts(done - int(region.keep.sum()), failed, device)
    return Receipt(task.start, task.stop, done, failed, seconds=seconds, worker=_worker_name(),
                   device=device, reasons=tuple(region.reasons))


def _read_and_infer(region: Region, refs: list, model, job: JobSpec, budget: Budget, seconds: dict) -> None:
    """The pages not kept: read and prepared in the thread pool, run through the model a batch at a time
    as they come.  Dask meter "read": this block less the "inference" metered inside it."""
    batches = Batches(model, region, job.batch_size, seconds)
    reader = PageReader(refs, model, job, region, budget, _read_threads(job))
    with meter("read"):
        t_read = time.perf_counter()
        for item in reader.pages(np.flatnonzero(~region.keep)):
            batches.add(item)
        _let_next_task_start()  # every page is read: the worker may start the next task's reads now
        batches.flush()
        seconds["read"] = time.perf_counter() - t_read - seconds.get("inference", 0.0)


def _skipped(task: ChunkTask, status: np.ndarray) -> Receipt:
    """The receipt of a range this task left as it found it (finished before, or by another task)."""
    done, failed = region_counts(status)
    return Receipt(task.start, task.stop, done, failed, skipped=True, worker=_worker_name())


def _let_next_task_start() -> bool:
    """Leave the worker's thread pool (Dask ``secede``) so the next task can start; False off-worker
    or when the overlap is not asked for."""
    if os.environ.get("PAGECUBE_OVERLAP_TASKS", "") not in ("1", "true", "yes"):
        return False
    try:
        from distributed import get_worker, secede

        get_worker()
    except Exception:
        return False
    try:
        secede()
    except Exception:  # pragma: no cover - not in a worker thread after all
        return False
    return True


def _read_threads(job: JobSpec) -> int:
    """Threads that read and prepare this task's pages (``cluster.placement.read_threads``), from the
    cores of this worker: its share of the machine on a local cluster (sent by the build); else its
    Dask threads (``dask worker --nthreads``, dask-jobqueue's cores / processes), or this machine's
    cores off a worker (``--cluster sync``)."""
    from cluster.placement import read_threads

    cores = job.worker_cores
    if not cores:
        try:
            from distributed import get_worker

            cores = get_worker().state.nthreads
        except Exception:
            from dask.system import CPU_COUNT

            cores = CPU_COUNT
    gpu = str(job.model_kwargs.get("device", "")).startswith("cuda")
    return read_threads(cores, gpu=gpu, remote_pages=job.pages_over_network)


def _log_counts(done: int, failed: int, device: str = "") -> None:
    """Pages this task finished, as a Dask event (topic "pagecube") for the scheduler's counters
    and the pagecube page's worker rows (pages/s, device)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except Exception:
        return  # sync target: no scheduler to count
    try:
        worker.log_event("pagecube", {"done": int(done), "failed": int(failed), "device": str(device)})
    except Exception:  # pragma: no cover - counting must never fail a task
        pass


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except Exception:
        return f"pid-{os.getpid()}"


def _get_model(job: JobSpec):
    from cluster import get_resident

    return get_resident(job.model_resident, fallback=(job.model_factory, job.model_kwargs))
