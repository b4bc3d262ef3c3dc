"""Faults of the world are never failed pages (issue 24, part 1): each test meets a real fault.

A real full tmpfs, a store made read-only mid-build, an S3 server stalled (SIGSTOP) and one that
refuses connections (killed, then started again on the same port), an image bucket taken away and
restored.  Each build stops with exit code 75 and one line naming the store (or image location)
and the cause, marks no page failed, and the same command, once the cause is gone, finishes every
page with exit 0, keeping what was done (``written_at`` unchanged) and equal to a clean build.
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

import smalldisk
from faultkit import MODEL, PAGECUBE, ROOT, QuickModel, env, index_entries, make_pages, read, run, wait_for
from pipeline.store.location import StoreLocation
from pipeline.store.lock import WriterLock

STOPPED = 75
VARS = ("status", "page_embeddings", "panel_embeddings", "attention_weights", "reading_order",
        "panel_coordinates", "text_content", "panel_mask", "n_panels", "page_id")
#: tasks give a fault of the world this long before the build stops (the default is minutes)
QUICK = {"PAGECUBE_WORLD_RETRY_S": "1.5", "FAULTKIT_DELAY": "0.15", "PAGECUBE_STORE_WRITE_S": "10"}
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
    """The one line that says why the build stopped (others are notes: the store made, the dashboard)."""
    lines = [ln for ln in err.splitlines() if ("run the same command" in ln or "error" in ln.lower())
             and "Dask and its workers logged" not in ln]
    assert len(lines) == 1 and lines[0].startswith("pagecube: ") and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.fixture
def disk(tmp_path):
    why = smalldisk.why_unavailable()
    if why and os.environ.get("PAGECUBE_REQUIRE_TEST_HOSTS") == "1":  # CI: as for the test hosts, no skipping
        pytest.fail(why)
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


def _build_on_disk(disk, pages, store, *extra) -> subprocess.Popen:
    return subprocess.Popen(disk.cmd([*PAGECUBE, "build", pages, "--out", store, *COMMON, *extra]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env(QUICK))


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
    # the live page and diagnose say the same of the stopped store (here its copy)
    from pipeline.diagnose import diagnose
    from pipeline.watch.snapshot import snapshot

    snap = snapshot(tmp_path / "before.zarr")
    # the record's name carries the kind; its body (the cause) only where the full disk still took it
    assert snap["writer"]["state"] == "stopped" and snap["writer"]["text"].startswith("stopped: disk full"), snap
    assert snap["rate"]["eta_s"] is None
    report = diagnose(tmp_path / "before.zarr")
    assert report.ok and any(n.startswith("stopped: disk full") for n in report.notes), report.lines()
    _rerun_finishes(disk, pages, store, tmp_path, clean, before)


def test_a_full_disk_freed_within_the_retry_bound_is_ridden_out(disk, clean48, tmp_path):
    """Tasks retry with backoff: a disk full for a second or two, then freed, costs no page and no stop."""
    import time

    pages, clean = clean48
    store = disk.mountpoint / "c.zarr"
    proc = subprocess.Popen(disk.cmd([*PAGECUBE, "build", pages, "--out", store, *COMMON]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env({**QUICK, "PAGECUBE_WORLD_RETRY_S": "60"}))

    def full_for_a_while():
        disk.fill()
        before = disk.count("c.zarr/_pagecube/chunks")
        time.sleep(3.0)  # the rest would take about 2 s: the build must be held by the full disk
        held = proc.poll() is None and disk.count("c.zarr/_pagecube/chunks") <= before + 1
        disk.free()
        assert held, "the full disk did not hold the build"

    out, err = _stop_midway(disk, proc, full_for_a_while)
    assert proc.returncode == 0, err[-3000:]
    after = disk.copy_out("c.zarr", tmp_path / "after.zarr")
    assert (read(after, "status") == 1).all()
    _equal_to(after, clean)


def test_store_made_read_only_mid_build(disk, clean48, tmp_path):
    """On a local Dask cluster: the task's receipt carries the stop from the worker to the client."""
    pages, clean = clean48
    store = disk.mountpoint / "c.zarr"
    # the later --cluster local wins over COMMON's sync
    proc = _build_on_disk(disk, pages, store, "--cluster", "local", "--workers", "1", "--threads-per-worker", "1")
    out, err = _stop_midway(disk, proc, lambda: disk.remount("ro"))
    assert proc.returncode == STOPPED, err[-3000:]
    assert "Dask dashboard at" in err, err  # a cluster, not in process
    line = _one_stop_line(err)
    assert re.fullmatch(rf"pagecube: the store is read-only \(Read-only file system; store {re.escape(str(store))}\); "
                        r"\d+ of 48 pages are done and kept; make it writable and run the same command", line), line
    before = dict(zip(("status", "written_at"), read(disk.copy_out("c.zarr", tmp_path / "before.zarr"),
                                                   "status", "written_at")))
    assert not (before["status"] == 2).any()
    assert 16 <= (before["status"] == 1).sum() < 48

    disk.remount("rw")
    _rerun_finishes(disk, pages, store, tmp_path, clean, before)


