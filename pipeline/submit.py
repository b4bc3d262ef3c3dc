"""Submitting a plan: a bounded window of chunk tasks, and what happens when tasks fail or workers die.

The client never builds the whole graph: it keeps ``WINDOW_PER_THREAD`` tasks
per worker thread in flight (``as_completed``) and tops the window up as
receipts come back.  Every task is safe to run twice, which is what lets a
dead worker's tasks simply run again.
"""
from __future__ import annotations

import re
import signal
import sys
from typing import TYPE_CHECKING

import dask

from .faults import WorldStop, classify
from .progress import Progress
from .store.lock import LeaseLost
from .tasks import run_chunk
from .types import JobSpec, Receipt

if TYPE_CHECKING:
    from .store import Store

WINDOW_PER_THREAD = 2
TASK_RETRIES = 2  # raised exceptions (I/O hiccups); worker deaths are bounded by allowed-failures
#: Worker loss.  Dask's ``distributed.scheduler.allowed-failures`` (default 3) is set to 0 for
#: clusters this process starts (a remote scheduler keeps its own): every worker death reaches the
#: client at once as ``KilledWorker`` and one policy, below, decides.  A worker lost to a preemption
#: or an OOM kill takes its tasks with it: they are submitted afresh (safe: tasks are idempotent).
#: A task whose pages crash every process that runs them (a native-library crash, a page that
#: exhausts memory) would kill workers for ever: once DEATHS_TO_FAIL processes died while really
#: running it, its unfinished pages are marked failed with that reason (``fail_range``) and the
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


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


#: Counters tasks log under the Dask event topic "pagecube"; served on the scheduler's /metrics as
#: pagecube_pages_done_total and pagecube_pages_failed_total when prometheus_client is installed there.
METRICS = {"done": "Pages written with status done by pagecube builds",
           "failed": "Pages marked failed by pagecube builds"}


def build_span(client, run_id: str):
    """A Dask span named after the build: its tasks' fine performance metrics (read, inference, write)
    are grouped under it on the dashboard and in the scheduler's spans extension."""
    if client is None:
        import contextlib

        return contextlib.nullcontext()
    import distributed

    return distributed.span(f"pagecube-build-{run_id}")


class sigterm_as_interrupt:
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


def take_receipt(receipt: Receipt, bar: Progress, reasons: list[str]) -> None:
    if receipt.skipped:
        bar.update(receipt.done, receipt.failed)
        return
    bar.update(receipt.done, receipt.failed)
    for r in receipt.reasons:
        if len(reasons) < 20:
            reasons.append(f"pages [{receipt.start}, {receipt.stop}): {r}")


def check_lease(lease) -> None:
    """Stop the build once another build has taken the store's lease (its tasks are fenced off anyway)."""
    if lease is not None and lease.lost:
        raise LeaseLost(f"this build lost the store lock to {lease.lost}; stopping (finished chunks are kept)")


def _lease_lost(exc: BaseException) -> bool:
    return type(exc).__name__ == "LeaseLost"  # raised on a worker: compared by name, as KilledWorker


def run_tasks(plan, source, job, handle, resources, bar, reasons, lease=None,
              no_workers_timeout: float | None = None) -> list[Receipt]:
    """Every task of ``plan``, its receipt taken as it comes: in this process for ``--cluster sync``,
    else through a bounded window on the cluster."""
    if handle.client is None:
        return _run_here(plan, source, job, bar, reasons, lease)
    return _Window(handle, job, source, resources).run(plan, bar, reasons, lease, no_workers_timeout)


def _run_here(plan, source, job, bar, reasons, lease) -> list[Receipt]:
    """``--cluster sync``: one task after the other, failures settled as on a cluster."""
    receipts: list[Receipt] = []
    store = job.store
    for task in plan.tasks:
        check_lease(lease)
        d = dask.delayed(run_chunk, pure=False)(task, source.slice(task.start, task.stop), job,
                                                dask_key_name=f"{task.key}-{job.run_id}")
        try:
            receipt = d.compute(scheduler="sync")
        except Exception as exc:  # as on a cluster: the range's pages fail with the reason, the build goes on
            if _lease_lost(exc):
                raise
            _stop_if_world(exc, job)
            receipt = fail_range(store, job, task, task_failure(exc, task))
        _stop_if_stopped(receipt)
        receipts.append(receipt)
        take_receipt(receipt, bar, reasons)
    return receipts


