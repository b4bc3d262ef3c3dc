"""Object storage: inputs and the store on s3:// against a real S3 server (moto) on 127.0.0.1.

The server is started by the tests (``moto_server``) and killed by PID at the
end.  Builds run as subprocesses, as a user runs them; credentials come from
the standard AWS environment or from ``--storage-options`` and must never show
up in the store or in what the build prints.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import s3fs

ACCESS_KEY = "AKIAPAGECUBETEST7Q2X"
SECRET_KEY = "pagecube-test-secret-Zq93xKv81"
TESTS = Path(__file__).resolve().parent
PAGECUBE = [sys.executable, "-c", "from pipeline.cli import run; run()"]
N_PAGES = 16


# --- a model that stops after its first batch while a file exists: a build to watch, contest and kill ------
class _HeldModel:
    def __init__(self, inner, hold: str):
        self._inner, self._hold, self._calls = inner, hold, 0
        self.info, self.device = inner.info, inner.device
        self.panel_side = inner.panel_side  # decoded as the inner model wants, so outputs equal its own builds

    def prepare(self, page):
        return self._inner.prepare(page)

    def collate(self, prepared):
        return self._inner.collate(prepared)

    def forward(self, batch):
        self._calls += 1
        while self._calls > 1 and self._hold and os.path.exists(self._hold):
            time.sleep(0.05)
        return self._inner.forward(batch)


def held_tiny(**kwargs):
    """``--model test_s3:held_tiny``: the tiny model; after one batch it waits while PAGECUBE_TEST_HOLD exists."""
    from pipeline.model.tiny import build_tiny

    return _HeldModel(build_tiny(**kwargs), os.environ.get("PAGECUBE_TEST_HOLD", ""))


# --- the server ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(tmp: Path) -> dict:
    """The environment without any AWS settings of the machine running the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_CONFIG_FILE"] = str(tmp / "no-aws-config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp / "no-aws-credentials")
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # no waiting on an instance-metadata service that is not there
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from pipeline.sample import make_sample

    exe = shutil.which("moto_server", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                            os.environ.get("PATH", "")]))
    assert exe is not None, "moto_server not installed (pip install 'moto[server]', part of pagecube[test])"
    tmp = tmp_path_factory.mktemp("s3")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.1)
        fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=endpoint, use_listings_cache=False)
        fs.mkdir("pages")  # buckets, made without a region
        fs.mkdir("cubes")
        make_sample(tmp / "sample", N_PAGES, seed=3)
        fs.put(str(tmp / "sample") + "/", "pages/s/", recursive=True)
        assert len(fs.ls("pages/s/manifests")) == N_PAGES
        env = _clean_env(tmp)
        aws_env = {**env, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                   "AWS_ENDPOINT_URL": endpoint}
        options = {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": endpoint}
        yield SimpleNamespace(endpoint=endpoint, fs=fs, env=env, aws_env=aws_env, options=options, tmp=tmp)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _build_cmd(store: str, *extra: str) -> list[str]:
    return [*PAGECUBE, "build", "s3://pages/s/pages.txt", "--out", store, "--cluster", "sync",
            "--chunk-pages", "4", "--batch-size", "4", "--model", "test_s3:held_tiny", "--no-progress", *extra]


def _status(fs, root: str) -> np.ndarray:
    import xarray as xr

    ds = xr.open_zarr(fs.get_mapper(root), consolidated=True)
    return ds["status"].values, ds


def _no_secrets(texts: list[str], fs, root: str) -> None:
    for text in texts:
        assert SECRET_KEY not in text and ACCESS_KEY not in text, text[-2000:]
    objects = fs.find(root)
    assert any(o.endswith("zarr.json") for o in objects)
    for obj in objects:
        raw = fs.cat_file(obj)
        assert SECRET_KEY.encode() not in raw and ACCESS_KEY.encode() not in raw, obj


READER = r"""
import sys, time, numpy as np, xarray as xr
store, n = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    try:
        ds = xr.open_zarr(store, consolidated=True)  # a fresh open each look; credentials from the environment
    except Exception:
        time.sleep(0.2); continue
    status = ds["status"].values
    done = np.flatnonzero(status == 1)
    if 0 < len(done) < n:
        emb = ds["page_embeddings"].isel(page=done).values
        assert np.isfinite(emb).all(), "a done page without its embedding"
        print(f"PARTIAL {len(done)} of {n}", flush=True)
        sys.exit(0)
    if len(done) == n:
        print("ALREADY COMPLETE", flush=True); sys.exit(3)
    time.sleep(0.2)
sys.exit(2)
"""


def test_s3_build_partial_reader_lock_kill_resume(s3):
    store, root = "s3://cubes/a.zarr", "cubes/a.zarr"
    hold = s3.tmp / "hold"
    hold.touch()  # the first build writes one chunk, then waits here until killed
    env = {**s3.aws_env, "PAGECUBE_TEST_HOLD": str(hold)}
    first = subprocess.Popen(_build_cmd(store), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = f"{root}/_pagecube/lock.json"
        deadline = time.monotonic() + 60
        while not s3.fs.exists(lock):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first build never took the lock"
            time.sleep(0.2)

        # while the first build holds the lock: a second build is refused, a reader sees partial progress
        second = subprocess.Popen(_build_cmd(store), env=s3.aws_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        reader = subprocess.run([sys.executable, "-c", READER, store, str(N_PAGES)], env=s3.aws_env,
                                capture_output=True, text=True, timeout=120)
        out2, err2 = second.communicate(timeout=120)
        assert reader.returncode == 0, (reader.stdout, reader.stderr[-2000:])
        assert "PARTIAL" in reader.stdout
        assert second.returncode in (1, 2), (second.returncode, err2[-2000:])
        assert "locked by" in err2, err2[-2000:]
        assert err2.strip().splitlines()[-1].startswith("pagecube: error:")

        assert first.poll() is None, "the first build ended before it could be killed"
        os.kill(first.pid, signal.SIGKILL)
        out1, err1 = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)

    status, ds = _status(s3.fs, root)
    done_before = np.flatnonzero(status == 1)
    assert 0 < len(done_before) < N_PAGES
    stamps_before = ds["written_at"].values[done_before]
    assert s3.fs.exists(f"{root}/_pagecube/lock.json"), "a killed build leaves its lock behind"

    # the same command again resumes: takes over the dead holder's lock, redoes nothing finished
    resumed = subprocess.run(_build_cmd(store), env=s3.aws_env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "took over the store lock" in resumed.stderr, resumed.stderr
    status, ds = _status(s3.fs, root)
    assert (status == 1).all()
    assert np.isfinite(ds["page_embeddings"].values).all()
    np.testing.assert_array_equal(ds["written_at"].values[done_before], stamps_before)
    assert not s3.fs.exists(f"{root}/_pagecube/lock.json")
    assert ds.attrs["pagecube_version"]
    assert str(ds["manifest_path"].values[0]).startswith("s3://pages/s/")

    _no_secrets([out1, err1, out2, err2, resumed.stdout, resumed.stderr, json.dumps(ds.attrs)], s3.fs, root)


def test_s3_storage_options_without_aws_environment(s3, tmp_path):
    """No AWS environment at all: --storage-options carries endpoint and keys to the tasks, status and show."""
    store, root = "s3://cubes/b.zarr", "cubes/b.zarr"
    opts = json.dumps(s3.options)
    cmd = [*PAGECUBE, "build", "s3://pages/s/manifests/page_0000[0-7].json", "--out", store, "--cluster", "sync",
           "--chunk-pages", "4", "--model", "tiny", "--no-progress", "--storage-options", opts]
    built = subprocess.run(cmd, env=s3.env, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr[-3000:]
    assert "8 done, 0 failed" in built.stdout

    status = subprocess.run([*PAGECUBE, "status", store, "--storage-options", opts], env=s3.env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "done 8 (100.0%)" in status.stdout and "unlocked" in status.stdout

    png = tmp_path / "page.png"
    shown = subprocess.run([*PAGECUBE, "show", store, "@3", "-o", str(png), "--storage-options", opts],
                           env=s3.env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    from PIL import Image

    assert Image.open(png).size == Image.open(s3.tmp / "sample" / "images" / "page_00003.jpg").size

    # without the options the same store cannot be reached: one clear line, exit 1
    denied = subprocess.run([*PAGECUBE, "status", store], env=s3.env, capture_output=True, text=True, timeout=60)
    assert denied.returncode == 1 and denied.stderr.startswith("pagecube: error:"), denied.stderr
    bad = subprocess.run([*PAGECUBE, "status", store, "--storage-options", "{not json"], env=s3.env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--storage-options" in bad.stderr

    _no_secrets([built.stdout, built.stderr, status.stdout, shown.stdout, shown.stderr, denied.stderr],
                s3.fs, root)


# --- the lock on an object store: conditional writes, so racing builds cannot both win ---------------------
def _race(acquire, n: int = 6) -> list:
    """Run ``acquire()`` in ``n`` threads released together; returns what each got (a lock or the error)."""
    import threading

    barrier = threading.Barrier(n)
    got: list = [None] * n

    def one(i):
        barrier.wait()
        try:
            got[i] = acquire()
        except Exception as exc:  # noqa: BLE001 - the loser's refusal is the answer
            got[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return got


def test_lock_on_s3_has_exactly_one_winner_every_time(s3):
    from pipeline.store.conditional import supports_conditional_writes
    from pipeline.store.lock import StoreLocked, WriterLock, read_lock
    from pipeline.store.location import StoreLocation

    loc0 = StoreLocation.of("s3://cubes/race-0", s3.options)
    assert supports_conditional_writes(loc0), "moto honours If-None-Match: the atomic path must be used"
    for round_ in range(20):
        loc = StoreLocation.of(f"s3://cubes/race-{round_}", s3.options)
        got = _race(lambda: WriterLock(loc, heartbeat_s=60).acquire())
        winners = [g for g in got if isinstance(g, WriterLock)]
        losers = [g for g in got if isinstance(g, StoreLocked)]
        assert len(winners) == 1 and len(losers) == len(got) - 1, got
        assert read_lock(loc).run_id == winners[0].info.run_id
        winners[0].release()
        assert read_lock(loc) is None


def test_expired_lease_on_s3_is_taken_over_by_one_of_two(s3):
    from pipeline.store.lock import LOCK_NAME, StoreLocked, WriterLock, read_lock
    from pipeline.store.location import StoreLocation

    loc = StoreLocation.of("s3://cubes/expired", s3.options)
    old = time.time() - 100
    s3.fs.pipe_file(loc.meta_path(LOCK_NAME), json.dumps(
        {"run_id": "deadbeef0001", "host": "gone-host", "pid": 7, "started": old, "heartbeat": old,
         "lease_s": 30}).encode())
    got = _race(lambda: WriterLock(loc, heartbeat_s=60).acquire(), n=4)
    winners = [g for g in got if isinstance(g, WriterLock)]
    assert len(winners) == 1, got
    assert "lease expired" in winners[0].took_over_from and "gone-host" in winners[0].took_over_from
    assert all(isinstance(g, StoreLocked) for g in got if g is not winners[0])
    assert read_lock(loc).run_id == winners[0].info.run_id
    winners[0].release()


def test_scan_pages_on_s3_are_decoded_at_the_models_size_as_on_disk(s3):
    """The reduced decode reads the same bytes through fsspec: an s3:// page gives the local page's image."""
    import numpy as np

    from pipeline.images import crop_panels
    from pipeline.inputs import PageSource
    from pipeline.manifest import read_page
    from pipeline.sample import SCAN_SIZE, make_sample

    listing = make_sample(s3.tmp / "scans", 2, seed=4, image_size=SCAN_SIZE, scan=True)
    s3.fs.put(str(listing.parent) + "/", "pages/scans/", recursive=True)
    local = PageSource(str(listing)).slice(0, 2).refs()
    remote = PageSource("s3://pages/scans/pages.txt", storage_options=s3.options).slice(0, 2).refs()
    for a, b in zip(local, remote):
        on_disk = read_page(a, max_panels=12, panel_side=56)
        on_s3 = read_page(b, max_panels=12, panel_side=56, storage_options=s3.options)
        assert on_s3.image_scale == on_disk.image_scale < 1
        assert on_s3.image.size == on_disk.image.size
        np.testing.assert_array_equal(crop_panels(on_s3.rgb(), on_s3.image_boxes(), 64),
                                      crop_panels(on_disk.rgb(), on_disk.image_boxes(), 64))