class _RefusingModel(QuickModel):
    """Refused (EACCES) when it prepares page 5: one file of the task that the world will not hand over."""

    def prepare(self, page):
        if page.image_path.endswith("page_00005.jpg"):
            raise PermissionError(errno.EACCES, "Permission denied", page.image_path)
        return super().prepare(page)


def refusing_model(**kwargs):
    return _RefusingModel(12, 16)


def test_a_refused_page_beside_a_missing_one_fails_with_its_own_reason(tmp_path):
    """A page that is missing and a page that is refused, in one task whose other pages read: each fails
    with its own reason (the "not found" check once left the refused page a single letter of another's)."""
    from pipeline.inputs import PageSource
    from pipeline.tasks import run_chunk
    from pipeline.types import ChunkTask, JobSpec

    pages = make_pages(tmp_path / "s", 8, seed=4)
    manifest = pages.parent / "manifests" / "page_00002.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "page_image_path": "../images/nope.jpg"}))
    store = tmp_path / "r.zarr"
    assert run("build", pages, "--out", store, *COMMON, "--init-only")[0] == 0
    with WriterLock(StoreLocation.of(store)) as lock:
        job = JobSpec(store_url=str(store), storage_options={}, run_id=lock.info.run_id, n_pages=8, chunk_pages=8,
                      max_panels=12, embedding_dim=16, embedding_dtype="float32", model_resident="refusing-model",
                      model_factory="test_world_faults:refusing_model", model_kwargs={})
        receipt = run_chunk(ChunkTask(0, 0, 8), PageSource(str(pages)).slice(0, 8), job)
    assert (receipt.done, receipt.failed, receipt.stopped) == (6, 2, None)
    status, error = read(store, "status", "error")
    assert status.tolist() == [1, 1, 2, 1, 1, 2, 1, 1]
    assert error[2].startswith("image not found: ") and error[2].endswith("nope.jpg")
    assert error[5].startswith("PermissionError: [Errno 13] Permission denied"), error[5]


# --- the classification itself ---------------------------------------------------------------------------
def test_classify_tells_the_world_from_the_page():
    import errno

    import s3fs.errors
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    from pipeline.faults import classify
    from pipeline.manifest import PageError

    def s3(code):
        err = ClientError({"Error": {"Code": code, "Message": code}}, "PutObject")
        return s3fs.errors.translate_boto_error(err)

    def page_error_from(cause):
        try:
            try:
                raise cause
            except OSError as exc:
                raise PageError(f"cannot read image x.jpg: {exc}") from None
        except PageError as exc:
            return exc

    kinds = {
        OSError(errno.ENOSPC, "No space left on device"): "disk-full",
        OSError(errno.EROFS, "Read-only file system"): "read-only",
        PermissionError(errno.EACCES, "Permission denied"): "denied",
        OSError(errno.EIO, "Input/output error"): "io-error",
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"): "unreachable",
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"): "unreachable",
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"): "timeout",
        s3("SlowDown"): "throttled",
        s3("503"): "throttled",
        s3("InternalError"): "server-error",
        s3("ExpiredToken"): "denied",
        s3("AccessDenied"): "denied",
        page_error_from(ConnectionResetError(errno.ECONNRESET, "reset")): "unreachable",
    }
    for exc, kind in kinds.items():
        fault = classify(exc)
        assert fault is not None and fault.kind == kind, (exc, fault)
    # the page's own faults, and bugs, are not the world's
    for exc in (FileNotFoundError(errno.ENOENT, "x.jpg"), s3("NoSuchKey"), PageError("manifest is not JSON"),
                page_error_from(FileNotFoundError(errno.ENOENT, "x.jpg")), ValueError("bad"), KeyError("x"),
                RuntimeError("verify: pages [0, 8) read back different page_embeddings")):
        assert classify(exc) is None, exc


