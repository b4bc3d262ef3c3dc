"""Dask's housekeeping timers, slowed down for the clusters pagecube starts on this machine.

Every Dask server checks its event loop every 20 ms, samples its task threads
for the Profile page every 10 ms, polls psutil every 500 ms and each nanny
reads its worker's memory every 100 ms.  Measured on a local cluster of two
workers (2 cores): 0.07 cores idle, halved by the settings below, which on a
CPU-bound build is about 2% of the machine given back to the pages.  Coarser
still (Profile 50 -> 200 ms, system monitor 1 -> 2 s, memory check 200 -> 500 ms)
moved two workers' CPU ratio against plain processes (benchmarks/overhead.py,
tiny model, alternating runs) from 0.89-0.92 to 0.95-0.97.  Nothing
is switched off: the dashboard's Profile and System pages and the nannies'
memory limits still work, at a coarser step.

Only local clusters get them (a remote scheduler, SLURM or Kubernetes workers
keep their own configuration), and a value the user configured is kept: a
setting changes only while it still holds Dask's packaged default.
"""
from __future__ import annotations

import dask

#: key: (Dask's default, pagecube's value for a local cluster)
LOCAL_TIMERS = {
    "distributed.admin.tick.interval": ("20ms", "200ms"),  # event-loop health; blocked-loop warnings still fire
    "distributed.worker.profile.interval": ("10ms", "200ms"),  # the Profile page, 5 samples/s a thread
    "distributed.admin.system-monitor.interval": ("500ms", "2s"),  # the System page and worker metrics
    "distributed.worker.memory.monitor-interval": ("100ms", "500ms"),  # the nanny's memory limit check
}


def local_timers() -> dict[str, str]:
    """The settings to apply (``dask.config.set``) around starting a local cluster."""
    import distributed.config  # noqa: F401 - loads Dask's distributed defaults into dask.config
    return {key: ours for key, (default, ours) in LOCAL_TIMERS.items() if dask.config.get(key, None) == default}
