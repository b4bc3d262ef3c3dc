"""Dask's housekeeping timers, slowed down for the clusters pagecube starts on this machine.

Every Dask server checks its event loop every 20 ms, samples its task threads
for the Profile page every 10 ms, polls psutil every 500 ms, each nanny and
worker reads its memory every 100 ms, the cluster object sends its description
to the scheduler every second, and a scheduler of up to 10 workers asks each of them
for a heartbeat every 500 ms.  On a CPU-bound build those are CPU taken from
the pages: on 2 cores, first 0.07 cores idle, halved by the settings below,
which moved two workers' CPU ratio against plain processes
(benchmarks/overhead.py, tiny model) from 0.89-0.92 to 0.95-0.97.

What was left, timed callback by callback on the event loops of an idle
two-worker cluster (``time.thread_time`` around each asyncio handle), in ms of
CPU per second: each worker's heartbeat 5.3 of its 12, the scheduler's
handling of the heartbeats about 4 of the client process's 22, the loops'
health ticks 1.6 + 2 x 0.8, the memory checks 1.4 + 2 x 0.8, the cluster's
description 0.9.  Heartbeats every 2 s, ticks and memory checks every second
and the description every 5 s halve both loops (22 to 11.5 and 12 to 6 ms/s),
about 1% of two cores; during a build, when the loops also carry the tasks'
traffic, they take about 9 ms/s off (0.45%).  Nothing is switched off:
the dashboard's pages, the workers' memory and CPU figures, blocked-loop
warnings and the nannies' memory limits still work, at a coarser step.  A lost
worker is still noticed at once: its nanny's connection closes, no heartbeat
is waited for.

Only local clusters get them (a remote scheduler, SLURM or Kubernetes workers
keep their own configuration), and a value the user configured is kept: a
setting changes only while it still holds Dask's packaged default.
"""
from __future__ import annotations

import dask

#: key: (Dask's default, pagecube's value for a local cluster)
LOCAL_TIMERS = {
    "distributed.admin.tick.interval": ("20ms", "1s"),  # event-loop health; blocked-loop warnings (3 s) still fire
    "distributed.worker.profile.interval": ("10ms", "200ms"),  # the Profile page, 5 samples/s a thread
    "distributed.admin.system-monitor.interval": ("500ms", "2s"),  # the System page and worker metrics
    "distributed.worker.memory.monitor-interval": ("100ms", "1s"),  # the nanny's and worker's memory checks
}

#: Seconds between a local worker's heartbeats. Dask asks up to 10 workers for one every 0.5 s
#: (``distributed.scheduler.heartbeat_interval``, with no setting); they carry the memory and CPU
#: figures the dashboards show, which the system monitor refreshes every 2 s anyway.
LOCAL_HEARTBEAT_S = 2.0

#: Seconds between a local cluster object's updates of its description on the scheduler (Dask: 1 s;
#: ``scheduler_sync_interval``, a constructor argument).
LOCAL_CLUSTER_SYNC_S = 5


def local_timers() -> dict[str, str]:
    """The settings to apply (``dask.config.set``) around starting a local cluster."""
    import distributed.config  # noqa: F401 - loads Dask's distributed defaults into dask.config
    return {key: ours for key, (default, ours) in LOCAL_TIMERS.items() if dask.config.get(key, None) == default}


def slow_heartbeats(scheduler, seconds: float = LOCAL_HEARTBEAT_S) -> None:
    """Have ``scheduler``'s workers heartbeat at most every ``seconds``: its answer to a heartbeat
    sets the worker's next interval, so the answer is raised to ``seconds`` where Dask's is shorter.

    Only this scheduler object's handler is wrapped (one in this process: a local cluster's); Dask's
    own longer intervals for larger clusters are kept.
    """
    handlers = getattr(scheduler, "handlers", None)
    original = (handlers or {}).get("heartbeat_worker")
    if original is None or getattr(original, "pagecube_floor", None) is not None:
        return

    def heartbeat_worker(*args, **kwargs):
        reply = original(*args, **kwargs)
        if isinstance(reply, dict) and isinstance(reply.get("heartbeat-interval"), (int, float)):
            reply["heartbeat-interval"] = max(reply["heartbeat-interval"], seconds)
        return reply

    heartbeat_worker.pagecube_floor = seconds
    handlers["heartbeat_worker"] = heartbeat_worker
