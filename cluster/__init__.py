"""Generic Dask plumbing for pagecube: get a cluster, keep objects resident on workers.

This package knows nothing about comics and never imports ``pipeline``.
"""

from .metrics import EventCounterPlugin, event_counts, install_event_counters
from .preflight import check_workers, skew_errors, skew_lines, version_table, versions_skew
from .resident import (ResidentMissing, ResidentPlugin, get_resident, install_resident, resident_map,
                       resident_status)
from .specs import kubernetes_cluster_spec, slurm_job_script
from .targets import ClusterError, ClusterHandle, open_cluster
from .tls import make_security

__all__ = [
    "ClusterError",
    "ClusterHandle",
    "EventCounterPlugin",
    "ResidentMissing",
    "ResidentPlugin",
    "check_workers",
    "event_counts",
    "install_event_counters",
    "get_resident",
    "install_resident",
    "kubernetes_cluster_spec",
    "make_security",
    "open_cluster",
    "resident_map",
    "resident_status",
    "skew_errors",
    "skew_lines",
    "slurm_job_script",
    "version_table",
    "versions_skew",
]
