"""Checks to run before submitting work: fail fast with one clear line.

Why: a task that asks for a resource no worker offers waits forever without
an error, a scheduler with no workers looks like a hang, and mismatched
package versions across client, scheduler and workers fail later as opaque
deserialization errors.
"""

from __future__ import annotations

import time
from collections import Counter

from .errors import ClusterError

__all__ = [
    "DEFAULT_PACKAGES",
    "check_workers",
    "release_series",
    "skew_errors",
    "skew_lines",
    "version_table",
    "versions_skew",
]

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


def version_table(client, packages=DEFAULT_PACKAGES, extra=()) -> dict[str, dict]:
    """Per package: ``{"client": v, "scheduler": v, "workers": {address: v}}`` (None: not installed)."""
    if client is None:
        return {}
    pkgs = tuple(dict.fromkeys(tuple(packages) + tuple(extra)))
    fn = _local_versions(pkgs)
    mine = fn(pkgs)
    sched = client.run_on_scheduler(fn, pkgs)
    workers = client.run(fn, pkgs)
    return {p: {"client": mine[p], "scheduler": sched.get(p), "workers": {a: w.get(p) for a, w in workers.items()}}
            for p in pkgs}


def skew_lines(table: dict[str, dict]) -> list[str]:
    """One line per package whose version is not the same everywhere."""
    lines = []
    for p, row in table.items():
        workers = row["workers"]
        seen = {row["client"], row["scheduler"]} | set(workers.values())
        if len(seen) <= 1:
            continue
        counts = Counter(v or "missing" for v in workers.values())
        wtxt = ", ".join(f"{v} ({n})" for v, n in sorted(counts.items()))
        lines.append(
            f"{p}: client {row['client'] or 'missing'}, scheduler {row['scheduler'] or 'missing'}, workers {wtxt or 'none'}"
        )
    return lines


def release_series(version: str | None) -> tuple | None:
    """The part of a version that marks incompatible releases: (major,), or (0, minor) before 1.0."""
    if not version:
        return None
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    if not parts:
        return (version,)
    return tuple(parts[:2]) if parts[0] == 0 else (parts[0],)


def skew_errors(table: dict[str, dict], strict=()) -> list[str]:
    """Lines for the ``strict`` packages that are missing somewhere or differ in release series.

    The client's version is the reference; a scheduler or worker without the
    package, or with another major version (another minor before 1.0), is an
    error. Other differences are left to ``skew_lines`` (warnings).
    """
    errors = []
    for p in strict:
        row = table.get(p)
        if row is None:
            continue
        ref = release_series(row["client"])
        where = [("scheduler", row["scheduler"])] + [(f"worker {a}", v) for a, v in row["workers"].items()]
        bad = [(w, v) for w, v in where if release_series(v) != ref]
        if bad:
            w, v = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            errors.append(f"{p} {v or 'missing'} on {w}{more} is incompatible with {row['client'] or 'missing'} here")
    return errors


def versions_skew(client, packages=DEFAULT_PACKAGES, extra=()) -> list[str]:
    """Lines naming each package whose version differs between client, scheduler and workers.

    ``extra`` adds names such as "pagecube". "python" compares interpreter
    versions. An empty list means no skew (or no client).
    """
    return skew_lines(version_table(client, packages, extra))