# --- S3: a real moto server, stalled, killed and started again, its image bucket taken away ---------------
class Moto:
    """A moto S3 server on 127.0.0.1 that a test can stall (SIGSTOP), kill and start again on its port."""

    def __init__(self, tmp: Path):
        import shutil
        import sys

        from test_s3 import ACCESS_KEY, SECRET_KEY, _clean_env, _free_port

        self.exe = shutil.which("moto_server", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                    os.environ.get("PATH", "")]))
        if self.exe is None:
            pytest.skip("moto_server not installed (pip install 'moto[server]', part of pagecube[test])")
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**_clean_env(tmp), "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                    "AWS_ENDPOINT_URL": self.endpoint}
        self.options = {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": self.endpoint}
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        import socket
        import time

        self.proc = subprocess.Popen([self.exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.1)

    @property
    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options, use_listings_cache=False, skip_instance_cache=True)

    def signal(self, sig) -> None:
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def reset(self) -> None:
        """Every bucket gone at once (moto's reset API): an image bucket taken away."""
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST"),
                               timeout=10).read()


@pytest.fixture
def moto(tmp_path):
    server = Moto(tmp_path)
    try:
        yield server
    finally:
        server.kill()


def _s3_pages(moto, pages: Path, bucket: str, absolute_images: bool = False) -> None:
    """The sample of ``pages`` into ``bucket`` (manifests, images, pages.txt); with ``absolute_images``
    the local manifests name their images as s3:// URLs instead (the pages stay local)."""
    import json

    fs = moto.fs
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    folder = pages.parent
    fs.put(str(folder / "images") + "/", f"{bucket}/images/", recursive=True)
    if absolute_images:
        for m in sorted((folder / "manifests").glob("*.json")):
            data = json.loads(m.read_text())
            data["page_image_path"] = f"s3://{bucket}/images/{Path(data['page_image_path']).name}"
            m.write_text(json.dumps(data))
        return
    fs.put(str(folder / "manifests") + "/", f"{bucket}/manifests/", recursive=True)
    fs.put(str(pages), f"{bucket}/pages.txt")


def _s3_build(moto, pages: str, store: str, *extra, timeout_s: float = 0.5) -> list[str]:
    # short S3 timeouts: a stalled server is noticed in seconds (the defaults take minutes)
    options = {"config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s,
                                 "retries": {"max_attempts": 1}}}
    return [*PAGECUBE, "build", pages, "--out", store, *COMMON, "--storage-options", json.dumps(options), *extra]


def _popen(cmd, moto) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env({**moto.env, **QUICK}))


def _finish(proc, timeout=120) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_write_into_a_stalled_s3_server_ends_within_its_step_bound(moto, monkeypatch):
    """A region whose body a stalled S3 server stops reading (its socket buffers fill) is not bounded by
    the S3 client's read timeout: the write step is, by ``PAGECUBE_STORE_WRITE_S``, and it fails as the
    store timing out (a fault of the world), not as a hang."""
    import time

    from pipeline.faults import classify
    from pipeline.store import Store, StoreConfig

    monkeypatch.setenv("PAGECUBE_STORE_WRITE_S", "3")
    moto.fs.mkdir("cubes")
    options = {**moto.options, "config_kwargs": {"connect_timeout": 0.5, "read_timeout": 0.5,
                                                 "retries": {"max_attempts": 1}}}
    store = Store.open("s3://cubes/big.zarr", options)
    config = StoreConfig(n_pages=8, chunk_pages=8, max_panels=64, embedding_dim=2048, embedding_dtype="float32",
                         model="m", weights_digest="w", input_digest="i")
    store.create(config, {})
    writer = store.writer("run-1")
    rng = np.random.default_rng(0)  # incompressible: 4 MiB of panel embeddings in one chunk
    region = {"panel_embeddings": rng.standard_normal((8, 64, 2048)).astype("float32"),
              "status": np.ones(8, dtype=np.int8)}
    moto.signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"did not take pages \[0, 8\) of panel_embeddings within 3 s") as got:
            writer.write(region, 0, 8, 8)
        assert time.monotonic() - t0 < 10
    finally:
        moto.signal(signal.SIGCONT)
    assert classify(got.value).kind == "timeout"
    assert (writer.read("status", 0, 8) == 0).all()  # status was never written: the pages stay pending


