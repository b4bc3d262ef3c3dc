"""Builds spread over test hosts (issue 10): own network, hostname and scratch disk per host.

The hosts come from ``testhosts``: ``storage`` runs an S3 server holding pages,
images and stores; ``sched`` runs ``dask scheduler``; ``w1`` and ``w2`` run
``dask worker``; ``pagecube build`` runs on ``client``.  Every store is
compared with a ``--cluster sync`` build of the same pages from S3.
"""
from __future__ import annotations

import datetime as _dt
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from testhosts import ACCESS_KEY, PAGECUBE, SECRET_KEY, page_log, set_model_control

N_PAGES = 40
CHUNK = 4
PAGES = "s3://pages/m/pages.txt"
MODEL = "testhosts:logged_tiny"  # the tiny model; logs which host forwarded each page


@pytest.fixture(scope="module")
def pages(testhosts, tmp_path_factory):
    """N_PAGES small synthetic pages (manifests and images) on the S3 host."""
    from pipeline.sample import make_sample

    local = tmp_path_factory.mktemp("multihost-pages") / "m"
    make_sample(local, N_PAGES, seed=11, image_size=(300, 450))
    fs = testhosts.fs()
    fs.put(str(local) + "/", "pages/m/", recursive=True)
    assert len(fs.ls("pages/m/manifests")) == N_PAGES
    return PAGES


@pytest.fixture(scope="module")
def reference(testhosts, pages):
    """The same pages built with ``--cluster sync`` (in one process on the client host)."""
    out = "s3://cubes/reference-sync.zarr"
    testhosts.client.run([*PAGECUBE, "build", pages, "--out", out, "--cluster", "sync", "--chunk-pages", CHUNK,
                          "--model", "tiny", "--no-progress", "--storage-options", testhosts.storage_options_json],
                         check=0, timeout=300)
    return out


def build_cmd(c, out: str, *extra) -> list:
    return [*PAGECUBE, "build", PAGES, "--out", out, "--cluster", c.scheduler, "--chunk-pages", CHUNK,
            "--batch-size", CHUNK, "--model", MODEL, "--no-progress", "--storage-options", c.storage_options_json,
            *extra]


def open_store(c, url: str):
    import xarray as xr

    return xr.open_zarr(c.fs().get_mapper(url.removeprefix("s3://")), consolidated=True)


def assert_same_store(c, ref: str, out: str) -> None:
    """Values within 1e-5, status, page ids and text equal to the sync build."""
    from pipeline.store.schema import MODEL_VARS, STATUS_DONE

    a, b = open_store(c, ref), open_store(c, out)
    assert (a["status"].values == STATUS_DONE).all()
    np.testing.assert_array_equal(b["status"].values, a["status"].values)
    np.testing.assert_array_equal(b["page_id"].values, a["page_id"].values)
    np.testing.assert_array_equal(b["text_content"].values, a["text_content"].values)
    for name in MODEL_VARS:
        np.testing.assert_allclose(b[name].values.astype(np.float64), a[name].values.astype(np.float64),
                                   atol=1e-5, rtol=0, err_msg=name)


def assert_index_agrees(c, out: str) -> None:
    """The finished-chunk index names every chunk, with the done/failed counts ``status`` holds."""
    from pipeline.store.index import list_entries
    from pipeline.store.location import StoreLocation
    from pipeline.store.schema import STATUS_DONE, STATUS_FAILED

    loc = StoreLocation.of(out, {"key": ACCESS_KEY, "secret": SECRET_KEY, **c.storage_options})
    entries = list_entries(loc)
    status = open_store(c, out)["status"].values
    assert sorted(entries) == list(range(math.ceil(N_PAGES / CHUNK))), sorted(entries)
    for chunk, entry in entries.items():
        part = status[chunk * CHUNK:(chunk + 1) * CHUNK]
        assert (entry.done, entry.failed) == (int((part == STATUS_DONE).sum()), int((part == STATUS_FAILED).sum())), \
            (chunk, entry)


def assert_status_cli(c, out: str) -> None:
    p = c.client.run([*PAGECUBE, "status", out, "--storage-options", c.storage_options_json], check=0, timeout=60)
    assert f"done {N_PAGES} (100.0%)" in p.stdout and "unlocked" in p.stdout, p.stdout


