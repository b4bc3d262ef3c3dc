"""Checks a build runs on its cluster before it creates or touches the store.

Each failure is one clear line (``PreflightError``, exit code 1):

- workers joined within the pre-flight timeout, and the resources the tasks
  ask for exist (``--device cuda`` needs a worker offering ``GPU``; a task
  asking for a resource no worker has would otherwise wait forever);
- versions: pagecube and zarr must be of the same release series on client,
  scheduler and workers (another major version, or another minor before 1.0,
  or a missing package is an error: the store format or the task code
  differ); torch, xarray, numpy, dask, distributed, python and the rest only
  warn, one line each;
- the store is writable from a worker and is the same store the client sees
  (a worker writes a probe object under ``_pagecube/``, the client reads and
  deletes it): a local path on a cluster of other machines, or ``memory://``,
  fails here rather than after hours of work written where nobody can see it.

The model is loaded on every worker by ``cluster.install_resident``, which
raises with the worker's error; the build turns it into one line.
"""
from __future__ import annotations

import os
import uuid

from .store.location import StoreLocation

#: Packages compared between client, scheduler and workers.
PACKAGES = ("pagecube", "torch", "zarr", "xarray", "numpy", "dask", "distributed", "python", "cloudpickle", "msgpack")
#: Packages whose skew is an error (see the module docstring).
STRICT = ("pagecube", "zarr")
DEFAULT_TIMEOUT = 60.0


class PreflightError(RuntimeError):
    """The cluster cannot run this build (exit code 1, one clear line)."""


def check_cluster(handle, device: str, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """Workers, resources and versions; returns warning lines (version skew that is not an error)."""
    from cluster import ClusterError, check_workers, skew_errors, skew_lines, version_table

    client = handle.client
    if client is None:
        return []
    need = {"GPU": 1} if device == "cuda" else None
    try:
        check_workers(client, timeout=timeout, need_resources=need)
    except ClusterError as exc:
        raise PreflightError(str(exc)) from None
    table = version_table(client, PACKAGES)
    errors = skew_errors(table, STRICT)
    if errors:
        raise PreflightError("version skew between this machine and the cluster: " + "; ".join(errors)
                             + " (install the same pagecube and zarr everywhere)")
    return [f"version skew: {line}" for line in skew_lines(table)]


def _write_probe(url: str, storage_options: dict, name: str, token: str) -> str:
    loc = StoreLocation(url, storage_options)
    fs = loc.fs
    if loc.is_local:
        fs.makedirs(loc.meta_path(), exist_ok=True)
    fs.pipe_file(loc.meta_path(name), token.encode())
    try:
        from distributed import get_worker

        return get_worker().address
    except Exception:  # pragma: no cover - not on a worker
        return f"pid {os.getpid()}"


def _remove_probe(url: str, storage_options: dict, name: str) -> None:
    try:
        StoreLocation(url, storage_options).fs.rm_file(StoreLocation(url, storage_options).meta_path(name))
    except FileNotFoundError:
        pass


def check_store(handle, loc: StoreLocation, timeout: float = DEFAULT_TIMEOUT, resources: dict | None = None) -> None:
    """A worker writes a tiny object under ``_pagecube/``; the client must read it back, then deletes it."""
    from cluster import ClusterError, run_probe

    client = handle.client
    if client is None:
        return
    token = uuid.uuid4().hex
    name = f"probe-{token}"
    try:
        worker = run_probe(client, _write_probe, loc.url, loc.storage_options, name, token, timeout=timeout,
                           resources=resources, what=f"writing to store {loc}")
    except ClusterError as exc:
        raise PreflightError(f"store {loc} is not writable from the workers: {exc}") from None
    try:
        seen = loc.fs.cat_file(loc.meta_path(name)).decode(errors="replace")
    except Exception:  # noqa: BLE001 - any failure means the client cannot see the workers' writes
        seen = None
    if seen != token:
        try:
            client.submit(_remove_probe, loc.url, loc.storage_options, name, pure=False).result(timeout=timeout)
        except Exception:  # noqa: BLE001 - best effort
            pass
        raise PreflightError(f"store {loc} is not shared with the workers: worker {worker} wrote a probe there that "
                             "this machine cannot read; use a path every machine sees (shared filesystem) or an "
                             "object store URL")
    _remove_probe(loc.url, loc.storage_options, name)
