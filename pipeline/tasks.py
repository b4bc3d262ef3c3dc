"""The task: one chunk-aligned page range, read -> model -> region write -> receipt.

Runs on a Dask worker (or in-process for ``--cluster sync``).  The model is
fetched from the worker, never shipped in the graph.  Pages are read and
prepared in a thread pool while earlier batches run through the model.  The
task is safe to run twice: the same pages give the same bytes, and a range
whose pages are all finished is only re-indexed.

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

import datetime as _dt
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from .faults import Budget, Fault, WorldStop, classify, describe, retrying
from .inputs import SliceSpec, parent
from .manifest import PageError, read_page
from .store.index import ChunkEntry, write_entry
from .store.location import StoreLocation, fs_options
from .store.lock import fence
from .store.schema import MODEL_VARS, STATUS_DONE, STATUS_FAILED, empty_region, region_counts
from .store.writer import open_store_group, read_region, verify_region, write_region
from .types import ChunkTask, JobSpec, Receipt

logger = logging.getLogger("pagecube.tasks")
_io_pools: dict[int, ThreadPoolExecutor] = {}  # by thread count: builds on a long-lived worker may differ
MAX_REASONS = 5
_model_lock = threading.Lock()  # one batch at a time through the resident model
_batch_cap: int | None = None  # pages per forward after a CUDA out-of-memory back-off


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except Exception:  # pragma: no cover - torch missing or without cuda module
        pass
    return "out of memory" in str(exc).lower() and "cuda" in str(exc).lower()


def _free_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass


def _forward(model, prepared: list) -> dict[str, np.ndarray]:
    """Collate + forward ``prepared`` pages; on CUDA out-of-memory halve the batch and carry on.

    The halved size is kept for the rest of the worker's life (a batch that ran
    out of memory once will again).  A single page that still runs out of
    memory raises, and the caller marks it failed.
    """
    global _batch_cap
    parts: list[dict[str, np.ndarray]] = []
    i = 0
    while i < len(prepared):
        n = min(_batch_cap or len(prepared), len(prepared) - i)
        try:
            batch = model.collate(prepared[i:i + n])  # outside the lock: overlaps another task's forward
            with _model_lock:
                parts.append(model.forward(batch))
        except Exception as exc:
            if n > 1 and _is_oom(exc):
                _batch_cap = max(1, n // 2)
                _free_cuda_cache()
                continue
            raise
        i += n
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}


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


def _pool(threads: int) -> ThreadPoolExecutor:
    pool = _io_pools.get(threads)
    if pool is None:
        pool = _io_pools.setdefault(threads, ThreadPoolExecutor(threads, thread_name_prefix="pagecube-read"))
    return pool


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


@contextmanager
def _phase(seconds: dict, name: str):
    """Time a phase for the receipt and for Dask's fine performance metrics."""
    try:
        from distributed.metrics import context_meter

        meter = context_meter.meter(name)
    except Exception:  # pragma: no cover - distributed missing
        meter = None
    t0 = time.perf_counter()
    if meter is None:
        yield
    else:
        with meter:
            yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0


def _meter(name: str):
    """Dask's fine performance metric ``name`` for the enclosed block (nothing off a worker)."""
    try:
        from distributed.metrics import context_meter

        return context_meter.meter(name)
    except Exception:  # pragma: no cover - distributed missing
        from contextlib import nullcontext

        return nullcontext()


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


