"""Why the last build stopped, when a fault of the world stopped it: ``_pagecube/stopped/<kind>``.

One small object, named by the fault's kind (``disk-full``, ``read-only``, ... see
``pipeline.faults.KINDS``) and holding the stop line as JSON.  The name alone carries the kind, so
on a disk too full to take the body an empty object still says "stopped: disk full".  Written by
the build's client as it stops (best effort: a store that refuses every write cannot take it);
removed by the next build once it holds the lock.  ``status``, ``diagnose`` and the live page
read it; root attributes never change for it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from .location import StoreLocation

STOP_DIR = "stopped"


@dataclass(frozen=True)
class StopRecord:
    kind: str
    line: str = ""
    time: float | None = None
    run_id: str = ""

    @property
    def label(self) -> str:
        from ..faults import KINDS

        return KINDS.get(self.kind, (self.kind.replace("-", " "),))[0]

    def describe(self) -> str:
        """``stopped: disk full (the store's disk is full (...)); ...``."""
        return f"stopped: {self.label}" + (f" ({self.line})" if self.line else "")


def record_stop(loc: StoreLocation, kind: str, line: str, run_id: str = "") -> bool:
    """Record why the build stopped; False when the store took nothing (it refuses writes)."""
    body = json.dumps({"kind": kind, "line": line, "time": time.time(), "run_id": run_id}).encode()
    path = loc.meta_path(STOP_DIR, kind)
    fs = loc.fs
    try:
        if loc.is_local:
            fs.makedirs(loc.meta_path(STOP_DIR), exist_ok=True)
        fs.pipe_file(path, body)
        return True
    except Exception:  # noqa: BLE001 - a full disk: the name alone still carries the kind
        pass
    try:
        if loc.is_local:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644))
        else:
            fs.pipe_file(path, b"")
        return True
    except Exception:  # noqa: BLE001 - read-only or unreachable: nothing can be recorded there
        return False


def read_stop(loc: StoreLocation) -> StopRecord | None:
    """The recorded stop, or None (the newest when there are several)."""
    fs = loc.fs
    try:
        names = [n.rsplit("/", 1)[-1] for n in fs.ls(loc.meta_path(STOP_DIR), detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return None
    records = []
    for name in names:
        try:
            data = json.loads(fs.cat_file(loc.meta_path(STOP_DIR, name)) or b"{}")
        except Exception:  # noqa: BLE001 - an empty or torn body: the name is enough
            data = {}
        records.append(StopRecord(name, str(data.get("line", "")), data.get("time"), str(data.get("run_id", ""))))
    if not records:
        return None
    return max(records, key=lambda r: r.time or 0.0)


def clear_stop(loc: StoreLocation) -> None:
    """Forget the last stop (a new build holds the store now)."""
    fs = loc.fs
    try:
        names = fs.ls(loc.meta_path(STOP_DIR), detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return
    for n in names:
        try:
            fs.rm_file(n)
        except FileNotFoundError:
            pass
