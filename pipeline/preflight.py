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
- the store is the same store on every worker as on the client: for a local
  path the client leaves a probe file in the store's folder (or the nearest
  folder that exists) and every worker must read it back and be allowed to
  write there (nothing is written on the workers, and the probe is removed);
  for an object store a worker writes a probe under ``_pagecube/`` that the
  client must read.  A path on the client's own disk, or ``memory://``, fails
  here in seconds rather than after hours of work written where nobody sees it;
- the pages: every worker reads the first page (list, manifest, image) that
  the client can read; pages only the client sees are refused here.  A page
  that no machine can read is not a pre-flight error: it fails with its reason.

The model is loaded on every worker by ``cluster.install_resident``, which
raises with the worker's error; the build turns it into one line.
"""
from __future__ import annotations

import os
import socket
import uuid

from .store import Store

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


def _write_probe(store: Store, token: str) -> str:
    """On a worker: write a probe object under ``_pagecube/``; returns its name."""
    name = f"probe-{token}-{uuid.uuid4().hex[:8]}"
    store.fs.pipe_file(store.location.meta_path(name), token.encode())
    return name


def _remove_probe(store: Store, name: str) -> None:
    try:
        store.fs.rm_file(store.location.meta_path(name))
    except FileNotFoundError:
        pass


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _see_local_probe(folder: str, name: str, token: str) -> str | None:
    """On a worker: None when ``folder`` holds the client's probe and may be written, else why not."""
    host = socket.gethostname()
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            seen = f.read()
    except FileNotFoundError:
        what = "has no folder" if not os.path.isdir(folder) else "has another folder (not the same disk) at"
        return f"host {host} {what} {folder}"
    except OSError as exc:
        return f"host {host} cannot read {folder}: {exc.strerror or exc}"
    if seen != token:
        return f"host {host} has another folder (not the same disk) at {folder}"
    if not os.access(folder, os.W_OK):
        return f"host {host} may not write to {folder}"
    return None


def _check_local_store(client, store: Store) -> None:
    folder = _nearest_existing(store.url)
    if not os.path.isdir(folder):
        raise PreflightError(f"store {store} is not writable from the workers: {folder} is a file, not a folder")
    token = uuid.uuid4().hex
    name = f".pagecube-probe-{token}"
    try:
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(token)
    except OSError as exc:
        raise PreflightError(f"cannot write store {store} here: {exc.strerror or exc}") from None
    try:
        seen = client.run(_see_local_probe, folder, name, token, on_error="return")
    finally:
        os.unlink(os.path.join(folder, name))
    for worker, why in seen.items():
        if why is not None:
            raise PreflightError(f"store {store} is not reachable from the workers: worker {worker} "
                                 f"({_one_line(why)}); use a path every machine sees (a shared filesystem) "
                                 "or an object store URL (s3://...)")


def _read_first_page(first, image_root: str | None, max_panels: int) -> str | None:
    """None when the first page (``first``: its slice of the list) can be read here, else why not."""
    from .manifest import read_page

    try:
        read_page(first.refs()[0], max_panels=max_panels, image_root=image_root,
                  storage_options=first.storage_options)
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        text = str(exc).strip().splitlines()
        return f"{text[0] if text else type(exc).__name__} (on host {socket.gethostname()})"
    return None


def check_pages(handle, source, image_root: str | None, max_panels: int) -> None:
    """Every worker reads the first page that this machine can read (pages only the client sees are refused)."""
    client = handle.client
    first = source.slice(0, 1)  # small: the page list itself never travels
    if client is None or _read_first_page(first, image_root, max_panels) is not None:
        return  # no cluster, or a first page nobody can read: it fails with its reason like any bad page
    seen = client.run(_read_first_page, first, image_root, max_panels, on_error="return")
    for worker, why in seen.items():
        if why is not None:
            raise PreflightError(f"the workers cannot read the pages: worker {worker} could not read the first "
                                 f"page: {_one_line(why)}; put pages and images where every machine sees them "
                                 "(a shared filesystem or an object store)")


def _one_line(why) -> str:
    if isinstance(why, BaseException):
        text = str(why).strip().splitlines()
        return f"{type(why).__name__}: {text[0] if text else ''}"
    return str(why)


def check_store(handle, store: Store) -> None:
    """Every worker sees the same store as this machine (see the module docstring).

    Probes run in the workers' event loops (``client.run``), not as tasks: they
    answer at once even while a worker's threads are busy.
    """
    client = handle.client
    if client is None:
        return
    if store.is_local:
        _check_local_store(client, store)
        return
    token = uuid.uuid4().hex
    written = client.run(_write_probe, store, token, on_error="return")
    try:
        for worker, name in written.items():
            if isinstance(name, BaseException):
                raise PreflightError(f"store {store} is not writable from the workers: worker {worker}: "
                                     f"{_one_line(name)}")
            try:
                seen = store.fs.cat_file(store.location.meta_path(name)).decode(errors="replace")
            except Exception:  # noqa: BLE001 - any failure means this machine cannot see the workers' writes
                seen = None
            if seen != token:
                raise PreflightError(f"store {store} is not shared with the workers: worker {worker} wrote a probe "
                                     "there that this machine cannot read; use a path every machine sees (shared "
                                     "filesystem) or an object store URL")
    finally:
        for worker, name in written.items():
            if isinstance(name, str):
                try:
                    client.run(_remove_probe, store, name, workers=[worker], on_error="ignore")
                except Exception:  # noqa: BLE001 - best effort
                    pass