class _Window:
    """A bounded window of tasks on a cluster: ``WINDOW_PER_THREAD`` per worker thread in flight, topped
    up as receipts come back, a task whose worker died submitted afresh (``settle``)."""

    def __init__(self, handle, job: JobSpec, source, resources):
        self.handle, self.client, self.job, self.source, self.resources = handle, handle.client, job, source, resources
        self.store = job.store
        self.killed: dict = {}  # task -> times it was submitted afresh after its worker died
        self.ac = None

    def submit(self, task, attempt: int = 0):
        again = f"-again{attempt}" if attempt else ""
        d = dask.delayed(run_chunk_marked, pure=False)(task, self.source.slice(task.start, task.stop), self.job,
                                                        dask_key_name=f"{task.key}-{self.job.run_id}{again}")
        fut = self.client.compute(d, retries=TASK_RETRIES, resources=self.resources)
        fut.pagecube_task = task
        return fut

    def run(self, plan, bar, reasons, lease, no_workers_timeout) -> list[Receipt]:
        from distributed import as_completed

        from cluster import WorkerWatch, no_workers_timeout as default_timeout

        client = self.client
        watch = WorkerWatch(client, default_timeout(self.handle.kind, no_workers_timeout), self.resources)
        window = max(2, WINDOW_PER_THREAD * max(1, sum(client.nthreads().values())))
        todo = iter(plan.tasks)
        receipts: list[Receipt] = []
        # no list of the first futures is kept: a finished future held here keeps its result pinned to
        # its worker, and a worker death would then recompute it
        self.ac = as_completed([self.submit(t) for _, t in zip(range(window), todo)])
        try:
            for fut in finished(self.ac, watch):
                check_lease(lease)
                try:
                    receipt = result(fut, watch)
                except Exception as exc:
                    receipt = self.settle(fut, exc)
                    if receipt is None:
                        continue  # submitted afresh
                _stop_if_stopped(receipt)
                receipts.append(receipt)
                take_receipt(receipt, bar, reasons)
                nxt = next(todo, None)
                if nxt is not None:
                    self.ac.add(self.submit(nxt))
        except BaseException as exc:
            self.cancel_all(exc)
            raise
        return receipts

    def settle(self, fut, exc: Exception) -> Receipt | None:
        """A task that raised: a lost lease or a fault of the world stops the build; a task whose worker
        died is submitted afresh (None) until the deaths are its own; else its pages fail with the reason."""
        task = fut.pagecube_task
        if _lease_lost(exc):
            raise LeaseLost(str(exc).splitlines()[0]) from None
        if fut.status == "cancelled" or _cancelled(exc):  # never a page's failure
            raise _scheduler_lost(self.client, exc) from None
        _stop_if_world(exc, self.job)
        deaths = 0
        if type(exc).__name__ == "KilledWorker":
            deaths = self.store.deaths_running(task.chunk)
            if deaths < DEATHS_TO_FAIL and self.killed.get(task, 0) < KILLED_RESUBMITS:
                self.killed[task] = self.killed.get(task, 0) + 1
                say(f"pagecube: a worker died while holding pages [{task.start}, {task.stop}); "
                    "running them again in a fresh task")
                self.ac.add(self.submit(task, self.killed[task]))
                return None
        receipt = fail_range(self.store, self.job, task, task_failure(exc, task, deaths))
        try:  # the scheduler's page counters count these failures too
            self.client.log_event("pagecube", {"done": 0, "failed": receipt.failed})
        except Exception:  # pragma: no cover - counting never fails a build
            pass
        return receipt

    def cancel_all(self, exc: BaseException) -> None:
        """The build stops: cancel what is in flight; a client that lost its scheduler says so."""
        client = self.client
        try:
            client.cancel(list(self.ac.futures))
        except Exception:  # noqa: BLE001 - a client that lost its scheduler cannot cancel: say why it stopped
            pass
        if isinstance(exc, Exception) and not isinstance(exc, WorldStop) and not _lease_lost(exc) \
                and client.status not in ("running", "newly-created"):
            raise _scheduler_lost(client, exc) from None


