"""Local worker processes forked from a server that has already imported the heavy modules.

A spawned Dask worker starts a fresh interpreter and imports distributed,
then torch and the task code, on its own: about 1.5 CPU-seconds per worker,
paid again by every worker, and only after the client has imported enough to
start the cluster. Started at the very beginning of a command, a
multiprocessing *forkserver* imports those modules once, on another core,
while the client is still importing its own; local workers are then forked
from it in milliseconds with everything imported (and the pages of those
modules shared between workers). The Nanny still owns each worker: a worker
killed mid-build is forked again the same way.

Environment: a forked worker inherits the server's environment, not the
client's. The server is started with the variables that must be set before an
interpreter or a native library starts (``PYTHONHASHSEED``, thread counts of
OpenMP/MKL/OpenBLAS, as Dask's ``pre-spawn-environ`` sets them, without
``MALLOC_TRIM_THRESHOLD_``: measured, it slows torch); variables the client
set or changed since then reach the workers through the Nanny's ``env``; a
variable that is gone, or one read at start-up that changed, means this
cluster is spawned as before. ``DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD``
(any value) or ``PAGECUBE_WORKER_START=spawn`` also keeps plain spawning.

Generic: the modules to import are the caller's list of names.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from typing import Sequence

__all__ = ["forkserver_worker_env", "start_forkserver", "forkserver_usable", "torch_cuda_build"]

# Read when an interpreter or a native library starts: they must be right in the server itself.
STARTUP_KEYS = ("PYTHONHASHSEED", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "MALLOC_TRIM_THRESHOLD_")
STARTUP_PREFIXES = ("PYTHON", "LD_", "MALLOC_", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "CUDA_", "TORCH_")
# Dask's pre-spawn-environ as pagecube's local clusters use it (MALLOC_TRIM_THRESHOLD_ removed);
# a value in the environment wins, as in Dask.
PRE_SPAWN = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
HASH_SEED = "6640"  # what Dask's Nanny gives spawned workers

#: Imported after the caller's modules: see its docstring (the forked workers' garbage collector).
READY = "cluster.forkserver_ready"
#: Imported before anything else: the server and its workers ignore SIGINT (see its docstring).
NO_SIGINT = "cluster.forkserver_sigint"

_LOCK = threading.Lock()
_STATE: dict = {"pid": None, "env": None, "modules": ()}


def forkserver_usable() -> bool:
    """Linux only (fork after imports is safe there), and not turned off by the user."""
    if not sys.platform.startswith("linux") or "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    if os.environ.get("PAGECUBE_WORKER_START", "").strip().lower() == "spawn":
        return False
    return "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD" not in os.environ


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    for key, value in PRE_SPAWN.items():
        env.setdefault(key, value)
    if env.get("PYTHONHASHSEED") in (None, "0"):
        env["PYTHONHASHSEED"] = HASH_SEED
    if env.get("MALLOC_TRIM_THRESHOLD_") == "65536":  # Dask's value, left behind by an earlier Nanny
        del env["MALLOC_TRIM_THRESHOLD_"]
    return env


def _server_pid():
    from multiprocessing import forkserver

    return getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)


#: Dask's logging configuration when this module was imported: in the server, what its workers
#: were forked with (see ``dask_setup``).
IMPORTED_WITH_LOGGING = os.environ.get("DASK_LOGGING")


#: Set in a forked worker's environment (by its Nanny): modules, comma-separated, it imports in a
#: background thread as soon as it starts (``open_cluster``'s ``warm_modules``).
WARM_KEY = "CLUSTER_FORKSERVER_WARM_MODULES"


def dask_setup(worker) -> None:
    """Dask worker preload for forked workers: distributed set up its logging when the server
    imported it, so a ``DASK_LOGGING`` the Nanny gave this worker since then is applied now; then
    the worker's warm modules start importing."""
    if os.environ.get("DASK_LOGGING") != IMPORTED_WITH_LOGGING:
        import dask
        from distributed.config import initialize_logging

        initialize_logging(dask.config.config)
    warm = [m for m in os.environ.get(WARM_KEY, "").split(",") if m]
    if warm:
        threading.Thread(target=_import_all, args=(warm,), name="warm-imports", daemon=True).start()


