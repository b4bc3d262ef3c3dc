"""One writer at a time: a lock object in the store with run id, host, pid and heartbeat.

A lock whose holder is provably gone (same host, process not running) is taken
over at once, so rerunning after a crash just resumes.  A lock from another
host is taken over when its heartbeat is older than ``STALE_AFTER_S``, or when
the user says so (``--take-over-lock``).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from .location import StoreLocation

LOCK_NAME = "lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # another host's lock with no heartbeat for 10 minutes is stale


class StoreLocked(RuntimeError):
    """Another live build holds the store."""


@dataclass
class LockInfo:
    run_id: str
    host: str
    pid: int
    started: float
    heartbeat: float

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return f"run {self.run_id} on host {self.host} (pid {self.pid}), last heartbeat {age:.0f}s ago"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(loc: StoreLocation) -> LockInfo | None:
    try:
        raw = loc.fs.cat_file(loc.meta_path(LOCK_NAME))
        return LockInfo(**json.loads(raw))
    except (FileNotFoundError, NotADirectoryError):  # no lock (or no store folder at all)
        return None
    except (ValueError, TypeError):  # torn or foreign content: treat as stale debris
        return LockInfo("unreadable", "?", -1, 0.0, 0.0)


def holder_is_gone(info: LockInfo, stale_after: float = STALE_AFTER_S) -> str | None:
    """Why the lock may be taken over, or None when its holder may be alive."""
    if info.run_id == "unreadable":
        return "the lock file is unreadable"
    if info.host == socket.gethostname():
        if not _pid_alive(info.pid):
            return f"process {info.pid} on this host is no longer running"
        return None
    age = time.time() - info.heartbeat
    if age > stale_after:
        return f"its heartbeat is {age:.0f}s old (limit {stale_after:.0f}s)"
    return None


def refuse_if_locked(loc: StoreLocation, take_over: bool = False, stale_after: float = STALE_AFTER_S) -> None:
    """Early, read-only check: raise StoreLocked when a live build holds the store."""
    if take_over:
        return
    current = read_lock(loc)
    if current is not None and holder_is_gone(current, stale_after) is None:
        raise StoreLocked(_locked_message(loc, current))


def _locked_message(loc: StoreLocation, holder: LockInfo) -> str:
    return f"store {loc} is locked by {holder.describe()}; wait for it, or pass --take-over-lock if that build is gone"


class WriterLock:
    """Context manager: acquire, keep a heartbeat, release."""

    def __init__(self, loc: StoreLocation, *, take_over: bool = False, stale_after: float = STALE_AFTER_S,
                 heartbeat_s: float = HEARTBEAT_S):
        self.loc = loc
        self.take_over = take_over
        self.stale_after = stale_after
        self.heartbeat_s = heartbeat_s
        now = time.time()
        self.info = LockInfo(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), now, now)
        self.took_over_from: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return self.loc.meta_path(LOCK_NAME)

    def _write(self, exclusive: bool) -> None:
        fs = self.loc.fs
        if self.loc.is_local:
            fs.makedirs(self.loc.meta_path(), exist_ok=True)
        data = json.dumps(asdict(self.info)).encode()
        if exclusive and self.loc.is_local:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        elif self.loc.is_local:
            tmp = f"{self.path}.{self.info.run_id}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        else:
            # Object stores: check-then-write; two builds starting in the same
            # instant are not excluded (documented limitation), later ones are.
            fs.pipe_file(self.path, data)

    def acquire(self) -> "WriterLock":
        for _ in range(3):
            current = read_lock(self.loc)
            if current is not None:
                reason = holder_is_gone(current, self.stale_after)
                if reason is None and not self.take_over:
                    raise StoreLocked(_locked_message(self.loc, current))
                self.took_over_from = f"{current.describe()}: {reason or 'taken over on request'}"
                self.loc.fs.rm_file(self.path)
            try:
                self._write(exclusive=True)
            except FileExistsError:
                continue  # someone raced us: look again
            if not self.loc.is_local:
                time.sleep(0.05)
                mine = read_lock(self.loc)
                if mine is None or mine.run_id != self.info.run_id:
                    raise StoreLocked(f"store {self.loc} was locked by another build at the same moment")
            self._thread = threading.Thread(target=self._beat, name="pagecube-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise StoreLocked(f"could not lock store {self.loc}: another build keeps taking the lock")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = read_lock(self.loc)
            if current is None or current.run_id != self.info.run_id:
                return  # taken over: stop touching it
            self.info.heartbeat = time.time()
            try:
                self._write(exclusive=False)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = read_lock(self.loc)
        if current is not None and current.run_id == self.info.run_id:
            try:
                self.loc.fs.rm_file(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_state(loc: StoreLocation) -> str:
    info = read_lock(loc)
    if info is None:
        return "unlocked"
    gone = holder_is_gone(info)
    started = _dt.datetime.fromtimestamp(info.started, _dt.timezone.utc).isoformat(timespec="seconds")
    return f"locked by {info.describe()}, started {started}" + (f" (stale: {gone})" if gone else "")


# --- running marks: which chunks were being worked on by a process that died -------------------

RUNNING_DIR = "running"


@contextmanager
def running_mark(loc: StoreLocation, chunk: int):
    """A tiny object ``running/<chunk>.<host>.<pid>.<id>`` while a task works on ``chunk``.

    Removed when the task ends in any way a Python process can see (return or exception), so a
    mark that stays behind means the process died while running this chunk: the client counts
    those to tell a task that crashes its workers from an innocent one that only sat beside it.
    """
    name = f"{chunk:09d}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    path = loc.meta_path(RUNNING_DIR, name)
    fs = loc.fs
    try:
        if loc.is_local:
            fs.makedirs(loc.meta_path(RUNNING_DIR), exist_ok=True)
        fs.pipe_file(path, b"")
    except OSError:
        path = None
    try:
        yield
    finally:
        if path is not None:
            try:
                fs.rm_file(path)
            except (FileNotFoundError, OSError):
                pass


def _dead_marks(loc: StoreLocation) -> dict[int, set[str]]:
    """chunk -> the dead processes ("host.pid") that were running it."""
    try:
        names = [n.rsplit("/", 1)[-1] for n in loc.fs.ls(loc.meta_path(RUNNING_DIR), detail=False)]
    except FileNotFoundError:
        return {}
    here = socket.gethostname()
    out: dict[int, set[str]] = {}
    for n in names:
        parts = n.split(".")
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        host, pid = ".".join(parts[1:-2]), parts[-2]
        if host == here and pid.isdigit() and _pid_alive(int(pid)):
            continue  # still running (or ended by an exception a moment ago)
        out.setdefault(int(parts[0]), set()).add(f"{host}.{pid}")
    return out


def deaths_running(loc: StoreLocation, chunk: int) -> int:
    """How many processes died while running ``chunk``, counted only when the blame is clear.

    A worker runs tasks side by side (threads, and tasks that secede), so an innocent chunk can
    share a process with the one that crashes it.  When another chunk was running in every process
    that died running ``chunk`` (and in at least as many), the deaths are not blamed on ``chunk``
    (0 is returned): the client then gives it a fresh try.
    """
    marks = _dead_marks(loc)
    mine = marks.get(chunk, set())
    if any(c != chunk and mine <= theirs for c, theirs in marks.items()):
        return 0
    return len(mine)


def clear_running(loc: StoreLocation, chunk: int | None = None) -> None:
    """Drop the marks of ``chunk`` (all chunks when None; only while holding the writer lock)."""
    try:
        names = loc.fs.ls(loc.meta_path(RUNNING_DIR), detail=False)
    except FileNotFoundError:
        return
    for n in names:
        base = n.rsplit("/", 1)[-1]
        if chunk is None or base.startswith(f"{chunk:09d}."):
            try:
                loc.fs.rm_file(n)
            except FileNotFoundError:
                pass


def running_chunks(loc: StoreLocation) -> set[int]:
    """Chunks with a running mark now (a task working on them, or one whose process died)."""
    try:
        names = loc.fs.ls(loc.meta_path(RUNNING_DIR), detail=False)
    except FileNotFoundError:
        return set()
    out = set()
    for n in names:
        head = n.rsplit("/", 1)[-1].split(".", 1)[0]
        if head.isdigit():
            out.add(int(head))
    return out
