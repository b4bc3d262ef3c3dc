"""Generic Dask plumbing for pagecube: get a cluster, keep objects resident on workers.

This package knows nothing about comics and never imports ``pipeline``.
"""

from .lazy import lazy_exports as _lazy_exports

# Imported on first use: ``cluster.forkserver`` must start before distributed is imported here.
_LAZY = {
    "EventCounterPlugin": ".metrics", "event_counts": ".metrics", "install_event_counters": ".metrics",
    "NoWorkers": ".liveness", "WorkerWatch": ".liveness", "no_workers_timeout": ".liveness",
    "check_workers": ".preflight", "skew_errors": ".preflight", "skew_lines": ".preflight",
    "version_table": ".preflight", "versions_skew": ".preflight",
    "ResidentMissing": ".resident", "ResidentPlugin": ".resident", "get_resident": ".resident",
    "install_resident": ".resident", "resident_map": ".resident", "resident_status": ".resident",
    "kubernetes_cluster_spec": ".specs", "slurm_job_script": ".specs",
    "ClusterError": ".errors", "ClusterHandle": ".targets", "open_cluster": ".targets",
    "make_security": ".tls",
}


__getattr__, __dir__ = _lazy_exports(__name__, _LAZY)

__all__ = [
    "ClusterError",
    "ClusterHandle",
    "EventCounterPlugin",
    "NoWorkers",
    "ResidentMissing",
    "ResidentPlugin",
    "check_workers",
    "event_counts",
    "install_event_counters",
    "get_resident",
    "install_resident",
    "kubernetes_cluster_spec",
    "make_security",
    "no_workers_timeout",
    "open_cluster",
    "resident_map",
    "resident_status",
    "skew_errors",
    "skew_lines",
    "slurm_job_script",
    "version_table",
    "versions_skew",
    "WorkerWatch",
]