def _import_all(modules: Sequence[str]) -> None:
    """Import ``modules`` (in a forked worker, beside its start). A failure is left to the code that
    needs the module: it raises the same error, where it can be reported."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001
            pass


def start_forkserver(modules: Sequence[str], env_extra: dict[str, str] | None = None) -> bool:
    """Start the forkserver now (returns at once; it imports ``modules`` in the background).

    ``env_extra``: variables the server (so every worker forked from it) starts with, besides this
    process's environment. True when a server started here is running (now or from an earlier
    call); False where it cannot be used, or when another part of the program started one first.
    """
    if not forkserver_usable():
        return False
    from multiprocessing import forkserver

    with _LOCK:
        pid = _server_pid()
        if pid is not None:
            return pid == _STATE["pid"]
        env = _server_env()
        env.update(env_extra or {})
        # the server inherits os.environ: give it ``env`` (it differs in a few keys only)
        touched = {k: os.environ.get(k) for k in set(env) ^ set(os.environ) | {
            k for k in env if os.environ.get(k) != env[k]}}
        try:
            for key in touched:
                if key in env:
                    os.environ[key] = env[key]
                else:
                    del os.environ[key]
            preload = [NO_SIGINT, __name__, *(m for m in modules if m not in (NO_SIGINT, __name__, READY)), READY]
            multiprocessing.get_context("forkserver").set_forkserver_preload(preload)
            forkserver.ensure_running()
        finally:
            for key, value in touched.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        _STATE.update(pid=_server_pid(), env=env, modules=tuple(modules))
        _mark_preload_done()
        return True


def _mark_preload_done() -> None:
    """distributed, on its first forkserver start, imports its whole list of optional packages
    into this process (pandas, ...) to choose the server's preload; the server already runs."""
    try:
        import distributed.utils as du
    except ImportError:
        return
    du._forkserver_preload_set = True


def forkserver_worker_env(pre_spawn: dict[str, str]) -> dict[str, str] | None:
    """The ``env`` that makes a worker forked from this server see what a spawned one would see.

    ``pre_spawn``: the variables Dask's Nanny sets before spawning (its pre-spawn-environ, read
    now). None when the server cannot give that (not ours, restarted, or a variable read at
    start-up differs or is gone): spawn instead.
    """
    if not forkserver_usable():
        return None
    with _LOCK:
        server = _STATE["env"]
        if server is None or _server_pid() != _STATE["pid"]:
            return None
        want = dict(os.environ)
        want.update(pre_spawn)
        if want.get("MALLOC_TRIM_THRESHOLD_") == "65536":
            del want["MALLOC_TRIM_THRESHOLD_"]
        if want.get("PYTHONHASHSEED") in (None, "0"):
            want["PYTHONHASHSEED"] = HASH_SEED
        if any(key not in want for key in server):
            return None  # a variable unset since: a forked worker cannot lose it
        changed = {k: v for k, v in want.items() if server.get(k) != v}
        if any(k in STARTUP_KEYS or k.startswith(STARTUP_PREFIXES) for k in changed):
            return None
        return changed


def torch_cuda_build() -> bool | None:
    """Whether the installed torch is a CUDA build, from ``torch/version.py`` read as text (False
    also when torch is not installed); None when that cannot be told without importing it."""
    if "torch" in sys.modules:  # imported already: ask it (cheap, and what tests patch)
        return None
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    for folder in spec.submodule_search_locations or ():
        try:
            with open(os.path.join(folder, "version.py")) as fh:
                text = fh.read()
        except OSError:
            continue
        for line in text.splitlines():
            head, _, value = line.partition("=")
            if head.split(":")[0].strip() == "cuda":
                return value.strip() not in ("None", "")
    return None
