"""Conditional writes on the store's filesystem: create-if-absent and replace-if-unchanged.

Why: the writer lock is a lease that several hosts race for.  A check-then-write
lock lets two builds that start in the same instant both win, and a takeover
that deletes then re-creates the lock lets two takers win.  So every change to
the lock object is conditional on what its writer last saw (a *tag*):

- local paths: create by ``os.link`` of a finished temp file (atomic, fails if
  the name exists, never shows a half-written lock); replace under ``flock`` on
  a guard file, comparing the content's digest;
- S3 (s3fs): ``If-None-Match: *`` to create and ``If-Match: <ETag>`` to replace
  or delete, the object store's own compare-and-swap;
- anything else, or an S3-compatible server that ignores those headers
  (checked once per process with a probe): the old unconditional behaviour,
  and ``supports_conditional_writes`` says so, so the build can warn once.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import uuid

from .location import StoreLocation


class Conflict(RuntimeError):
    """The object exists (create) or changed since it was read (replace, delete)."""


_SUPPORT: dict[str, bool] = {}


def _kind(loc: StoreLocation) -> str:
    if loc.is_local:
        return "local"
    return "s3" if loc.url.split("://", 1)[0] in ("s3", "s3a") else "other"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _precondition_failed(exc: BaseException) -> bool:
    cause = exc.__cause__ or exc.__context__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code", "") if cause is not None else ""
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or "pre-condition" in str(exc).lower()


# --- local paths -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _guard(path: str):
    import fcntl

    fd = os.open(f"{path}.guard", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _write_temp(path: str, data: bytes) -> str:
    """A finished temp file beside ``path``; none is left behind when it cannot be written (a full disk)."""
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


# --- the operations ----------------------------------------------------------------------------------------

def read_tagged(loc: StoreLocation, path: str) -> tuple[bytes, str] | None:
    """The object's bytes and its tag, or None when there is none."""
    fs = loc.fs
    try:
        if _kind(loc) != "s3":
            data = fs.cat_file(path)
            return data, _digest(data)
        for _ in range(5):  # ETag read around the content: both belong to one version of the object
            before = fs.info(path).get("ETag")
            data = fs.cat_file(path)
            if fs.info(path).get("ETag") == before:
                return data, before
        raise Conflict(f"{path} keeps changing")
    except (FileNotFoundError, NotADirectoryError):
        return None


def create(loc: StoreLocation, path: str, data: bytes) -> str:
    """Write ``data`` at ``path`` only if nothing is there; returns the new tag, raises Conflict."""
    kind = _kind(loc)
    if kind == "local":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _write_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise Conflict(f"{path} exists") from None
        finally:
            os.unlink(tmp)
        return _digest(data)
    fs = loc.fs
    if kind == "s3" and supports_conditional_writes(loc):
        try:
            return fs.pipe_file(path, data, mode="create")["ETag"]
        except FileExistsError:
            raise Conflict(f"{path} exists") from None
    if fs.exists(path):  # no conditional write on this store: check, then write
        raise Conflict(f"{path} exists")
    fs.pipe_file(path, data)
    return read_tagged(loc, path)[1]


def replace(loc: StoreLocation, path: str, data: bytes, tag: str) -> str:
    """Overwrite ``path`` only if it still has ``tag``; returns the new tag, raises Conflict."""
    kind = _kind(loc)
    if kind == "local":
        with _guard(path):
            try:
                with open(path, "rb") as f:
                    current = _digest(f.read())
            except FileNotFoundError:
                raise Conflict(f"{path} is gone") from None
            if current != tag:
                raise Conflict(f"{path} changed")
            tmp = _write_temp(path, data)
            try:
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        return _digest(data)
    fs = loc.fs
    if kind == "s3" and supports_conditional_writes(loc):
        try:
            return fs.pipe_file(path, data, IfMatch=tag)["ETag"]
        except FileNotFoundError:
            raise Conflict(f"{path} is gone") from None
        except OSError as exc:
            if _precondition_failed(exc):
                raise Conflict(f"{path} changed") from None
            raise
    seen = read_tagged(loc, path)
    if seen is None or seen[1] != tag:
        raise Conflict(f"{path} changed")
    fs.pipe_file(path, data)
    return read_tagged(loc, path)[1]


def delete(loc: StoreLocation, path: str, tag: str) -> None:
    """Remove ``path`` only if it still has ``tag`` (gone already is fine); raises Conflict."""
    kind = _kind(loc)
    if kind == "local":
        with _guard(path):
            try:
                with open(path, "rb") as f:
                    if _digest(f.read()) != tag:
                        raise Conflict(f"{path} changed")
                os.unlink(path)
            except FileNotFoundError:
                pass
        return
    fs = loc.fs
    if kind == "s3" and supports_conditional_writes(loc):
        bucket, key, _ = fs.split_path(path)
        try:
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=tag)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if _precondition_failed(exc):
                raise Conflict(f"{path} changed") from None
            raise
        fs.invalidate_cache(path)
        return
    seen = read_tagged(loc, path)
    if seen is None:
        return
    if seen[1] != tag:
        raise Conflict(f"{path} changed")
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def supports_conditional_writes(loc: StoreLocation) -> bool:
    """Whether creates and replaces on this store are atomic (probed once per process and server)."""
    kind = _kind(loc)
    if kind == "local":
        return True
    if kind != "s3":
        return False
    key = f"{loc.url.split('/')[2]}|{loc.storage_options.get('client_kwargs', {}).get('endpoint_url', '')}" \
        f"|{loc.storage_options.get('endpoint_url', '')}"
    if key not in _SUPPORT:
        _SUPPORT[key] = _probe_s3(loc)
    return _SUPPORT[key]


def _probe_s3(loc: StoreLocation) -> bool:
    """Create a probe object twice with ``If-None-Match: *``: a server that honours it refuses the second."""
    fs = loc.fs
    path = loc.meta_path(f"conditional-probe-{uuid.uuid4().hex[:12]}")
    try:
        fs.pipe_file(path, b"1", mode="create")
        try:
            fs.pipe_file(path, b"2", mode="create")
            return False
        except FileExistsError:
            return True
        except OSError as exc:
            return _precondition_failed(exc)
    except (TypeError, ValueError, NotImplementedError):  # an s3fs without mode="create"
        return False
    finally:
        with contextlib.suppress(Exception):
            fs.rm_file(path)
