"""One writer at a time (issue 3, part 3): refusal naming the holder, automatic takeover of a dead holder."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from faultkit import MODEL, make_pages, popen_build, read, run, wait_for
from pipeline.store.location import StoreLocation
from pipeline.store.lock import LOCK_NAME, StoreLocked, WriterLock, read_lock


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(store, **info) -> None:
    d = store / "_pagecube"
    d.mkdir(parents=True, exist_ok=True)
    now = time.time()
    base = {"run_id": "abcdef123456", "host": socket.gethostname(), "pid": 1, "started": now, "heartbeat": now}
    (d / LOCK_NAME).write_text(json.dumps({**base, **info}))


def test_second_build_is_refused_naming_the_holder_and_the_first_is_unaffected(tmp_path):
    pages = make_pages(tmp_path / "s", 32, seed=8)
    store = tmp_path / "l.zarr"
    args = ["--cluster", "sync", "--chunk-pages", "8", "--batch-size", "4", "--model", MODEL]
    gate = tmp_path / "gate"
    first = popen_build(pages, store, *args, extra_env={"FAULTKIT_GATE": str(gate)})  # holds in its first batch
    try:
        wait_for(lambda: (store / "_pagecube" / LOCK_NAME).exists(), 60, "the first build's lock", first)
        holder = read_lock(StoreLocation.of(store))
        code, out, err = run("build", pages, "--out", store, *args, "--no-progress")
        assert code == 1, err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, err
        assert "is locked by run" in lines[0] and f"pid {first.pid}" in lines[0] and holder.run_id in lines[0]
        assert "--take-over-lock" in lines[0]
        assert first.poll() is None, "the refused build disturbed the first one"
        gate.write_text("")
        out1, err1 = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err1[-2000:]
    assert (read(store, "status") == 1).all()
    assert not (store / "_pagecube" / LOCK_NAME).exists(), "the lock was not released"


def test_dead_holder_on_this_host_is_taken_over_automatically(tmp_path):
    pages = make_pages(tmp_path / "s", 16, seed=9)
    store = tmp_path / "d.zarr"
    args = ["--out", store, "--cluster", "sync", "--chunk-pages", "8", "--model", MODEL, "--no-progress"]
    assert run("build", pages, *args, "--init-only")[0] == 0
    _write_lock(store, pid=_dead_pid())
    code, out, err = run("build", pages, *args)
    assert code == 0, err
    assert "took over the store lock" in err and "no longer running" in err
    assert (read(store, "status") == 1).all()
    assert not (store / "_pagecube" / LOCK_NAME).exists()


def test_other_host_lock_stale_after_limit_or_taken_on_request(tmp_path):
    store = tmp_path / "o.zarr"
    loc = StoreLocation.of(store)
    _write_lock(store, host="some-other-host", pid=4242, heartbeat=time.time() - 30)
    with pytest.raises(StoreLocked, match="some-other-host"):
        WriterLock(loc).acquire()
    with WriterLock(loc, take_over=True) as lock:  # --take-over-lock
        assert "taken over on request" in lock.took_over_from
        assert read_lock(loc).run_id == lock.info.run_id
    assert read_lock(loc) is None
    _write_lock(store, host="some-other-host", pid=4242, heartbeat=time.time() - 601)  # limit: 600 s
    with WriterLock(loc) as lock:
        assert "heartbeat is 601s old" in lock.took_over_from


def test_heartbeat_advances_and_stops_when_taken_over(tmp_path):
    store = tmp_path / "h.zarr"
    loc = StoreLocation.of(store)
    lock = WriterLock(loc, heartbeat_s=0.05).acquire()
    try:
        t0 = read_lock(loc).heartbeat
        wait_for(lambda: read_lock(loc).heartbeat > t0, 5, "a heartbeat")
        other = WriterLock(loc, take_over=True).acquire()  # someone takes it over
        time.sleep(0.3)
        assert read_lock(loc).run_id == other.info.run_id, "the old holder overwrote the new lock"
        other.release()
    finally:
        lock.release()
    assert read_lock(loc) is None