def _chunk_entries(status: np.ndarray, task: ChunkTask, chunk_pages: int) -> list[tuple[int, int, int, int]]:
    """(chunk, done, failed, length) for each chunk of the task's range."""
    out = []
    for offset in range(0, len(task), chunk_pages):
        part = status[offset: offset + chunk_pages]
        done, failed = region_counts(part)
        out.append((task.chunk + offset // chunk_pages, done, failed, len(part)))
    return out


def _index(loc: StoreLocation, before: np.ndarray, after: np.ndarray, task: ChunkTask, chunk_pages: int) -> None:
    for (chunk, d0, f0, n), (_, d1, f1, _) in zip(_chunk_entries(before, task, chunk_pages),
                                                    _chunk_entries(after, task, chunk_pages)):
        if d1 + f1 == n:
            previous = ChunkEntry(chunk, d0, f0) if d0 + f0 == n else None
            write_entry(loc, ChunkEntry(chunk, d1, f1), previous)


def _fill_meta(region: dict, i: int, page) -> None:
    """Page identity from the manifest: written for done pages and for pages the model failed on."""
    region["page_id"][i] = page.page_id
    for key in ("source", "series", "volume", "issue"):
        region[key][i] = page.meta[key]
    region["page_num"][i] = page.meta["page_num"]
    region["n_panels"][i] = min(page.n_panels, np.iinfo(np.int16).max)


def _fill_page(region: dict, i: int, page) -> None:
    k = page.n_kept
    _fill_meta(region, i, page)
    region["panel_coordinates"][i, :k] = page.boxes
    region["text_content"][i, :k] = page.texts
    region["panel_mask"][i, :k] = True


def _keep_done(group, region: dict, keep: np.ndarray, start: int, stop: int) -> None:
    """Copy the stored rows of pages already done into ``region``, so rewriting the chunk keeps them
    unchanged (data and ``written_at``) while the chunk's other pages are (re)computed."""
    for name, arr in region.items():
        stored = group[name][start:stop]
        arr[keep] = stored[keep]


def _stored_outputs(outs: dict, region: dict, n: int) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """The model's outputs cast to the store's dtypes, and why pages of the batch cannot be stored, by
    position (a page is never done with NaN, inf, values its dtype cannot hold, or wrong shapes).

    One cast and one finiteness pass per variable, on whole batch arrays: the cast is what the region
    stores anyway, and a float that overflows its store dtype becomes inf in it; a row's own values
    say which of the two it was, for the few rows that fail.
    """
    stored: dict[str, np.ndarray] = {}
    bad: dict[int, str] = {}
    for name in MODEL_VARS:
        if name not in outs:
            return {}, {j: f"model returned no {name!r}" for j in range(n)}
        value = np.asarray(outs[name])
        target = region[name]
        if value.shape[1:] != target.shape[1:] or value.shape[:1] != (n,):
            shape = value.shape[1:] if value.shape[:1] == (n,) else value.shape
            return {}, {j: f"model returned {name} of shape {shape}, expected {target.shape[1:]}" for j in range(n)}
        flat = value.reshape(n, -1)
        with np.errstate(over="ignore", invalid="ignore"):  # what overflows or is not finite is reported below
            out = flat.astype(target.dtype, copy=False)
        if target.dtype.kind == "f":
            for j in np.flatnonzero(~np.isfinite(out).all(axis=1)):
                finite = value.dtype.kind != "f" or bool(np.isfinite(flat[j]).all())
                bad.setdefault(int(j), f"{name} overflows the store's {target.dtype} (use --embedding-dtype float32)"
                               if finite else f"model returned non-finite {name}")
        elif value.dtype.kind == "f":
            for j in np.flatnonzero(~np.isfinite(flat).all(axis=1)):
                bad.setdefault(int(j), f"model returned non-finite {name}")
        stored[name] = out.reshape(value.shape)
    return stored, bad


def run_chunk(task: ChunkTask, source: SliceSpec, job: JobSpec) -> Receipt:
    """The task; a fault of the world it cannot ride out (``pipeline.faults``) ends it without writing
    ``status`` for its pages, and its receipt says why (``Receipt.stopped``) so the build stops."""
    try:
        return _run_chunk(task, source, job, Budget())
    except WorldStop as stop:
        logger.info("pagecube: pages [%d, %d) left as they were: %s", task.start, task.stop, stop)
        return Receipt(task.start, task.stop, 0, 0, worker=_worker_name(),
                       stopped=(stop.where, stop.location, stop.kind, stop.cause))


_NOT_FOUND = re.compile(r"^(?:image|manifest) not found: (.+)$")


def _failed_path(exc: BaseException, ref) -> str:
    """The file whose read met the world: the image's path when ``read_image_bytes`` was reading it (from
    its frame: errors such as botocore's name only an endpoint URL), else the manifest's."""
    tb = exc.__traceback__
    path = None
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("read_image_bytes", "load_image"):
            path = tb.tb_frame.f_locals.get("path")
        tb = tb.tb_next
    return str(path) if path else (ref.path or ref.label)


def _location_gone(folder: str, storage_options: dict, whole_task: bool) -> bool:
    """Whether ``folder`` is gone (or cannot be asked): then its pages that are "not found" met a fault
    of the world (a bucket or a mount taken away), not pages that are missing.

    A URL's bucket that is gone always is; the folder itself only when every page of the task is
    missing, or when this task read other pages from it before (``whole_task``): a folder that only
    some pages' typos name is not a location that went away.  A single
    missing image in a location that is there stays a page fault.
    """
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(folder, **fs_options(folder, storage_options))
        if "://" in folder and not fs.exists(path.split("/", 1)[0]):
            return True
        return whole_task and not fs.exists(path)
    except Exception as exc:  # noqa: BLE001 - asking failed: gone only if the asking met the world
        return classify(exc) is not None


def _run_chunk(task: ChunkTask, source: SliceSpec, job: JobSpec, budget: Budget) -> Receipt:
    seconds: dict[str, float] = {}
    loc = StoreLocation(job.store_url, job.storage_options)

    def store(fn):
        return retrying(fn, budget, "store", loc.url)

    group = store(lambda: open_store_group(loc, job.run_id))
    start, stop = task.start, task.stop
    before = store(lambda: read_region(group, "status", start, stop))
    done0, failed0 = region_counts(before)
    if done0 + failed0 == len(task) and not (job.retry_failed and failed0):
        def reindex():
            fence(loc, job.run_id)  # even an index entry is written only while this build holds the store
            _index(loc, before, before, task, job.chunk_pages)
        store(reindex)
        return Receipt(start, stop, done0, failed0, skipped=True, worker=_worker_name())

    model = _get_model(job)
    refs = retrying(source.refs, budget, "pages", source.url or "the page list")
    if len(refs) != len(task):
        raise RuntimeError(f"page list changed: expected {len(task)} pages for [{start}, {stop}), found {len(refs)}")

    region = empty_region(len(task), job.max_panels, job.embedding_dim, job.embedding_dtype)
    keep = before == STATUS_DONE  # finished earlier (grown store, --retry-failed): kept byte for byte
    if keep.any():
        store(lambda: _keep_done(group, region, keep, start, stop))
    region["manifest_path"][:] = [r.label for r in refs]
    reasons: list[str] = []
    side = getattr(model, "panel_side", None)  # decode pages just large enough for the model's crops

    def fail(i: int, reason: str) -> None:
        region["status"][i] = STATUS_FAILED
        region["error"][i] = reason
        if len(reasons) < MAX_REASONS:
            reasons.append(reason)

    def load(ref):
        """(page, prepared, reason, fault): ``fault`` is (Fault, location) when the read met the world."""
        try:
            page = read_page(ref, max_panels=job.max_panels, image_root=job.image_root,
                             storage_options=job.storage_options, panel_side=side)
            prepared = model.prepare(page)
            page.image = None  # the decoded page is not needed past prepare: free it now
            return page, prepared, None, None
        except Exception as exc:  # a bad page must never fail its chunk
            reason = str(exc) if isinstance(exc, PageError) else f"{type(exc).__name__}: {exc}"
            fault = classify(exc)
            if fault is None:
                return None, None, reason, None
            return None, None, reason, (fault, parent(_failed_path(exc, ref)))

    def run_batch(items: list[tuple[int, object, object]]) -> None:
        with _phase(seconds, "inference"):
            try:
                outs = _forward(model, [p for _, _, p in items])
            except Exception:
                if len(items) == 1:
                    i, page, _ = items[0]
                    import traceback

                    _fill_meta(region, i, page)
                    fail(i, "model failed on this page: " + traceback.format_exc(limit=1).strip().splitlines()[-1])
                    return
                for item in items:  # isolate the page that breaks the batch
                    run_batch([item])
                return
        stored, problems = _stored_outputs(outs, region, len(items))
        good = [j for j in range(len(items)) if j not in problems]
        for j, (i, page, _) in enumerate(items):
            if j in problems:
                _fill_meta(region, i, page)
                fail(i, problems[j])
            else:
                _fill_page(region, i, page)
        if not good:
            return
        rows = [items[j][0] for j in good]
        if len(good) == len(items) and rows[-1] - rows[0] == len(rows) - 1:
            rows, good = slice(rows[0], rows[-1] + 1), slice(None)  # the usual batch: consecutive pages, all good
        for name in MODEL_VARS:
            region[name][rows] = stored[name][good]
        region["status"][rows] = STATUS_DONE

    pending: list[tuple[int, object, object]] = []
    world: dict[int, tuple] = {}  # page -> (Fault, location): reads that met the world, retried below
    why: dict[int, str] = {}  # page -> the reason of its last read, for a refused one that becomes the page's
    missing: dict[int, str] = {}  # page -> "not found" reason: page faults, unless their location is gone
    read_from: set[str] = set()  # image folders this task has read pages from (they existed then)
    n_read = 0

    def take(i: int, page, prepared, reason, fault) -> None:
        nonlocal pending, n_read
        if fault is not None:
            world[i], why[i] = fault, reason
            return
        world.pop(i, None)
        if reason is not None:
            if _NOT_FOUND.match(reason):
                missing[i] = reason
            else:
                fail(i, reason)
            return
        n_read += 1
        if page.image_path:
            read_from.add(parent(page.image_path))
        pending.append((i, page, prepared))
        if len(pending) >= job.batch_size:
            run_batch(pending)
            pending = []

    # Dask meter "read": this block minus the "inference" metered inside it (nested meters subtract)
    with _meter("read"):
        t_read = time.perf_counter()
        todo = np.flatnonzero(~keep)
        pool = _pool(_read_threads(job))
        for i, result in zip(todo, pool.map(load, [refs[i] for i in todo])):
            take(int(i), *result)
        while True:
            if missing:  # pages "not found": is their folder (or bucket) still there?
                folders: dict[str, list[int]] = {}
                for i, reason in missing.items():
                    folders.setdefault(parent(_NOT_FOUND.match(reason).group(1)), []).append(i)
                whole = n_read == 0 and len(missing) + len(world) == len(todo)
                for folder, pages in folders.items():
                    if _location_gone(folder, job.storage_options, whole or folder in read_from):
                        for i in pages:
                            world[i] = (Fault("gone", missing.pop(i)), folder)
            for i in [i for i, (fault, _) in world.items() if fault.kind == "denied" and n_read]:
                world.pop(i)
                fail(i, why[i])  # one file refused while others of the task read: the page's own fault
            if not world:
                break
            fault, where = next(iter(world.values()))
            logger.info("pagecube: pages [%d, %d): %s; retrying", start, stop,
                           describe("images", where, fault.kind, fault.cause))
            if not budget.wait():
                raise WorldStop("images", where, fault.kind, fault.cause)
            again = sorted(world)
            for i, result in zip(again, pool.map(load, [refs[i] for i in again])):
                take(i, *result)
        for i, reason in missing.items():  # pages that are missing while others of the location are there
            fail(i, reason)
        _let_next_task_start()  # every page is read: the worker may start the next task's reads now
        if pending:
            run_batch(pending)
        seconds["read"] = time.perf_counter() - t_read - seconds.get("inference", 0.0)

    now = np.datetime64(_dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None), "ms").astype(np.int64)
    region["written_at"][~keep] = now

    def before_completion() -> None:
        """Between the data and ``status``: the lease is still ours, and (``--verify``) the data read back
        the same; else raise, and no page of the range is marked done (a retry, then the failure policy)."""
        fence(loc, job.run_id)
        if job.verify:
            with _phase(seconds, "verify"):
                bad = verify_region(group, region, start, stop)
            if bad:
                raise RuntimeError(f"verify: pages [{start}, {stop}) read back different {', '.join(bad)}")

    def write() -> Receipt | None:
        """The region, ``status`` last, then the index entries; safe to repeat after a fault of the world."""
        fence(loc, job.run_id)  # this build still holds the store (raises LeaseLost if not)
        current = read_region(group, "status", start, stop)
        if not np.array_equal(current, before):
            # another task finished these pages while this one ran (this one ran on a worker that was cut
            # off and given up on): its write stands, and this one changes nothing
            done, failed = region_counts(current)
            logger.warning("pagecube: pages [%d, %d) were finished by another task meanwhile; "
                           "this task's duplicate write is dropped", start, stop)
            return Receipt(start, stop, done, failed, skipped=True, worker=_worker_name())
        write_region(group, region, start, stop, job.chunk_pages, before_completion=before_completion)
        _index(loc, before, region["status"], task, job.chunk_pages)
        return None

    with _phase(seconds, "write"):
        dropped = store(write)
    if dropped is not None:
        return dropped
    done, failed = region_counts(region["status"])
    _log_counts(done - int(keep.sum()), failed, getattr(model, "device", ""))
    return Receipt(start, stop, done, failed, seconds=seconds, worker=_worker_name(),
                   device=getattr(model, "device", ""), reasons=tuple(reasons))
