"""Faults of the world are never failed pages (issue 24, part 1): each test meets a real fault.

A real full tmpfs, a store made read-only mid-build, an S3 server stalled (SIGSTOP) and one that
refuses connections (killed, then started again on the same port), an image bucket taken away and
restored.  Each build stops with exit code 75 and one line naming the store (or image location)
and the cause, marks no page failed, and the same command, once the cause is gone, finishes every
page with exit 0, keeping what was done (``written_at`` unchanged) and equal to a clean build.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

import smalldisk
from faultkit import MODEL, PAGECUBE, ROOT, env, make_pages, read, run, wait_for

STOPPED = 75
VARS = ("status", "page_embeddings", "panel_embeddings", "attention_weights", "reading_order",
        "panel_coordinates", "text_content", "panel_mask", "n_panels", "page_id")
#: tasks give a fault of the world this long before the build stops (the default is minutes)
QUICK = {"PAGECUBE_WORLD_RETRY_S": "1.5", "FAULTKIT_DELAY": "0.15"}
COMMON = ["--cluster", "sync", "--chunk-pages", "8", "--batch-size", "4", "--model", MODEL, "--no-progress"]


def _equal_to(store, clean, rows=None) -> None:
    got, ref = dict(zip(VARS, read(store, *VARS))), dict(zip(VARS, read(clean, *VARS)))
    for name in VARS:
        a, b = (got[name], ref[name]) if rows is None else (got[name][rows], ref[name][rows])
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
        else:
            assert np.array_equal(a, b), name


def _one_stop_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("pagecube:") and "warning" not in ln
             and "Dask" not in ln and "resuming" not in ln and "created store" not in ln
             and "took over" not in ln]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.fixture
def disk(tmp_path):
    why = smalldisk.why_unavailable()
    if why:
        pytest.skip(why)
    with smalldisk.SmallDisk(tmp_path / "disk", size="16m") as d:
        yield d


@pytest.fixture(scope="module")
def clean48(tmp_path_factory):
    """48 pages and their clean in-process build (on the ordinary disk)."""
    tmp = tmp_path_factory.mktemp("clean")
    pages = make_pages(tmp / "s", 48, seed=31)
    clean = tmp / "clean.zarr"
    code, _, err = run("build", pages, "--out", clean, *COMMON)
    assert code == 0, err
    return pages, clean


def _build_on_disk(disk, pages, store, extra_env=None) -> subprocess.Popen:
    return subprocess.Popen(disk.cmd([*PAGECUBE, "build", pages, "--out", store, *COMMON]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env({**QUICK, **(extra_env or {})}))


def _stop_midway(disk, proc, fault) -> tuple[str, str]:
    try:
        wait_for(lambda: disk.count("c.zarr/_pagecube/chunks") >= 2, 90, "two finished chunks", proc)
        fault()
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return out, err


def _status_in(disk, store) -> str:
    got = subprocess.run(disk.cmd([*PAGECUBE, "status", store]), capture_output=True, text=True, cwd=ROOT,
                         env=env(), timeout=60)
    assert got.returncode == 0, got.stderr
    return got.stdout


def _rerun_finishes(disk, pages, store, tmp_path, clean, before) -> None:
    """The same command finishes every page (exit 0), keeping the pages done before the stop."""
    again = subprocess.run(disk.cmd([*PAGECUBE, "build", pages, "--out", store, *COMMON]), capture_output=True,
                           text=True, cwd=ROOT, env=env(QUICK), timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    after = disk.copy_out("c.zarr", tmp_path / "after.zarr")
    status, written = read(after, "status", "written_at")
    assert (status == 1).all()
    done = before["status"] == 1
    assert np.array_equal(written[done], before["written_at"][done]), "pages done before the stop were redone"
    _equal_to(after, clean)
    assert "stopped" not in _status_in(disk, store)
    diag = subprocess.run(disk.cmd([*PAGECUBE, "diagnose", store]), capture_output=True, text=True, cwd=ROOT,
                          env=env(), timeout=120)
    assert diag.returncode == 0 and "ok: no faults found" in diag.stdout, diag.stdout


def test_full_disk_stops_the_build_then_the_same_command_finishes(disk, clean48, tmp_path):
    pages, clean = clean48
    store = disk.mountpoint / "c.zarr"
    proc = _build_on_disk(disk, pages, store)
    out, err = _stop_midway(disk, proc, disk.fill)
    assert proc.returncode == STOPPED, err[-3000:]
    line = _one_stop_line(err)
    m = re.fullmatch(rf"pagecube: the store's disk is full \(No space left on device; store {re.escape(str(store))}\); "
                     r"(\d+) of 48 pages are done and kept; free space and run the same command", line)
    assert m, line
    state = _status_in(disk, store)
    assert "stopped: disk full" in state and "ETA" not in state, state

    disk.free()
    before = dict(zip(("status", "written_at", "error"),
                      read(disk.copy_out("c.zarr", tmp_path / "before.zarr"), "status", "written_at", "error")))
    assert not (before["status"] == 2).any(), set(before["error"])  # no page failed for the world's fault
    assert (before["status"] == 1).sum() == int(m.group(1)) >= 16
    _equal_to(tmp_path / "before.zarr", clean, before["status"] == 1)
    _rerun_finishes(disk, pages, store, tmp_path, clean, before)


def test_store_made_read_only_mid_build(disk, clean48, tmp_path):
    pages, clean = clean48
    store = disk.mountpoint / "c.zarr"
    proc = _build_on_disk(disk, pages, store)
    out, err = _stop_midway(disk, proc, lambda: disk.remount("ro"))
    assert proc.returncode == STOPPED, err[-3000:]
    line = _one_stop_line(err)
    assert re.fullmatch(rf"pagecube: the store is read-only \(Read-only file system; store {re.escape(str(store))}\); "
                        r"\d+ of 48 pages are done and kept; make it writable and run the same command", line), line
    before = dict(zip(("status", "written_at"), read(disk.copy_out("c.zarr", tmp_path / "before.zarr"),
                                                   "status", "written_at")))
    assert not (before["status"] == 2).any()
    assert 16 <= (before["status"] == 1).sum() < 48

    disk.remount("rw")
    _rerun_finishes(disk, pages, store, tmp_path, clean, before)
