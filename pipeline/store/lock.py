"""One writer at a time: the store's lock is a lease held by one build (run id, host, pid, heartbeat).

The holder renews the lease every few seconds; a lease not renewed for its
length (``PAGECUBE_LOCK_LEASE_S``, default 300 s, recorded in the lock so every
reader uses the holder's own length) has expired and may be taken over.  A
holder on this very host (same hostname, boot and process namespace) whose
process is gone is taken over at once, so rerunning after a crash just
resumes; ``--take-over-lock`` takes a live lease on request.

Every change to the lock object is a conditional write (``conditional.py``):
two builds that start in the same instant, or two that take over the same
expired lease, cannot both win.  Tasks check the lease before they write
(``fence``), so the leftover tasks of a build that lost its lease (a client
that was cut off or died) write nothing after another build took the store.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

from . import conditional
from .location import StoreLocation

LOCK_NAME = "lock.json"
LEASE_ENV = "PAGECUBE_LOCK_LEASE_S"
DEFAULT_LEASE_S = 300.0
LEGACY_LEASE_S = 600.0  # locks written before leases were recorded: their holders renewed every 30 s
HEARTBEAT_S = 30.0
#: A file that every take, renewal, loss and release of a lease is appended to (one JSON line with
#: the run id and the monotonic and wall times around the write): the fault campaign reads it to
#: prove that no two runs ever held the lease at once.  Unset: nothing is written.
LEASE_LOG_ENV = "PAGECUBE_LEASE_LOG"


class StoreLocked(RuntimeError):
    """Another live build holds the store."""


class LeaseLost(RuntimeError):
    """This build no longer holds the store's lease: another build took it over."""


