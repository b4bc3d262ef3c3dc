"""Keep one object (a model) resident on each Dask worker, built from a factory path.

Why a WorkerPlugin: the object is built where it runs, once per worker
process, and is never pickled into the task graph. The scheduler re-runs
``setup()`` on workers that join later or are restarted. Measured traps this
module covers: a ``setup()`` that raises on a late-joining worker is only
logged by Dask, so the error is stored on the plugin and surfaced by
``get_resident`` in the task; ``register_worker_plugin`` is gone, so
``register_plugin`` is used; ``idempotent`` stops a second registration from
reloading the model.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import os
import threading
import time
from typing import Any, Callable

from distributed import WorkerPlugin, get_worker

__all__ = [
    "ResidentMissing",
    "ResidentPlugin",
    "get_resident",
    "install_resident",
    "resident_in_process",
    "resident_name",
    "resident_status",
]

logger = logging.getLogger(__name__)

# How long a task waits for a plugin whose setup() is still running.
READY_TIMEOUT = float(os.environ.get("PAGECUBE_RESIDENT_READY_TIMEOUT", "600"))


class ResidentMissing(RuntimeError):
    """The resident object is not available here (absent, or its setup failed)."""


def load_factory(factory_path: str) -> Callable[..., Any]:
    """Import ``"package.module:factory"`` (attribute path may be dotted)."""
    if not isinstance(factory_path, str) or ":" not in factory_path:
        raise ValueError(f"factory path must look like 'package.module:factory', got {factory_path!r}")
    module_name, _, attr = factory_path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{factory_path} is not callable")
    return obj


def resident_name(factory_path: str, kwargs: dict | None = None) -> str:
    """A stable plugin name per factory + kwargs, so equal requests share one load."""
    blob = json.dumps([factory_path, kwargs or {}], sort_keys=True, default=repr)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return f"resident-{factory_path}-{digest}"


def _match_torch_threads(nthreads: int) -> int | None:
    """Set torch's intra-op threads to the worker's threads (measured: more is 3-4x slower)."""
    try:
        import torch
    except ImportError:
        return None
    n = max(1, int(nthreads))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


class ResidentPlugin(WorkerPlugin):
    """Builds ``factory(**kwargs)`` once per worker process and keeps it on the plugin."""

    idempotent = True

    def __init__(self, factory_path: str, kwargs: dict | None = None, name: str | None = None):
        self.factory_path = factory_path
        self.kwargs = dict(kwargs or {})
        self.name = name or resident_name(factory_path, self.kwargs)
        self._reset()

    def _reset(self) -> None:
        self.obj: Any = None
        self.error: str | None = None
        self.loads = 0
        self.pid: int | None = None
        self.load_seconds: float | None = None
        self.torch_threads: int | None = None
        self._ready = threading.Event()

    def __getstate__(self):
        # Only the recipe travels; the object is built on the worker.
        return {"factory_path": self.factory_path, "kwargs": self.kwargs, "name": self.name}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def _load(self, nthreads: int) -> None:
        self.pid = os.getpid()
        t0 = time.perf_counter()
        try:
            self.torch_threads = _match_torch_threads(nthreads)
            self.obj = load_factory(self.factory_path)(**self.kwargs)
            self.loads += 1
            self.error = None
        except BaseException as e:  # noqa: BLE001 - stored and reported to tasks
            self.error = f"{type(e).__name__}: {e}"
            logger.error("resident %s failed to load: %s", self.factory_path, self.error, exc_info=True)
        finally:
            self.load_seconds = time.perf_counter() - t0
            self._ready.set()

    async def setup(self, worker) -> None:
        # Load in a thread so a slow checkpoint does not block the worker's
        # event loop (heartbeats keep flowing); tasks wait on _ready.
        self._ready.clear()
        await asyncio.to_thread(self._load, worker.state.nthreads)

    def teardown(self, worker) -> None:
        self.obj = None

    def state(self) -> dict:
        return {
            "name": self.name,
            "ok": self.obj is not None and self.error is None,
            "error": self.error,
            "pid": self.pid,
            "loads": self.loads,
            "load_seconds": self.load_seconds,
            "torch_threads": self.torch_threads,
        }


_IN_PROCESS: dict[str, Any] = {}
_IN_PROCESS_LOCK = threading.Lock()


def resident_in_process(factory_path: str, kwargs: dict | None = None) -> Any:
    """The same resident object without Dask (the "sync" target): built once per process."""
    name = resident_name(factory_path, kwargs)
    with _IN_PROCESS_LOCK:
        if name not in _IN_PROCESS:
            _IN_PROCESS[name] = load_factory(factory_path)(**(kwargs or {}))
        return _IN_PROCESS[name]


def _current_worker():
    try:
        return get_worker()
    except ValueError:
        return None


def get_resident(name: str, fallback: tuple[str, dict | None] | None = None) -> Any:
    """Inside a task: the resident object registered under ``name``.

    Outside any Dask worker, ``fallback=(factory_path, kwargs)`` builds it in
    process once, so the same task code runs on the "sync" target. On a worker
    whose plugin is absent or failed, raises ``ResidentMissing`` with the reason.
    """
    worker = _current_worker()
    if worker is None:
        if fallback is not None:
            return resident_in_process(*fallback)
        raise ResidentMissing(f"resident {name!r}: not running on a Dask worker and no fallback given")
    plugin = worker.plugins.get(name)
    if not isinstance(plugin, ResidentPlugin):
        raise ResidentMissing(
            f"resident {name!r} is not installed on worker {worker.address}; call install_resident first"
        )
    if not plugin._ready.wait(READY_TIMEOUT):
        raise ResidentMissing(f"resident {name!r} still loading on worker {worker.address} after {READY_TIMEOUT:g} s")
    if plugin.error is not None or plugin.obj is None:
        raise ResidentMissing(
            f"resident {plugin.factory_path} failed to load on worker {worker.address}: {plugin.error}"
        )
    return plugin.obj


def _plugin_state(name: str, dask_worker=None) -> dict:
    plugin = dask_worker.plugins.get(name)
    if plugin is None:
        return {"name": name, "ok": False, "error": "plugin absent", "pid": os.getpid(), "loads": 0}
    plugin._ready.wait(READY_TIMEOUT)
    return plugin.state()


def _call_resident(name: str, fn: Callable[[Any], Any], dask_worker=None) -> Any:
    plugin = dask_worker.plugins.get(name)
    if not isinstance(plugin, ResidentPlugin) or not plugin._ready.wait(READY_TIMEOUT) or plugin.obj is None:
        raise ResidentMissing(f"resident {name!r} is not loaded on worker {dask_worker.address}")
    return fn(plugin.obj)


def resident_map(client, name: str, fn: Callable[[Any], Any]) -> dict[str, Any]:
    """``fn(resident object)`` on every worker, by address.

    Runs in each worker's event loop, not in its task threads, so it answers
    even while every thread is busy (a task of an earlier client still running).
    """
    return client.run(_call_resident, name, fn)


def resident_status(client, name: str) -> dict[str, dict]:
    """Per worker address: ok, error, pid, loads, load_seconds, torch_threads."""
    return client.run(_plugin_state, name)


def install_resident(client, factory_path: str, kwargs: dict | None = None) -> str:
    """Register the resident plugin on all workers (now and later) and verify it loaded.

    Returns the name tasks pass to ``get_resident``. With ``client=None`` (the
    "sync" target) the object is built in this process instead. Raises
    ``ResidentMissing`` with each failing worker's error text.
    """
    name = resident_name(factory_path, kwargs)
    if client is None:
        try:
            resident_in_process(factory_path, kwargs)
        except Exception as e:
            raise ResidentMissing(f"resident {factory_path} failed to load: {type(e).__name__}: {e}") from e
        return name
    if ":" not in factory_path:
        raise ValueError(f"factory path must look like 'package.module:factory', got {factory_path!r}")
    client.register_plugin(ResidentPlugin(factory_path, kwargs, name=name))
    states = resident_status(client, name)
    bad = {addr: s for addr, s in states.items() if not s.get("ok")}
    if bad:
        addr, s = next(iter(bad.items()))
        raise ResidentMissing(
            f"resident {factory_path} failed on {len(bad)} of {len(states)} workers "
            f"(e.g. {addr}): {s.get('error')}"
        )
    return name
