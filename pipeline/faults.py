"""Faults of the world, told apart from page faults: which exceptions are not the page's, and what to say.

A page fault (a missing or corrupt image, a bad manifest, non-finite outputs) belongs to one page:
the page is failed with its reason.  A fault of the world (the store's disk full, read-only or
refusing access, an I/O error, an object store that answers 5xx, throttles, times out or refuses
connections, the scheduler lost) is not the page's: a task retries it with backoff for at most
``retry_seconds()`` (``PAGECUBE_WORLD_RETRY_S``, default ``DEFAULT_RETRY_S``), then ends without
writing ``status`` for its pages, and the build stops with one line and exit code
``EXIT_STOPPED``.  The same command, once the cause is gone, finishes every page.

``classify(exc)`` is the one place that decides; everything else asks it.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass

from .errors import BuildStopped

#: The build stopped for a fault of the world (sysexits' EX_TEMPFAIL: try again later).
EXIT_STOPPED = BuildStopped.exit_code
RETRY_ENV = "PAGECUBE_WORLD_RETRY_S"
DEFAULT_RETRY_S = 120.0
FIRST_DELAY_S, MAX_DELAY_S = 0.5, 15.0

logger = logging.getLogger("pagecube.faults")

#: kind -> (what the status line says, what the stop line says of a store, the advice)
KINDS = {
    "disk-full": ("disk full", "is full", "free space and run the same command"),
    "read-only": ("read-only", "is read-only", "make it writable and run the same command"),
    "denied": ("access denied", "refuses access (permissions or credentials)",
               "fix the permissions or credentials and run the same command"),
    "io-error": ("I/O error", "gives I/O errors", "check the disk and run the same command"),
    "unreachable": ("unreachable", "is unreachable", "run the same command once it answers again"),
    "timeout": ("timed out", "does not answer", "run the same command once it answers again"),
    "throttled": ("throttled", "throttles requests (SlowDown, 503)", "run the same command later"),
    "server-error": ("server error", "answers with server errors (5xx)", "run the same command later"),
    "gone": ("location gone", "is gone (the folder or bucket does not exist)",
             "restore it and run the same command"),
    "scheduler-lost": ("scheduler lost", "was lost", "start a scheduler and workers, and run the same command"),
}
_ERRNO_KIND = {
    errno.ENOSPC: "disk-full", errno.EDQUOT: "disk-full", errno.EROFS: "read-only",
    errno.EACCES: "denied", errno.EPERM: "denied", errno.EIO: "io-error",
    getattr(errno, "EREMOTEIO", errno.EIO): "server-error", errno.EBUSY: "throttled",
    errno.ECONNREFUSED: "unreachable", errno.ECONNRESET: "unreachable", errno.ECONNABORTED: "unreachable",
    errno.EHOSTUNREACH: "unreachable", errno.ENETUNREACH: "unreachable", errno.ENETDOWN: "unreachable",
    errno.EPIPE: "unreachable", errno.ETIMEDOUT: "timeout",
}
#: exception class names (anywhere in the MRO) from libraries not imported here: botocore, aiohttp,
#: urllib3, distributed
_NAME_KIND = {
    "EndpointConnectionError": "unreachable", "ConnectionClosedError": "unreachable",
    "ClientConnectorError": "unreachable", "ServerDisconnectedError": "unreachable",
    "ClientConnectionError": "unreachable", "NewConnectionError": "unreachable",
    "ConnectTimeoutError": "timeout", "ReadTimeoutError": "timeout", "ServerTimeoutError": "timeout",
    "NoCredentialsError": "denied", "CredentialRetrievalError": "denied",
    "CancelledError": "scheduler-lost", "FutureCancelledError": "scheduler-lost",
    "CommClosedError": "scheduler-lost",
}
_CODE_KIND = {"SlowDown": "throttled", "ServiceUnavailable": "throttled", "Throttling": "throttled",
              "RequestLimitExceeded": "throttled", "InternalError": "server-error",
              "ExpiredToken": "denied", "AccessDenied": "denied", "InvalidAccessKeyId": "denied",
              "SignatureDoesNotMatch": "denied", "RequestTimeout": "timeout"}


@dataclass(frozen=True)
class Fault:
    """A fault of the world: its kind (a key of ``KINDS``) and the cause in one line."""

    kind: str
    cause: str

    @property
    def label(self) -> str:
        return KINDS[self.kind][0]


def _cause(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _s3_code(exc: BaseException) -> str:
    for e in (exc, exc.__cause__, exc.__context__):
        code = getattr(e, "response", None)
        if isinstance(code, dict):
            return str(code.get("Error", {}).get("Code", ""))
    return ""


def classify(exc: BaseException | None) -> Fault | None:
    """The fault of the world ``exc`` is, or None when it may be the page's (or a bug)."""
    seen = 0
    while exc is not None and seen < 4:  # a PageError raised while handling an OSError: look at the OSError
        kind = _kind(exc)
        if kind is not None:
            return Fault(kind, _cause(exc))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _kind(exc: BaseException) -> str | None:
    names = {k.__name__ for k in type(exc).__mro__}
    for name in names:
        if name in _NAME_KIND:
            return _NAME_KIND[name]
    code = _s3_code(exc)
    if code in _CODE_KIND:
        return _CODE_KIND[code]
    if isinstance(exc, FileNotFoundError) or type(exc).__name__ in ("PageError", "LeaseLost"):
        return None
    if isinstance(exc, PermissionError):
        return "denied"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionError):
        return "unreachable"
    if isinstance(exc, OSError) and exc.errno in _ERRNO_KIND:
        return _ERRNO_KIND[exc.errno]
    return None


