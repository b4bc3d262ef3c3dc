"""Real faults (issue 3, parts 1, 2 and 5): worker SIGKILL, a page that kills its worker every time,
client SIGKILL / SIGTERM / SIGINT, malicious checkpoints.  No mocks: processes are really killed."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from faultkit import (MODEL, PAGECUBE, ROOT, communicate_or_stacks, env, index_entries, make_pages, popen_build, read,
                      run, wait_for)

VARS = ("status", "written_at", "page_embeddings", "panel_embeddings", "attention_weights", "reading_order",
        "panel_coordinates", "text_content", "panel_mask", "n_panels", "page_id", "error")


def _entries(store) -> list[str]:
    try:
        return index_entries(store)
    except FileNotFoundError:
        return []


# --- client loss -------------------------------------------------------------------------------

def test_client_sigkill_then_resume_keeps_finished_pages(tmp_path):
    pages = make_pages(tmp_path / "s", 48, seed=21)
    store = tmp_path / "c.zarr"
    args = ["--cluster", "sync", "--chunk-pages", "8", "--batch-size", "4", "--model", MODEL]
    proc = popen_build(pages, store, *args, extra_env={"FAULTKIT_DELAY": "0.3"})
    try:
        wait_for(lambda: len(_entries(store)) >= 2, 90, "two finished chunks", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    status, written = read(store, "status", "written_at")
    done = status == 1
    assert 8 <= done.sum() < 48, "the kill did not land in the middle of the build"
    assert (store / "_pagecube" / "lock.json").exists()  # the dead build's lock is left behind
    # debris a killed writer leaves, in a chunk that is not finished
    first_pending = int(np.flatnonzero(~done)[0]) // 8
    debris = store / "page_embeddings" / "c" / str(first_pending) / ("0." + "0f" * 16 + ".partial")
    debris.parent.mkdir(parents=True, exist_ok=True)
    debris.write_bytes(b"half a chunk")

    code, out, err = run("build", pages, "--out", store, *args, "--no-progress")
    assert code == 0, err
    assert "took over the store lock" in err and "resuming" in err
    status2, written2 = read(store, "status", "written_at")
    assert (status2 == 1).all()
    assert np.array_equal(written2[done], written[done]), "pages finished before the kill were redone"
    assert not debris.exists()
    code, out, _ = run("diagnose", store)
    assert code == 0, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_cleanly(tmp_path, sig):
    pages = make_pages(tmp_path / "s", 32, seed=22)
    store = tmp_path / "t.zarr"
    proc = popen_build(pages, store, "--cluster", "sync", "--chunk-pages", "8", "--batch-size", "4", "--model", MODEL,
                       extra_env={"FAULTKIT_DELAY": "0.3"})
    try:
        wait_for(lambda: len(_entries(store)) >= 1, 90, "a finished chunk", proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Resume with the same command" in err, err
    assert "Traceback" not in err
    assert not (store / "_pagecube" / "lock.json").exists(), "the lock was not released"
    status = read(store, "status")
    assert 0 < (status == 1).sum() < 32


# --- worker loss -------------------------------------------------------------------------------

def test_worker_sigkill_and_a_page_that_kills_every_worker(tmp_path):
    """2 local workers; one is SIGKILLed mid-build, and one page crashes any process that prepares it.

    The build ends (no hang): every page equals a clean in-process build, except the killer page's chunk,
    whose pages are failed with a reason naming the worker deaths.
    """
    pages = make_pages(tmp_path / "s", 48, seed=23)
    killer = json.loads((pages.parent / "manifests" / "page_00044.json").read_text())
    killer["panels"][0]["text"] = {"dialogue": ["KILL-THE-WORKER"]}
    (pages.parent / "manifests" / "page_00044.json").write_text(json.dumps(killer))
    store, clean = tmp_path / "w.zarr", tmp_path / "clean.zarr"
    common = ["--chunk-pages", "8", "--batch-size", "4", "--model", MODEL, "--no-progress"]
    # the clean reference: in this process the kill switch is off
    assert run("build", pages, "--out", clean, "--cluster", "sync", *common)[0] == 0

    piddir = tmp_path / "pids"
    proc = subprocess.Popen([*PAGECUBE, "build", str(pages), "--out", str(store), "--cluster", "local",
                             "--workers", "2", "--threads-per-worker", "1", *common],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env({"FAULTKIT_DELAY": "0.25", "FAULTKIT_PIDDIR": str(piddir),
                                     "FAULTKIT_KILL_TEXT": "KILL-THE-WORKER"}))
    try:
        wait_for(lambda: len(_entries(store)) >= 1, 120, "a finished chunk", proc)
        pids = sorted(int(p.name) for p in piddir.iterdir())
        assert len(pids) >= 2
        os.kill(pids[0], signal.SIGKILL)  # a worker with tasks in flight
        out, err = communicate_or_stacks(proc, 240, piddir)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err[-3000:]
    assert len(list(piddir.iterdir())) >= 4, "workers were not replaced after the kills"
    assert not list((store / "_pagecube" / "running").iterdir()), "running marks left behind"
    got = dict(zip(VARS, read(store, *VARS)))
    ref = dict(zip(VARS, read(clean, *VARS)))
    killer_chunk = np.arange(40, 48)
    others = np.arange(0, 40)
    assert (got["status"][others] == 1).all(), (set(got["error"][others]), err[-4000:])
    assert (got["status"][killer_chunk] == 2).all()
    for reason in got["error"][killer_chunk]:
        # 3 crashes; 4 deaths when the test's own SIGKILL also hit a worker running this chunk
        assert re.search(r"worker processes died [34] times while running pages \[40, 48\)", reason), reason
    for name in VARS:
        if name in ("written_at", "status", "error"):
            continue
        a, b = got[name][others], ref[name][others]
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
        else:
            assert np.array_equal(a, b), name


def test_sigusr1_prints_every_threads_stack_and_the_build_goes_on(tmp_path):
    """``kill -USR1`` on a running build, the client and a local worker: each prints its threads' stacks
    to stderr (where the client waits, what the worker runs), and the build still finishes every page.

    The build is held mid-batch (``FAULTKIT_GATE``) while it is signalled, so both stacks are taken where
    they must be; the two processes are signalled apart, as their dumps share one stderr."""
    pages = make_pages(tmp_path / "s", 32, seed=5)
    store, piddir, gate = tmp_path / "u.zarr", tmp_path / "pids", tmp_path / "gate"
    proc = subprocess.Popen([*PAGECUBE, "build", str(pages), "--out", str(store), "--cluster", "local",
                             "--workers", "2", "--threads-per-worker", "1", "--chunk-pages", "8",
                             "--batch-size", "4", "--model", MODEL, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env({"FAULTKIT_GATE": str(gate), "FAULTKIT_PIDDIR": str(piddir)}))
    running = store / "_pagecube" / "running"
    try:
        wait_for(lambda: running.exists() and len(list(running.iterdir())) >= 2, 120, "both workers' tasks", proc)
        time.sleep(1.0)  # each task reads its first batch, then waits at the gate in forward
        worker = int(sorted(piddir.iterdir())[0].name)
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.5)
        os.kill(worker, signal.SIGUSR1)
        time.sleep(0.5)
        gate.touch()
        out, err = communicate_or_stacks(proc, 120, piddir)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "32 done, 0 failed" in out
    assert err.count("Current thread 0x") == 2, err[-3000:]  # one dump from each process signalled
    # the client's main thread, waiting on its tasks; the worker's, in the process Dask's nanny started,
    # with its task in the model's forward
    assert re.search(r'File ".*pipeline/submit\.py", line \d+ in run\n', err), err[-3000:]
    assert re.search(r'File ".*distributed/process\.py", line \d+ in _run', err), err[-3000:]
    assert re.search(r'File ".*faultkit\.py", line \d+ in forward', err), err[-3000:]
    assert (np.asarray(read(store, "status")[0]) == 1).all()


def test_no_worker_left_stops_the_build_with_one_line_then_resume(tmp_path):
    """A scheduler whose only worker (no nanny: nothing replaces it) is SIGKILLed mid-build.

    The build does not wait for ever: after --no-workers-timeout it stops with one line and exit 1,
    the finished chunks kept, no running mark left, the lock released; with a worker again, the same
    command finishes the rest.
    """
    from test_remote import DaskProcs, _env as dask_env

    pages = make_pages(tmp_path / "s", 48, seed=25)
    store = tmp_path / "n.zarr"
    dask = DaskProcs(tmp_path)
    try:
        slow = {**dask_env(), "FAULTKIT_DELAY": "0.5"}  # 1 s a chunk of 8
        worker = dask._spawn("worker", ["worker", dask.address, "--no-nanny", "--nthreads", "1", "--host",
                                        "127.0.0.1", "--no-dashboard"], slow)
        args = ["--cluster", dask.address, "--chunk-pages", "8", "--batch-size", "4", "--model", MODEL,
                "--no-workers-timeout", "2"]
        proc = popen_build(pages, store, *args)
        try:
            wait_for(lambda: len(_entries(store)) >= 1, 120, "a finished chunk", proc)
            os.killpg(worker.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 1, err
        errors = [ln for ln in err.splitlines() if "error" in ln and "Dask and its workers logged" not in ln]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert re.fullmatch(r"pagecube: error: no Dask worker has been alive for 2 s \(--no-workers-timeout\); "
                            r"stopped with (\d+) of 48 pages unfinished \(finished chunks are kept\); "
                            r"run the same command again to resume",
                            errors[0]), err
        left = int(re.search(r"with (\d+) of", errors[0]).group(1))
        status, written = read(store, "status", "written_at")
        done = status == 1
        assert 8 <= done.sum() < 48 and left == 48 - done.sum(), (done.sum(), left)
        assert done.sum() == 8 * len(_entries(store)), "a finished chunk is not recorded in the index"
        assert not (store / "_pagecube" / "lock.json").exists(), "the lock was not released"
        assert not list((store / "_pagecube" / "running").iterdir()), "running marks left behind"

        dask.add_worker("worker-2")
        code, _, err = run("build", pages, "--out", store, *args, "--no-progress")
        assert code == 0, err
        assert "resuming" in err
        status2, written2 = read(store, "status", "written_at")
        assert (status2 == 1).all()
        assert np.array_equal(written2[done], written[done]), "pages finished before the stop were redone"
    finally:
        dask.stop()


# --- malicious checkpoints ------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoints(tmp_path) -> tuple[list[Path], Path]:
    import pickle

    import torch

    marker = tmp_path / "PAYLOAD_RAN"
    zipped = tmp_path / "evil.pt"
    torch.save({"pool.query": torch.zeros(3), "x": _Evil(marker)}, zipped)  # torch's zip format
    legacy = tmp_path / "evil.pkl"
    legacy.write_bytes(pickle.dumps({"w": _Evil(marker)}))  # a bare pickle
    return [zipped, legacy], marker


def test_malicious_checkpoint_refused_in_process_even_with_force_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    pages = make_pages(tmp_path / "s", 8, seed=24)
    files, marker = _evil_checkpoints(tmp_path)
    for ckpt in files:
        code, out, err = run("build", pages, "--out", tmp_path / f"{ckpt.stem}.zarr", "--cluster", "sync",
                             "--checkpoint", ckpt, "--no-progress")
        assert code == 2, err
        assert "--checkpoint refused" in err and ckpt.name in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not marker.exists(), "the pickle payload ran"
        assert not (tmp_path / f"{ckpt.stem}.zarr").exists()


def test_malicious_checkpoint_on_workers_one_line_no_hang(tmp_path):
    pages = make_pages(tmp_path / "s", 8, seed=25)
    files, marker = _evil_checkpoints(tmp_path)
    proc = subprocess.run([*PAGECUBE, "build", str(pages), "--out", str(tmp_path / "e.zarr"), "--cluster", "local",
                           "--workers", "1", "--checkpoint", str(files[0]), "--no-progress"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=env({"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("pagecube: error:")]
    assert len(errors) == 1 and "--checkpoint refused" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("pagecube: error:")[-1]
    assert not marker.exists(), "the pickle payload ran on a worker"