def test_spread_build_equals_sync_build(hosts, reference):
    """Pages, images and store on the S3 host; the client submits to the scheduler host; w1 and w2 compute."""
    c = hosts
    out = "s3://cubes/spread.zarr"
    t0 = time.monotonic()
    p = c.client.run(build_cmd(c, out), check=0, timeout=300)
    took = time.monotonic() - t0
    assert f"{N_PAGES} done, 0 failed" in p.stdout, p.stdout + p.stderr
    assert_same_store(c, reference, out)
    assert_index_agrees(c, out)
    assert_status_cli(c, out)
    by_host = Counter(host for _, host, _, _ in page_log(c))
    assert set(by_host) == {"pc-w1", "pc-w2"}, by_host  # both worker hosts computed, nothing else did
    assert sum(by_host.values()) == N_PAGES, by_host  # each page once
    print(f"\n[multihost] spread build: {N_PAGES} pages in {took:.1f} s, pages per host {dict(by_host)}")


def _one_line(err: str) -> str:
    """The one error line of a refused build (its other lines are the links it prints at start)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not re.match(r"pagecube: .* at https?://", ln)]
    assert len(lines) == 1, err
    return lines[0]


def test_store_or_pages_only_the_client_sees_are_refused(hosts, pages):
    """--out on the client's own /scratch, or images only there: refused by pre-flight in seconds, one line,
    nothing written anywhere (not on the client's disk, not on the workers', not on S3)."""
    c = hosts
    fs = c.fs()
    cubes_before = sorted(fs.ls("cubes", refresh=True))
    c.client.run(["mkdir", "-p", "/scratch/cubes"], check=0)
    t0 = time.monotonic()
    p = c.client.run(build_cmd(c, "/scratch/cubes/cube.zarr"), timeout=120)
    took = time.monotonic() - t0
    assert p.returncode == 1, p.stdout + p.stderr
    line = _one_line(p.stderr)
    assert "store /scratch/cubes/cube.zarr is not reachable from the workers" in line, line
    assert "pc-w1" in line or "pc-w2" in line, line
    assert took < 60, f"refused only after {took:.0f} s"
    for h in (c.client, c.w1, c.w2):
        assert h.run(["sh", "-c", "ls -A /scratch/cubes 2>/dev/null"]).stdout.strip() == "", h
    assert sorted(fs.ls("cubes", refresh=True)) == cubes_before

    # images on the client's scratch disk only: manifests on S3, --image-root a client-only folder
    local = c.shared / "client-images"
    fs.get("pages/m/images/", str(local) + "/", recursive=True)
    c.client.copy_in(local, "/scratch/images")
    p = c.client.run(build_cmd(c, "s3://cubes/images-elsewhere.zarr", "--image-root", "/scratch/images"),
                     timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    line = _one_line(p.stderr)
    assert "the workers cannot read the pages" in line and "image not found: /scratch/images/" in line, line
    assert not fs.exists("cubes/images-elsewhere.zarr")
    print(f"\n[multihost] client-only store refused in {took:.1f} s: {line}")


def test_client_host_dies_mid_build(hosts, reference):
    """The client is killed mid-build.  client2 is refused (naming the holder's host) while the lease is
    live, takes over once it expired, recomputes no finished chunk, and the old run's task still on a
    worker (held back until after the takeover) writes nothing: it is fenced off."""
    import json
    import subprocess

    c = hosts
    out, root = "s3://cubes/lost-client.zarr", "cubes/lost-client.zarr"
    fs = c.fs()
    lease = {"PAGECUBE_LOCK_LEASE_S": "6"}
    chunk0 = f"pagecube-pages-{0:09d}-{CHUNK:09d}"
    set_model_control(c, delay=0.1, hold=str(c.shared / "hold-{host}"), hold_key=chunk0)
    for w in ("pc-w1", "pc-w2"):
        (c.shared / f"hold-{w}").touch()  # chunk 0 is held on whichever worker runs it
    old = c.client.popen(build_cmd(c, out), env=lease, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chunks_dir = f"{root}/_pagecube/chunks"
    _wait(lambda: fs.exists(chunks_dir) and len(fs.ls(chunks_dir, refresh=True)) >= 4
          and any(c.shared.glob("holding-*")), 120, "4 finished chunks and chunk 0 held", old)
    holder_host = next(c.shared.glob("holding-*")).name.removeprefix("holding-")
    c.client.kill()
    old_run = json.loads(fs.cat_file(f"{root}/_pagecube/lock.json"))["run_id"]
    # from now on only the old run's chunk-0 task is held, not the new run's
    set_model_control(c, delay=0.1, hold=str(c.shared / "hold-{host}"), hold_key=f"{chunk0}-{old_run}")
    t_kill = time.time()

    refused = c.client2.run(build_cmd(c, out), timeout=120)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    line = _one_line(refused.stderr)
    assert f"is locked by run {old_run} on host pc-client" in line, line

    while time.time() < t_kill + 7:  # the old lease (6 s) runs out
        time.sleep(0.2)
    # what the old run finished (its tasks in flight when the client died may finish: still its lease then)
    finished = {int(n.rsplit("/", 1)[-1].split(".")[0]) for n in fs.ls(chunks_dir, refresh=True)}
    assert 0 not in finished
    new = c.client2.popen(build_cmd(c, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: json.loads(fs.cat_file(f"{root}/_pagecube/lock.json"))["run_id"] != old_run, 120,
          "client2 to take the lease", new)
    t_takeover = time.time()
    for w in ("pc-w1", "pc-w2"):
        (c.shared / f"hold-{w}").unlink()  # the old run's task goes on, after the takeover
    stdout, stderr = new.communicate(timeout=300)
    assert new.returncode == 0, stdout + stderr
    assert "took over the store lock from run " + old_run in stderr and "lease expired" in stderr, stderr
    assert f"resuming: {len(finished)} of" in stderr, stderr
    worker_log = c[holder_host.removeprefix("pc-")].log_path("worker")
    _wait(lambda: f"run {old_run} no longer holds store" in worker_log.read_text(errors="replace"), 60,
          "the old run's task to be fenced off")

    assert_same_store(c, reference, out)
    assert_index_agrees(c, out)
    assert_status_cli(c, out)
    # no finished chunk was computed again by the new run
    ids = open_store(c, reference)["page_id"].values
    again = {pid for t, _, _, pid in page_log(c) if t > t_takeover}
    redone = sorted(ch for ch in finished if set(ids[ch * CHUNK:(ch + 1) * CHUNK]) & again)
    assert not redone, f"finished chunks {redone} were computed again"
    written = open_store(c, out)["written_at"].values[:CHUNK].astype("datetime64[ms]").astype(np.int64) / 1000
    assert (written >= t_takeover - 1).all() or (written <= t_kill).all()
    print(f"\n[multihost] lost client: {len(finished)} chunks finished before the kill were kept; "
          f"the old run's chunk-0 task on {holder_host} was fenced off")


RACE_ROUNDS = 20
RACER = """
import json, os, sys, time
from pipeline.store.location import StoreLocation
from pipeline.store.lock import StoreLocked, WriterLock
shared, rounds, opts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
for i in range(rounds):
    loc = StoreLocation.of(f"s3://cubes/race-{i}.zarr", opts)
    go = os.path.join(shared, f"go-{i}")
    while not os.path.exists(go):
        time.sleep(0.0005)
    try:
        lock = WriterLock(loc, heartbeat_s=60).acquire()
        print(json.dumps({"round": i, "won": lock.info.run_id}), flush=True)
        time.sleep(0.5)
        lock.release()
    except StoreLocked as exc:
        print(json.dumps({"round": i, "refused": str(exc)}), flush=True)
"""


def test_two_builds_at_the_same_instant_one_wins(hosts, pages):
    """client and client2 race for one S3 store, released together: exactly one proceeds, every time."""
    import json
    import subprocess

    c = hosts
    out = "s3://cubes/race-cli.zarr"
    # the whole command, twice at once: one builds, the other is refused with one line
    go = c.shared / "go-cli"
    wait_go = f"while [ ! -e {go} ]; do sleep 0.001; done; exec \"$@\""
    procs = [h.popen(["sh", "-c", wait_go, "sh", *map(str, build_cmd(c, out, "--init-only"))],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for h in (c.client, c.client2)]
    go.touch()
    results = [p.communicate(timeout=180) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 1], results
    loser = next(r for r in results if r[2] == 1)
    assert "is locked by run" in _one_line(loser[1]), loser[1]

    # the lock itself, RACE_ROUNDS times: both hosts poll for the same go-file, then acquire at once
    racers = [h.popen([sys.executable, "-c", RACER, str(c.shared), str(RACE_ROUNDS), c.storage_options_json],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for h in (c.client, c.client2)]
    for i in range(RACE_ROUNDS):
        time.sleep(0.7 if i else 3.0)  # the racers have started (imports), and the last round is over
        (c.shared / f"go-{i}").touch()
    outs = [p.communicate(timeout=120) for p in racers]
    assert all(p.returncode == 0 for p in racers), outs
    rounds: dict[int, list] = {}
    for stdout, _ in outs:
        for ln in stdout.splitlines():
            r = json.loads(ln)
            rounds.setdefault(r["round"], []).append(r)
    winners = [sum("won" in r for r in rs) for _, rs in sorted(rounds.items())]
    assert len(rounds) == RACE_ROUNDS and all(len(rs) == 2 for rs in rounds.values()), rounds
    assert winners == [1] * RACE_ROUNDS, winners
    assert all("is locked by run" in r["refused"] for rs in rounds.values() for r in rs if "refused" in r)
    print(f"\n[multihost] race: exactly one winner in {RACE_ROUNDS} of {RACE_ROUNDS} rounds (and the CLI round)")


def test_a_lock_from_another_host_is_not_taken_for_a_dead_local_pid(hosts, pages):
    """A lock written on w1 by a process that is gone is not "same host, dead pid" for the client:
    only its lease counts there, so the build is refused naming pc-w1."""
    c = hosts
    out, root = "s3://cubes/w1-lock.zarr", "cubes/w1-lock.zarr"
    c.w1.python("import os, sys, json\n"
                "from pipeline.store.location import StoreLocation\n"
                "from pipeline.store.lock import WriterLock\n"
                f"WriterLock(StoreLocation.of({out!r}, json.loads(sys.argv[1]))).acquire()\n"
                "os._exit(0)  # gone without releasing: its pid is dead everywhere", c.storage_options_json,
                check=0, timeout=60)
    import json

    lock = json.loads(c.fs().cat_file(f"{root}/_pagecube/lock.json"))
    assert lock["host"] == "pc-w1"
    assert not Path(f"/proc/{lock['pid']}").exists(), "the writer of the lock should be gone"
    p = c.client.run(build_cmd(c, out), timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    line = _one_line(p.stderr)
    assert f"is locked by run {lock['run_id']} on host pc-w1 (pid {lock['pid']})" in line, line
    assert not c.fs().exists(f"{root}/zarr.json")


def _removed_at(log_text: str, ip: str) -> float | None:
    """When the scheduler's log says it removed the worker at ``ip`` (epoch seconds)."""
    for line in log_text.splitlines():
        if "Remove worker" in line and ip in line:
            stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
            if stamp:
                return _dt.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def _wait(pred, timeout: float, what: str, proc=None, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the build ended while waiting for {what}: exit {proc.returncode}\n{out}\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step)


def _snapshot(c, out: str) -> dict:
    ds = open_store(c, out)
    return {name: ds[name].values for name in ("status", "written_at", "page_embeddings")} | \
        {"index": sorted(c.fs().ls(f"{out.removeprefix('s3://')}/_pagecube/chunks", refresh=True))}


def test_worker_host_cut_off_mid_build(hosts, reference, record_property):
    """w1's link goes down mid-build, inside a batch, while its process lives: the build finishes on
    w2.  Then the link comes back and w1 is let go: whatever its old task still writes changes nothing."""
    import subprocess

    c = hosts
    out, root = "s3://cubes/cut.zarr", "cubes/cut.zarr"
    fs = c.fs()
    hold = c.shared / "hold-{host}"  # per worker host: batches wait while its file exists
    held = {h: Path(str(hold).format(host=f"pc-{h}")) for h in ("w1", "w2")}
    set_model_control(c, delay=0.2, hold=str(hold))  # 0.2 s a batch: a build long enough to cut into
    build = c.client.popen(build_cmd(c, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # mid-build: a few chunks finished, w1 has computed pages
        chunks_dir = f"{root}/_pagecube/chunks"
        _wait(lambda: fs.exists(chunks_dir) and len(fs.ls(chunks_dir, refresh=True)) >= 3
              and any(h == "pc-w1" for _, h, _, _ in page_log(c)), 120, "3 finished chunks", build)
        for f in held.values():
            f.touch()  # the workers stop inside their next batch: w1 is cut there, mid-task
        _wait(lambda: (c.shared / "holding-pc-w1").exists(), 60, "w1 inside a batch", build)
        t_cut = time.time()
        c.w1.cut()
        held["w2"].unlink()  # w2 carries on; w1 stays inside its batch, cut off
        stdout, stderr = build.communicate(timeout=300)
        t_end = time.time()
    finally:
        if build.poll() is None:
            build.kill()
    assert build.returncode == 0, stdout + stderr
    assert f"{N_PAGES} done, 0 failed" in stdout, stdout + stderr
    assert c.w1.pids(), "w1's processes must have lived through the cut"
    assert (c.shared / "holding-pc-w1").exists(), "w1's old task should still be inside its batch"
    before = _snapshot(c, out)

    # the link comes back and w1's old task goes on: it finishes its batch and may write its region
    moto_log = c.storage.log_path("moto")
    moto_mark = moto_log.stat().st_size
    c.w1.restore()
    t_restore = time.time()
    held["w1"].unlink()

    def w1_requests() -> list[str]:
        with open(moto_log, "rb") as fh:
            fh.seek(moto_mark)
            return [ln for ln in fh.read().decode(errors="replace").splitlines() if ln.startswith(c.w1.ip + " ")]

    last = (len(w1_requests()), time.monotonic())

    def settled() -> bool:  # w1's worker gone (Dask closes a worker its scheduler dropped), or quiet for 8 s
        nonlocal last
        n = len(w1_requests())
        if n != last[0]:
            last = (n, time.monotonic())
        return not c.w1.pids() or time.monotonic() - last[1] > 8

    _wait(settled, 120, "w1 to settle after its link came back", step=0.5)
    late = w1_requests()
    late_writes = [ln for ln in late if '"PUT ' in ln or '"DELETE ' in ln or '"POST ' in ln]
    after = _snapshot(c, out)

    # nothing w1 wrote late changed what matters
    assert_same_store(c, reference, out)
    assert_index_agrees(c, out)
    assert_status_cli(c, out)
    assert after["written_at"].tobytes() == before["written_at"].tobytes(), "w1 rewrote pages after its link came back"
    data_writes = [ln for ln in late_writes if "/_pagecube/running/" not in ln]  # its own running mark may go
    assert not data_writes, data_writes
    np.testing.assert_array_equal(after["status"], before["status"])
    np.testing.assert_array_equal(after["page_embeddings"], before["page_embeddings"])
    assert after["index"] == before["index"]

    # figures
    log = page_log(c)
    counts = Counter(pid for _, _, _, pid in log)
    twice = sorted(p for p, n in counts.items() if n > 1)
    assert set(counts) == set(open_store(c, reference)["page_id"].values.tolist())
    lost = {pid for t, h, _, pid in log if h == "pc-w1" and t >= t_cut}  # w1's held batch, finished late
    assert lost, "w1 should have finished its held batch after the link came back"
    rerun_at = max((t for t, h, _, pid in log if h == "pc-w2" and pid in lost), default=None)
    assert rerun_at is not None and t_cut < rerun_at < t_end, "w1's lost pages were not recomputed on w2"
    removed = _removed_at(c.sched.log_path("scheduler").read_text(errors="replace"), c.w1.ip)
    assert removed is not None and removed > t_cut, "the scheduler never removed the cut-off worker"
    figures = {
        "worker_ttl": c.worker_ttl,
        "notice_s": round(removed - t_cut, 1),  # cut -> the scheduler drops w1
        "rerun_s": round(rerun_at - t_cut, 1),  # cut -> w1's lost pages recomputed on w2
        "finish_after_cut_s": round(t_end - t_cut, 1),
        "pages_computed_twice": len(twice),
        "pages_of_w1_lost_task": len(lost),
        "w1_requests_after_restore": len(late),
        "w1_writes_after_restore": len(late_writes),
        "pages_rewritten_after_restore": int((after["written_at"] != before["written_at"]).sum()),
        "settled_after_restore_s": round(time.time() - t_restore, 1),
        "w1_worker_exited": not c.w1.pids(),
    }
    for k, v in figures.items():
        record_property(k, v)
    print(f"\n[multihost] worker host cut off: {figures}")
