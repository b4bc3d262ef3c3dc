"""Checks to run before submitting work: fail fast with one clear line.

Why: a task that asks for a resource no worker offers waits forever without
an error, a scheduler with no workers looks like a hang, and mismatched
package versions across client, scheduler and workers fail later as opaque
deserialization errors.
"""

from __future__ import annotations

import time
from collections import Counter

__all__ = ["DEFAULT_PACKAGES", "check_workers", "versions_skew"]

DEFAULT_PACKAGES = ("python", "torch", "zarr", "xarray", "numpy", "dask", "distributed", "cloudpickle", "msgpack")


def workers_info(client) -> dict:
    """All workers' info; newer distributed lists only 5 unless asked for all."""
    try:
        return client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:  # distributed without the n_workers argument lists all
        return client.scheduler_info()["workers"]


def check_workers(
    client,
    *,
    timeout: float = 60,
    need_resources: dict | None = None,
    n_workers: int = 1,
    where: str | None = None,
    hint: str = "start workers (`dask worker SCHEDULER_ADDRESS`) or raise the timeout",
) -> dict:
    """Wait up to ``timeout`` s for ``n_workers`` workers, then check resources.

    Returns ``{address: {"nthreads": int, "resources": dict}}``. Raises
    ``ClusterError`` when no worker joined in time or when a requested
    resource (e.g. ``{"GPU": 1}``) is offered by no worker. ``client=None``
    (the sync target) passes with an empty dict.
    """
    from .targets import ClusterError

    if client is None:
        return {}
    where = where or getattr(client.scheduler, "address", None) or "the scheduler"
    deadline = time.monotonic() + timeout
    while True:
        workers = workers_info(client)
        if len(workers) >= n_workers:
            break
        if time.monotonic() >= deadline:
            raise ClusterError(
                f"only {len(workers)} of {n_workers} Dask workers joined {where} within {timeout:g} s; {hint}"
            )
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    for res, amount in (need_resources or {}).items():
        if not any((w.get("resources") or {}).get(res, 0) >= amount for w in workers.values()):
            hint = " or use --device cpu" if res == "GPU" else ""
            raise ClusterError(
                f"no worker offers resource {res}={amount:g}; start workers with --resources {res}={amount:g}{hint}"
            )
    return {a: {"nthreads": w.get("nthreads"), "resources": dict(w.get("resources") or {})} for a, w in workers.items()}


def _local_versions(packages) -> dict:
    # Defined inside so that cloudpickle ships it by value: it must run on a
    # scheduler or worker that may not have this project installed (that is
    # exactly what it helps diagnose).
    def versions(packages):
        import importlib.metadata as md
        import platform

        out = {}
        for p in packages:
            if p == "python":
                out[p] = platform.python_version()
                continue
            try:
                out[p] = md.version(p)
            except md.PackageNotFoundError:
                out[p] = None
        return out

    return versions


def versions_skew(client, packages=DEFAULT_PACKAGES, extra=()) -> list[str]:
    """Lines naming each package whose version differs between client, scheduler and workers.

    ``extra`` adds names such as "pagecube". "python" compares interpreter
    versions. An empty list means no skew (or no client).
    """
    if client is None:
        return []
    pkgs = tuple(dict.fromkeys(tuple(packages) + tuple(extra)))
    fn = _local_versions(pkgs)
    mine = fn(pkgs)
    sched = client.run_on_scheduler(fn, pkgs)
    workers = client.run(fn, pkgs)
    lines = []
    for p in pkgs:
        seen = {mine[p], sched.get(p)} | {w.get(p) for w in workers.values()}
        if len(seen) <= 1:
            continue
        counts = Counter(w.get(p) or "missing" for w in workers.values())
        wtxt = ", ".join(f"{v} ({n})" for v, n in sorted(counts.items()))
        lines.append(
            f"{p}: client {mine[p] or 'missing'}, scheduler {sched.get(p) or 'missing'}, workers {wtxt or 'none'}"
        )
    return lines


