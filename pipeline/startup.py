"""Start the local workers' imports at the very beginning of a build (cheap to import).

``pagecube build`` calls :func:`start_workers_early` before it imports the
client's own modules (``pipeline.cli`` does, before it imports typer; ``build()``
calls it again for Python callers, a no-op after the first): the forkserver
(``cluster.forkserver``) then imports distributed, torch and the model on
another core while the client imports xarray, Dask and distributed and reads
the page list; the cluster's workers are forked from it, ready. Only for
``--cluster local`` on CPU: GPU workers are still spawned, pinned to their devices.
"""
from __future__ import annotations

import atexit
import os
import tempfile

from .model.registry import BUILTIN, default_model

#: What the forkserver imports for every local worker, besides the model's module: what a worker needs to
#: join, run the pre-flight checks and load the model.
WORKER_MODULES = ("distributed", "cluster.resident", "cluster.metrics", "pipeline.preflight")
#: What each forked worker imports in the background once it has started, while the client runs the
#: pre-flight checks and writes the template: the task code (zarr, pydantic: 0.25 s). In the server's
#: list it held every worker back by that much; left to the first task, it slowed that task as much.
WARM_MODULES = ("pipeline.tasks",)
#: A file a worker process of ours writes when it re-ran pipeline.build (an unguarded script).
SPAWN_FLAG = "PAGECUBE_SPAWN_FLAG"
_FLAG: list[str] = []


def spawn_flag_path() -> str:
    """This process's flag file (one for all its builds: forked workers get it from the server)."""
    if not _FLAG:
        fd, path = tempfile.mkstemp(prefix="pagecube-spawn-")
        os.close(fd)
        _FLAG.append(path)
        atexit.register(lambda: os.path.exists(path) and os.unlink(path))
    return _FLAG[0]


def worker_modules(model: str | None) -> list[str]:
    """Modules a local worker forked for ``model`` (None: the default one) should have imported."""
    path = BUILTIN.get(model or default_model())
    # a user's module:factory is imported by the workers themselves (it may not be fork-safe);
    # torch, which such models are expected to use, is imported ahead for them
    first = path.partition(":")[0] if path else "torch"
    return [*WORKER_MODULES, first]


def start_workers_early(cluster: str, device: str, model: str | None) -> bool:
    """Start the forkserver for a local CPU cluster now; True when it runs."""
    if cluster != "local" or device == "cuda":
        return False
    from cluster.forkserver import start_forkserver, torch_cuda_build

    if device == "auto" and torch_cuda_build() is not False:
        return False  # GPUs may be there: those workers are spawned, one per device
    return start_forkserver(worker_modules(model), {SPAWN_FLAG: spawn_flag_path()})