def _scheduler_lost(client, exc: BaseException) -> WorldStop:
    """The stop for a client that lost its scheduler, with one cause whichever error told it first: Dask's
    reason for cancelling the futures, which a closed connection to the scheduler leads to too (the client
    cancels them with "scheduler-connection-lost"; so does this stop)."""
    why = re.search(r"cancelled for reason: ([\w-]+)", str(exc))
    closed = any(k.__name__ == "CommClosedError" for k in type(exc).__mro__)
    reason = why.group(1) if why else ("scheduler-connection-lost" if closed else None)
    return WorldStop("scheduler", _scheduler_address(client), "scheduler-lost",
                     f"the futures were cancelled: {reason}" if reason else _one_line(exc))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _cancelled(exc: BaseException) -> bool:
    """Dask cancelled the future (the scheduler or the client's connection to it was lost)."""
    fault = classify(exc)
    return fault is not None and fault.kind == "scheduler-lost"


def _scheduler_address(client) -> str:
    try:
        return str(client.scheduler.address)
    except Exception:  # noqa: BLE001
        return "(address unknown)"


def _stop_if_stopped(receipt: Receipt) -> None:
    """A task that gave up on a fault of the world: the build stops (its pages keep no status)."""
    if receipt.stopped:
        raise WorldStop(*receipt.stopped)


def _stop_if_world(exc: BaseException, job: JobSpec) -> None:
    """A task that raised a fault of the world outside its own retries: never its pages' failure."""
    fault = classify(exc)
    if fault is not None:
        raise WorldStop("store", job.store_url, fault.kind, fault.cause) from None


def finished(ac, watch):
    """``ac``'s futures as they finish; while none does, ``watch`` checks that a worker is left to run them."""
    while not ac.is_empty():
        if ac.has_ready():
            yield next(ac)
            continue
        watch.check()
        with ac.thread_condition:  # what as_completed's own iterator waits on
            ac.thread_condition.wait(timeout=0.1)


def result(fut, watch):
    """``fut.result()``, checking the workers meanwhile: a result lost with its worker is computed again,
    and that waits for a worker too."""
    while True:
        try:
            return fut.result(timeout=1.0)
        except TimeoutError:
            if fut.status in ("error", "cancelled"):
                return fut.result()  # it ended meanwhile: raise its own outcome (KilledWorker ...), not our wait's
        watch.check()  # outside the handler: a NoWorkers raised in it would carry our wait's TimeoutError,
        # which faults.classify would read as the store timing out


def run_chunk_marked(task, source, job):
    """``run_chunk`` inside a running mark, so that a process death while running it can be counted."""
    with job.store.running(task.chunk):
        return run_chunk(task, source, job)


def task_failure(exc: BaseException, task, deaths: int = 0) -> str:
    if type(exc).__name__ == "KilledWorker":
        if deaths:
            return (f"worker processes died {deaths} times while running pages [{task.start}, {task.stop}) "
                    "(a page may crash or exhaust the worker); not retried further")
        return (f"workers kept dying while holding pages [{task.start}, {task.stop}) "
                f"({KILLED_RESUBMITS + 1} tries); not retried further")
    return f"task failed: {type(exc).__name__}: {exc}".splitlines()[0]


def fail_range(store: Store, job: JobSpec, task, reason: str) -> Receipt:
    """A task that kept failing (or killing workers): its unfinished pages become failed, with the reason."""
    from .store.schema import STATUS_DONE, STATUS_FAILED
    from .task_write import record_chunks

    store.fence(job.run_id)
    group = store.writer(job.run_id + "-client").group
    before = group["status"][task.start:task.stop]
    status = before.copy()
    todo = status != STATUS_DONE
    error = group["error"][task.start:task.stop]
    error[todo] = reason
    status[todo] = STATUS_FAILED
    group["error"][task.start:task.stop] = error
    group["status"][task.start:task.stop] = status
    done = int((status == STATUS_DONE).sum())
    record_chunks(store, before, status, task, job.chunk_pages)
    store.clear_running(task.chunk)
    return Receipt(task.start, task.stop, done, int(todo.sum()), reasons=(reason,))
