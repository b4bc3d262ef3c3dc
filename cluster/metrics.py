"""Count numbers that tasks log as Dask events, on the scheduler, for Prometheus.

Tasks call ``get_worker().log_event(topic, {"done": 3, "failed": 1})``; a
``SchedulerPlugin`` registered by the client sums each numeric field of that
topic's events and, when ``prometheus_client`` is installed on the scheduler,
exposes them as Prometheus counters ``<namespace>_<field>_total`` on the
scheduler's own ``/metrics`` page (the dashboard's HTTP server serves the
default registry). Without ``prometheus_client`` the sums are still kept on the
plugin (``event_counts``). Generic: it knows nothing about what is counted.

The scheduler of a ``LocalCluster`` lives in the client's process, so counters
are made once per process and name and reused by later plugins (Prometheus
refuses a second registration of the same name); they count everything since
the scheduler process started, as Prometheus counters do.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

__all__ = ["EventCounterPlugin", "event_counts", "install_event_counters", "prometheus_counter"]

_COUNTERS: dict[str, Any] = {}
_LOCK = threading.Lock()


def _metric_name(namespace: str, field: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", f"{namespace}_{field}")


def prometheus_counter(name: str, documentation: str):
    """A process-wide Prometheus counter ``name`` (``name_total`` when scraped), or None without prometheus_client."""
    try:
        import prometheus_client
    except ImportError:
        return None
    with _LOCK:
        counter = _COUNTERS.get(name)
        if counter is None:
            try:
                counter = prometheus_client.Counter(name, documentation)
            except ValueError:  # registered by someone else under this name: find it
                counter = prometheus_client.REGISTRY._names_to_collectors.get(name)  # noqa: SLF001
            _COUNTERS[name] = counter
        return counter


class EventCounterPlugin(SchedulerPlugin):
    """Sum the numeric fields of events logged under ``topic``; one Prometheus counter per field."""

    idempotent = True

    def __init__(self, topic: str, fields: dict[str, str], namespace: str | None = None, name: str | None = None):
        self.topic = topic
        self.fields = dict(fields)  # field -> help text
        self.namespace = namespace or topic
        self.name = name or f"event-counter-{topic}"
        self.totals: dict[str, float] = {}
        self._counters: dict[str, Any] = {}

    async def start(self, scheduler) -> None:
        self.totals = {f: 0.0 for f in self.fields}
        for f, doc in self.fields.items():
            self._counters[f] = prometheus_counter(_metric_name(self.namespace, f), doc)

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != self.topic or not isinstance(msg, dict):
            return
        for f in self.fields:
            value = msg.get(f)
            if isinstance(value, (int, float)) and value > 0:
                self.totals[f] = self.totals.get(f, 0.0) + value
                counter = self._counters.get(f)
                if counter is not None:
                    counter.inc(value)


def install_event_counters(client, topic: str, fields: dict[str, str], namespace: str | None = None) -> str | None:
    """Register an ``EventCounterPlugin`` on the scheduler (once per name); returns its name.

    ``client=None`` (no scheduler) returns None. The scheduler must be able to
    import this package (an installed package, as for the task graph).
    """
    if client is None:
        return None
    plugin = EventCounterPlugin(topic, fields, namespace)
    client.register_plugin(plugin, name=plugin.name)
    return plugin.name


def _counts(name: str, dask_scheduler=None) -> dict | None:
    plugin = dask_scheduler.plugins.get(name)
    return dict(plugin.totals) if plugin is not None else None


def event_counts(client, name: str) -> dict | None:
    """The plugin's sums per field since its scheduler started, or None if it is not registered."""
    return client.run_on_scheduler(_counts, name)