def retry_seconds() -> float:
    """How long a task keeps retrying a fault of the world before it gives up (``PAGECUBE_WORLD_RETRY_S``)."""
    raw = os.environ.get(RETRY_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_RETRY_S
    except ValueError:
        value = DEFAULT_RETRY_S
    return max(0.0, value)


class WorldStop(Exception):
    """A task (or the build) gave up on a fault of the world: ``where`` is "store", "images", "pages" (the
    page list) or "scheduler", ``location`` names it (a path or URL, never credentials)."""

    def __init__(self, where: str, location: str, kind: str, cause: str):
        super().__init__(where, location, kind, cause)
        self.where, self.location, self.kind, self.cause = where, location, kind, cause

    def __str__(self) -> str:
        return describe(self.where, self.location, self.kind, self.cause)


def describe(where: str, location: str, kind: str, cause: str) -> str:
    """``the store's disk is full (No space left on device; store /data/c.zarr)``."""
    what = KINDS.get(kind, KINDS["io-error"])[1]
    if where == "store":
        subject = "the store's disk" if kind == "disk-full" else "the store"
        return f"{subject} {what} ({cause}; store {location})"
    if kind == "disk-full":
        what = "is on a full disk"
    if where == "scheduler":
        return f"the Dask scheduler {location} {what} ({cause})"
    if where == "pages":
        return f"the page list {location} {what} ({cause})"
    return f"the image location {location} {what} ({cause})"


def advice(kind: str) -> str:
    return KINDS.get(kind, KINDS["io-error"])[2]


class Budget:
    """One task's time for retrying faults of the world, shared by all its steps."""

    def __init__(self, seconds: float | None = None):
        self.seconds = retry_seconds() if seconds is None else seconds
        self.t0 = time.monotonic()
        self.delay = FIRST_DELAY_S

    def wait(self) -> bool:
        """Sleep the next backoff step and return True, or False when the budget would run out."""
        left = self.seconds - (time.monotonic() - self.t0)
        if left <= 0:
            return False
        time.sleep(min(self.delay, left))
        self.delay = min(self.delay * 2, MAX_DELAY_S)
        return True


def retrying(fn, budget: Budget, where: str, location: str):
    """``fn()``, retried with backoff while it meets faults of the world; ``WorldStop`` once the budget is spent."""
    while True:
        try:
            return fn()
        except Exception as exc:
            fault = classify(exc)
            if fault is None:
                raise
            logger.info("pagecube: %s; retrying", describe(where, location, fault.kind, fault.cause))
            if not budget.wait():
                raise WorldStop(where, location, fault.kind, fault.cause) from None


#: How long the client gives each piece of bookkeeping of a stop (counting the pages kept, recording
#: why, releasing the lock) on a store that may not answer: the stop line comes within seconds.
STOP_STEP_S = 5.0


def bounded(fn, seconds: float = STOP_STEP_S):
    """``fn()`` in a daemon thread, waited for ``seconds`` at most; raises ``TimeoutError`` past that
    (the thread is left to end by itself: the process is about to exit)."""
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    t = threading.Thread(target=run, name="pagecube-stop-step", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")
