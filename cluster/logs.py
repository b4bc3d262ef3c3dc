"""Dask's own log lines go to a file while a cluster of ours runs, never to the user's terminal.

Why: the tools built on this report a failure in one line; without this, a
task that fails on a worker prints Dask's multi-line "Compute Failed" block
with a traceback first, and a nanny that cannot start a worker prints its
traceback (ours and the worker processes' both write to stderr).  The caller
prints the file's path when anything was logged.

Worker processes get the file through Dask's own logging configuration
(``DASK_LOGGING``, a ``logging.config.dictConfig`` dict, root logger
included) set as a nanny pre-spawn variable, so it holds before
``distributed`` is imported there; this process's ``distributed`` loggers
are pointed at the same file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass

import dask

ENV = "DASK_LOGGING"
#: The loggers Dask sets up with a stderr handler (``distributed.config``), tornado's, and asyncio's (the
#: event loops are Dask's: e.g. "Task exception was never retrieved" for a gather a client left behind).
LOGGERS = ("distributed", "distributed.client", "distributed.gc", "bokeh", "tornado", "tornado.application",
           "asyncio")


@dataclass
class DaskLog:
    path: str

    def counts(self) -> tuple[int, int]:
        """(errors, warnings) logged so far."""
        try:
            with open(self.path, errors="replace") as f:
                text = f.read()
        except OSError:
            return 0, 0
        levels = re.findall(r" - (ERROR|CRITICAL|WARNING) - ", text)
        return sum(lv != "WARNING" for lv in levels), levels.count("WARNING")

    def summary(self) -> str | None:
        """One line naming the file when Dask logged errors or warnings, else None."""
        errors, warnings = self.counts()
        if not errors and not warnings:
            return None
        what = " and ".join(f"{n} {w}{'s' if n != 1 else ''}" for n, w in ((errors, "error"), (warnings, "warning"))
                            if n)
        return f"Dask and its workers logged {what} (not shown here): {self.path}"


def _stderr_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if isinstance(h, logging.StreamHandler)
            and not isinstance(h, logging.FileHandler) and getattr(h, "stream", None) in (sys.stderr, sys.__stderr__)]


#: (swapped handlers, file handler) of a ``dask_logs_to_file`` that ended with a Ctrl-C.
_LEFT_ON_FILE: list = []


def _restore(entries: list) -> None:
    """Dask's loggers back on the handlers they had before, each file handler closed."""
    while entries:
        swapped, handler = entries.pop()
        for logger, h in swapped:
            logger.removeHandler(handler)
            if h is not None:
                logger.addHandler(h)
        handler.close()


@contextlib.contextmanager
def dask_logs_to_file(prefix: str = "dask-", report=None):
    """Inside: Dask's log records of this process and of workers spawned here go to a temporary file.

    Yields a :class:`DaskLog`.  Afterwards ``report`` (a callable) gets its one-line summary when
    Dask logged errors or warnings; otherwise the file is removed.  After a Ctrl-C (KeyboardInterrupt)
    the file is kept without a summary, and Dask's loggers stay on it until the next call: what Dask
    logs then is the interrupted tasks' noise, or a cluster's threads still starting or closing, and the
    interrupted program's own line must be its last.
    """
    _restore(_LEFT_ON_FILE)
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".log")
    os.close(fd)
    fmt = dask.config.get("distributed.admin.log-format")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(fmt))
    swapped = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for h in _stderr_handlers(logger):
            logger.removeHandler(h)
            logger.addHandler(handler)
            swapped.append((logger, h))
        if not logger.handlers and not logging.getLogger().handlers:  # else stderr, by logging's last resort
            logger.addHandler(handler)
            swapped.append((logger, None))
    config = {"version": 1, "disable_existing_loggers": False,
              "formatters": {"dask": {"format": fmt}},
              "handlers": {"file": {"class": "logging.FileHandler", "filename": path, "formatter": "dask"}},
              "loggers": {name: {"handlers": ["file"], "propagate": False} for name in LOGGERS},
              # everything else a worker logs (the resident plugin, the tasks' own loggers) too
              "root": {"handlers": ["file"], "level": "WARNING"}}
    config["loggers"]["distributed"]["level"] = "INFO"
    config["loggers"]["distributed.client"]["level"] = "WARNING"
    before = os.environ.pop(ENV, None)  # dask prefers a variable already set over the pre-spawn config
    log = DaskLog(path)
    interrupted = False
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{ENV}": repr(config)}):
            yield log
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        # the nanny exported it into this process's environment: later processes must not inherit it
        os.environ.pop(ENV, None)
        if before is not None:
            os.environ[ENV] = before
        if interrupted:
            _LEFT_ON_FILE.append((swapped, handler))
        else:
            _restore([(swapped, handler)])
        line = log.summary()
        if line is None:
            with contextlib.suppress(OSError):
                os.unlink(path)
        elif report is not None and not interrupted:
            report(line)
