"""Notice a cluster that has had no worker able to run the work for a while.

Why: Dask waits for workers for ever. When every worker has died and none
replaces it (a nanny that could not restart its worker, batch jobs that ran
out of walltime, pods that were not rescheduled), the tasks stay queued, or
in the no-worker state when the only workers left lack a resource the tasks
ask for, and a client waiting on their futures hangs without a word.

A :class:`WorkerWatch` is asked from the client's waiting loop; it polls the
scheduler at most every ``every`` seconds and raises :class:`NoWorkers` once
no suitable worker has been seen for ``timeout`` seconds in a row. The clock
starts when a poll first finds none, so a cluster that is merely slow to
replace a worker (a nanny restart, a pod rescheduled) is not cut short.
"""

from __future__ import annotations

import time
from typing import Callable

from .errors import ClusterError

__all__ = ["NO_WORKERS_TIMEOUT", "NoWorkers", "WorkerWatch", "no_workers_timeout"]

#: Seconds without a live worker before giving up, by cluster kind. A local cluster's nannies
#: replace a dead worker within seconds, so a minute without any means they cannot. Workers of
#: a remote scheduler, a batch system or Kubernetes come back from a queue, a pod reschedule or
#: a node autoscaler: minutes.
NO_WORKERS_TIMEOUT = {"local": 60.0}
NO_WORKERS_TIMEOUT_ELSEWHERE = 600.0


def no_workers_timeout(kind: str, timeout: float | None = None) -> float:
    """``timeout`` when given (0: wait for ever), else the default for a cluster of ``kind``."""
    if timeout is not None:
        return float(timeout)
    return NO_WORKERS_TIMEOUT.get(kind, NO_WORKERS_TIMEOUT_ELSEWHERE)


class NoWorkers(ClusterError):
    """No worker able to run the work has been alive for ``seconds``."""

    def __init__(self, seconds: float, resources: dict | None = None):
        self.seconds = seconds
        what = "Dask worker"
        if resources:
            what += " offering " + ", ".join(f"{k}={v:g}" for k, v in resources.items())
        super().__init__(f"no {what} has been alive for {seconds:g} s")


class WorkerWatch:
    """Raise :class:`NoWorkers` from :meth:`check` after ``timeout`` s without a suitable worker.

    ``timeout`` 0 (or None) never raises. ``resources``: what the tasks ask for (``{"GPU": 1}``);
    a worker that does not offer it does not count.
    """

    def __init__(self, client, timeout: float | None, resources: dict | None = None, every: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.client, self.timeout, self.resources = client, timeout or 0.0, dict(resources or {})
        self.every, self.clock = every, clock
        self._since: float | None = None
        self._next = 0.0

    def count(self) -> int:
        """Workers now alive that can run the tasks; 0 also when the scheduler cannot be asked."""
        try:
            if not self.resources:
                return len(self.client.nthreads())
            from .preflight import workers_info

            workers = workers_info(self.client).values()
        except Exception:  # noqa: BLE001 - a scheduler that does not answer has no worker for us
            return 0
        return sum(all((w.get("resources") or {}).get(r, 0) >= n for r, n in self.resources.items())
                   for w in workers)

    def check(self) -> None:
        if not self.timeout or self.client is None:
            return
        now = self.clock()
        if now < self._next:
            return
        self._next = now + self.every
        if self.count():
            self._since = None
        elif self._since is None:
            self._since = now
        elif now - self._since >= self.timeout:
            raise NoWorkers(self.timeout, self.resources)