def test_s3_store_stalled_stops_then_resumes(moto, clean48, tmp_path, monkeypatch):
    """The store's S3 server stops answering (SIGSTOP) for longer than the tasks retry: the build stops,
    naming the store; once it answers again the same command finishes every page."""
    pages, clean = clean48
    store = "s3://cubes/stalled.zarr"
    moto.fs.mkdir("cubes")
    cmd = _s3_build(moto, pages, store)
    proc = _popen(cmd, moto)
    paused = False
    try:
        wait_for(lambda: len(moto.fs.ls("cubes/stalled.zarr/_pagecube/chunks")) >= 2
                 if moto.fs.exists("cubes/stalled.zarr/_pagecube/chunks") else False, 90, "two chunks", proc, 0.2)
        moto.signal(signal.SIGSTOP)
        paused = True
        out, err = _finish(proc)
    finally:
        if paused:
            moto.signal(signal.SIGCONT)
    assert proc.returncode == STOPPED, err[-3000:]
    line = _one_stop_line(err)
    assert re.fullmatch(r"pagecube: the store does not answer \(.+; store s3://cubes/stalled\.zarr\); "
                        r"(\d+ of 48 pages are done and kept|the pages done before are kept); "
                        r"run the same command once it answers again", line), line
    status_before, written_before = _s3_arrays(moto, "cubes/stalled.zarr", "status", "written_at")
    assert not (status_before == 2).any()
    assert 16 <= (status_before == 1).sum() < 48

    again = _rerun_in_process(cmd, moto, monkeypatch)
    assert again.returncode == 0, again.stderr[-3000:]
    status, written = _s3_arrays(moto, "cubes/stalled.zarr", "status", "written_at")
    assert (status == 1).all()
    done = status_before == 1
    assert np.array_equal(written[done], written_before[done]), "pages done before the stall were redone"