def lease_seconds() -> float:
    raw = os.environ.get(LEASE_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_LEASE_S
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"{LEASE_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def host_identity() -> str:
    """This host as far as "is that pid alive?" can be asked: hostname, boot, process namespace.

    Two machines (or containers) may share a hostname; a pid means something
    only inside one boot and one pid namespace.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return f"{socket.gethostname()}|{boot}|{pidns}"


@dataclass
class LockInfo:
    run_id: str
    host: str
    pid: int
    started: float
    heartbeat: float
    lease_s: float = LEGACY_LEASE_S
    host_id: str = ""

    @classmethod
    def parse(cls, raw: bytes) -> "LockInfo":
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})  # newer writers may add keys

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return f"run {self.run_id} on host {self.host} (pid {self.pid}), last heartbeat {age:.0f}s ago"

    def same_host(self) -> bool:
        if self.host_id:
            return self.host_id == host_identity()
        return self.host == socket.gethostname()  # a lock from before host ids were recorded


UNREADABLE = LockInfo("unreadable", "?", -1, 0.0, 0.0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(loc: StoreLocation) -> tuple[LockInfo, str] | None:
    seen = conditional.read_tagged(loc, loc.meta_path(LOCK_NAME))
    if seen is None:
        return None
    try:
        return LockInfo.parse(seen[0]), seen[1]
    except (ValueError, TypeError):  # foreign content: debris that may be taken over
        return UNREADABLE, seen[1]


def read_lock(loc: StoreLocation) -> LockInfo | None:
    seen = _read(loc)
    return None if seen is None else seen[0]


def holder_is_gone(info: LockInfo) -> str | None:
    """Why the lock may be taken over, or None while its holder's lease is live."""
    if info.run_id == "unreadable":
        return "the lock file is unreadable"
    if info.same_host() and not _pid_alive(info.pid):
        return f"process {info.pid} on this host is no longer running"
    age = time.time() - info.heartbeat
    if age > info.lease_s:
        return f"its lease expired: heartbeat is {age:.0f}s old (lease {info.lease_s:.0f}s)"
    return None


def refuse_if_locked(loc: StoreLocation, take_over: bool = False) -> None:
    """Early, read-only check: raise StoreLocked when a live build holds the store."""
    if take_over:
        return
    current = read_lock(loc)
    if current is not None and holder_is_gone(current) is None:
        raise StoreLocked(_locked_message(loc, current))


def _locked_message(loc: StoreLocation, holder: LockInfo) -> str:
    return f"store {loc} is locked by {holder.describe()}; wait for it, or pass --take-over-lock if that build is gone"


def fence(loc: StoreLocation, run_id: str) -> None:
    """Raise LeaseLost unless run ``run_id`` still holds the store: checked by tasks before they write."""
    current = read_lock(loc)
    if current is None or current.run_id != run_id:
        holder = current.describe() if current is not None else "nobody (the lock was released)"
        msg = f"run {run_id} no longer holds store {loc}: it is held by {holder}; write abandoned"
        logging.getLogger("pagecube.lock").warning("pagecube: %s", msg)  # in the worker's log: who was fenced off
        raise LeaseLost(msg)


def _log_lease(event: str, run_id: str, t0: float) -> None:
    path = os.environ.get(LEASE_LOG_ENV)
    if path:
        line = json.dumps({"event": event, "run": run_id, "t0": t0, "t1": time.monotonic(), "wall": time.time(),
                           "host": socket.gethostname(), "pid": os.getpid()})
        with open(path, "a") as fh:
            fh.write(line + "\n")


class WriterLock:
    """Context manager: acquire the lease, renew it, release it.

    ``lost`` says why the lease was lost (another build took it over), so the
    build can stop; tasks stop themselves through ``fence``.
    """

    def __init__(self, loc: StoreLocation, *, take_over: bool = False, lease_s: float | None = None,
                 heartbeat_s: float | None = None):
        self.loc = loc
        self.take_over = take_over
        lease = lease_s if lease_s is not None else lease_seconds()
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(HEARTBEAT_S, lease / 5)
        now = time.time()
        self.info = LockInfo(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), now, now, lease,
                             host_id=host_identity())
        self.took_over_from: str | None = None
        self.lost: str | None = None
        self._tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return self.loc.meta_path(LOCK_NAME)

    def _data(self) -> bytes:
        return json.dumps(asdict(self.info)).encode()

    def acquire(self) -> "WriterLock":
        forced: str | None = None  # --take-over-lock applies to the holder seen first, not to a racer
        for attempt in range(5):
            t0 = time.monotonic()
            seen = _read(self.loc)
            self.info.heartbeat = time.time()
            try:
                if seen is None:
                    self._tag = conditional.create(self.loc, self.path, self._data())
                else:
                    current, tag = seen
                    if attempt == 0 and self.take_over:
                        forced = current.run_id
                    reason = holder_is_gone(current)
                    if reason is None and current.run_id != forced:
                        raise StoreLocked(_locked_message(self.loc, current))
                    self._tag = conditional.replace(self.loc, self.path, self._data(), tag)
                    self.took_over_from = f"{current.describe()}: {reason or 'taken over on request'}"
            except conditional.Conflict:
                continue  # another build changed the lock between our look and our write: look again
            if not conditional.supports_conditional_writes(self.loc):
                time.sleep(0.05)  # no compare-and-swap here: see whether a racer overwrote us
                mine = read_lock(self.loc)
                if mine is None or mine.run_id != self.info.run_id:
                    raise StoreLocked(f"store {self.loc} was locked by another build at the same moment")
            _log_lease("take", self.info.run_id, t0)
            self._thread = threading.Thread(target=self._beat, name="pagecube-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise StoreLocked(f"could not lock store {self.loc}: another build keeps taking the lock")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.info.heartbeat = time.time()
            t0 = time.monotonic()
            try:
                self._tag = conditional.replace(self.loc, self.path, self._data(), self._tag)
                _log_lease("renew", self.info.run_id, t0)
            except conditional.Conflict:
                seen = _read(self.loc)
                if seen is not None and seen[0].run_id == self.info.run_id:
                    self._tag = seen[1]  # our own lock under another tag (a store without compare-and-swap)
                    continue
                self.lost = seen[0].describe() if seen is not None else "nobody (the lock was removed)"
                _log_lease("lost", self.info.run_id, t0)
                return  # taken over: stop touching it
            except Exception:  # noqa: BLE001 - a network hiccup: try again at the next beat
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:  # a beat stuck on a store that stopped answering is not waited for long:
            self._thread.join(timeout=1)  # after the delete below its conditional renewal cannot succeed
        if self.lost is None and self._tag is not None:
            from ..faults import bounded

            try:  # bounded: a store that stopped answering must not hold the build's exit back
                t0 = time.monotonic()
                bounded(lambda: conditional.delete(self.loc, self.path, self._tag))
                _log_lease("release", self.info.run_id, t0)
            except conditional.Conflict:
                pass  # taken over meanwhile: it is not ours to remove
            except Exception as exc:  # noqa: BLE001 - a store turned read-only or unreachable: the rerun takes the lock over
                logging.getLogger("pagecube.lock").info("pagecube: could not release the lock of %s: %s",
                                                           self.loc, exc)

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
    except Exception:  # noqa: BLE001 - a full disk or an unreachable store: the task's own steps meet it
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