def _rerun_in_process(cmd: list[str], moto, monkeypatch) -> subprocess.CompletedProcess:
    """The same command again, in this process (no interpreter start), with the build's AWS environment."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in moto.env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec keys instances by arguments, not by the environment
    try:
        code, out, err = run(*cmd[len(PAGECUBE):])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    return subprocess.CompletedProcess(cmd, code, out, err)


def _s3_arrays(moto, root: str, *names):
    import zarr

    g = zarr.open_group(f"s3://{root}", mode="r",
                        storage_options=moto.options, use_consolidated=False)
    return [g[n][:] for n in names]


def _stopped_after_two_chunks(cmd, moto, store, fault) -> str:
    """Run ``cmd``, call ``fault()`` once two chunks are finished; the build must stop (exit 75) with one line."""
    proc = _popen(cmd, moto)
    try:
        wait_for(lambda: len(index_entries(store)) >= 2 if (store / "_pagecube" / "chunks").exists() else False,
                 90, "two chunks", proc)
        fault()
        out, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == STOPPED, err[-3000:]
    return _one_stop_line(err)


def test_s3_pages_refusing_connections_then_back(moto, clean48, tmp_path, monkeypatch):
    """The S3 server that holds the pages is killed mid-build (connections refused): the build stops,
    naming that location; started again on the same port with the pages, the same command finishes."""
    pages, clean = clean48
    _s3_pages(moto, pages, "pages")
    store = tmp_path / "r.zarr"
    cmd = _s3_build(moto, "s3://pages/pages.txt", str(store))
    line = _stopped_after_two_chunks(cmd, moto, store, moto.kill)
    assert re.fullmatch(r"pagecube: the (page list|image location) s3://pages\S* is unreachable \(.+\); "
                        r"\d+ of 48 pages are done and kept; run the same command once it answers again", line), line
    status_before, written_before = read(store, "status", "written_at")
    assert not (status_before == 2).any()
    assert 16 <= (status_before == 1).sum() < 48

    moto.start()  # the same port, an empty server: the pages are put back
    _s3_pages(moto, pages, "pages")
    again = _rerun_in_process(cmd, moto, monkeypatch)
    assert again.returncode == 0, again.stderr[-3000:]
    status, written = read(store, "status", "written_at")
    assert (status == 1).all()
    done = status_before == 1
    assert np.array_equal(written[done], written_before[done])


def test_image_bucket_taken_away_and_restored(moto, tmp_path, monkeypatch):
    """Local manifests whose images are in a bucket; the bucket goes away mid-build: no page fails, the
    build stops naming the image location; restored, the same command finishes.  One image missing from
    a bucket that is there is still a page fault."""
    pages = make_pages(tmp_path / "s", 48, seed=33)
    _s3_pages(moto, pages, "imgs", absolute_images=True)
    moto.fs.rm("imgs/images/page_00003.jpg")  # one image 404: a page fault, as ever
    store = tmp_path / "b.zarr"
    cmd = _s3_build(moto, str(pages), str(store))
    line = _stopped_after_two_chunks(cmd, moto, store, moto.reset)
    assert re.fullmatch(r"pagecube: the image location s3://imgs/images is gone \(the folder or bucket does not "
                        r"exist\) \(image not found: s3://imgs/images/page_\d+\.jpg\); \d+ of 48 pages are done "
                        r"and kept; restore it and run the same command", line), line
    status_before, written_before, error = read(store, "status", "written_at", "error")
    assert np.flatnonzero(status_before == 2).tolist() == [3], set(error)
    assert error[3] == "image not found: s3://imgs/images/page_00003.jpg"

    _s3_pages(moto, pages, "imgs", absolute_images=True)  # restored (page 3's image stays missing)
    moto.fs.rm("imgs/images/page_00003.jpg")
    again = _rerun_in_process(cmd, moto, monkeypatch)
    assert again.returncode == 3, again.stderr[-3000:]
    status, written = read(store, "status", "written_at")
    assert np.flatnonzero(status != 1).tolist() == [3]
    done = status_before == 1
    assert np.array_equal(written[done], written_before[done])


# --- the scheduler lost --------------------------------------------------------------------------------
def test_scheduler_lost_stops_with_one_line_then_a_new_one_finishes(clean48, tmp_path):
    """The build's `dask scheduler` is SIGKILLed mid-build: the futures Dask cancels are never failed
    pages; the build stops within seconds naming the scheduler, and with a new scheduler the same
    command (its new address) finishes every page, keeping what was done."""
    import time

    from test_remote import DaskProcs, _env as dask_env

    pages, clean = clean48
    store = tmp_path / "sched.zarr"
    args = ["--chunk-pages", "8", "--batch-size", "4", "--model", MODEL, "--no-progress"]
    slow = {**dask_env(), "FAULTKIT_DELAY": "0.15"}
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first = DaskProcs(tmp_path / "first")
    try:
        first.add_worker("worker", slow)
        proc = subprocess.Popen([*PAGECUBE, "build", str(pages), "--out", str(store), "--cluster", first.address,
                                 *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env=env())
        try:
            wait_for(lambda: len(index_entries(store)) >= 2 if (store / "_pagecube" / "chunks").exists() else False,
                     120, "two chunks", proc)
            os.killpg(first.procs[0].pid, signal.SIGKILL)  # the scheduler
            t0 = time.monotonic()
            out, err = proc.communicate(timeout=90)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    finally:
        first.stop()
    assert proc.returncode == STOPPED, err[-3000:]
    line = _one_stop_line(err)
    assert re.fullmatch(rf"pagecube: the Dask scheduler {re.escape(first.address)} was lost \(the futures were cancelled: "
                        r"scheduler-connection-lost\); \d+ of 48 pages "
                        r"are done and kept; start a scheduler and workers, and run the same command", line), line
    assert took < 30, f"the stop took {took:.0f} s"
    print(f"the build stopped {took:.1f} s after the scheduler was killed")
    status_before, written_before, error = read(store, "status", "written_at", "error")
    assert not (status_before == 2).any(), set(error)
    assert 16 <= (status_before == 1).sum() < 48
    code, state, _ = run("status", store)
    assert "stopped: scheduler lost" in state and "ETA" not in state, state

    second = DaskProcs(tmp_path / "second")
    try:
        second.add_worker("worker")
        code, _, err = run("build", pages, "--out", store, "--cluster", second.address, *args)
    finally:
        second.stop()
    assert code == 0, err
    status, written = read(store, "status", "written_at")
    assert (status == 1).all()
    done = status_before == 1
    assert np.array_equal(written[done], written_before[done])
    _equal_to(store, clean)
