"""The live pagecube page and Dask's own dashboard, checked in headless Chromium (issue 12).

- a build on a remote `dask scheduler` (two `dask worker`s): the page the build prints loads with
  no console errors; mid-build its chunk map has done and pending cells, its counts equal
  `pagecube status` read at the same moment (within one chunk), two screenshots a few seconds
  apart differ, the last one shows 100%; one row per worker; thumbnails load; Dask's /status and
  the fine performance metrics page render (Bokeh installed);
- a LocalCluster build: the same page and Dask's /status render while it runs;
- `pagecube status --serve` on a finished store with failed pages lists them under their reasons;
  40,000 chunks still draw as a readable map (several chunks per cell).

Screenshots go to pytest's temporary folder (or to $PAGECUBE_SCREENSHOTS), never into the repository.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from browser import Watched, browser
from conftest import CLI, ROOT, cli_env, run_cli
from pipeline import readers
from pipeline.store import index as chunk_index
from pipeline.store import Store
from pipeline.store.location import StoreLocation
from pipeline.watch.web import CACHE_S

CHUNK = 4
SLOW = {"PAGECUBE_TEST_DELAY": "2.0"}  # seconds per batch of 4 pages: 64 pages on 2 workers last 16 s or more


def _shot(tmp_path: Path, name: str) -> str:
    folder = Path(os.environ.get("PAGECUBE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / name)


def _start_build(pages, out, *extra, env=None) -> tuple[subprocess.Popen, Path]:
    log = Path(str(out) + ".log")
    with open(log, "w") as f:
        proc = subprocess.Popen([*CLI, "build", str(pages), "--out", str(out), "--chunk-pages", str(CHUNK),
                                 "--batch-size", "4", "--model", "models_for_tests:slow_tiny", *map(str, extra)],
                                stdout=f, stderr=subprocess.STDOUT, env=cli_env({**SLOW, **(env or {})}), cwd=ROOT,
                                start_new_session=True)
    return proc, log


def _wait_for(pred, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def _page_link(proc, log: Path) -> str:
    def link():
        if proc.poll() is not None:
            raise AssertionError(f"build exited early:\n{log.read_text()}")
        m = re.search(r"pagecube page at (http://\S+)", log.read_text())
        return m and m.group(1)
    return _wait_for(link, 90, "the page link in the build's output")


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(5)


def _dask_page_renders(b, url: str) -> None:
    """A Dask dashboard page drawn by Bokeh: canvases, and no 'Dask needs bokeh' notice."""
    w = Watched(b, url)
    try:
        _wait_for(lambda: w.page.locator("canvas").count() > 0, 30, f"a Bokeh canvas on {url}")
        assert "needs bokeh" not in w.page.content().lower()
    finally:
        w.page.close()


@pytest.fixture(scope="module")
def pages64(tmp_path_factory):
    from pipeline.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("watch64"), 64, seed=12)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    from test_remote import DaskProcs, _env

    procs = DaskProcs(tmp_path_factory.mktemp("watch-cluster"))
    try:
        procs.add_worker("worker-a", {**_env(), **SLOW})  # the model's delay is read where it runs
        procs.add_worker("worker-b", {**_env(), **SLOW})
        yield procs
    finally:
        procs.stop()


def test_page_follows_a_build_on_a_remote_scheduler(remote, pages64, tmp_path):
    remote.wait_workers(2)
    out = tmp_path / "remote.zarr"
    proc, log = _start_build(pages64, out, "--cluster", remote.address)
    try:
        url = _page_link(proc, log)
        assert url == f"http://127.0.0.1:{remote.dashboard_port}/pagecube"
        with browser() as b:
            w = Watched(b, url)
            page = w.page
            # mid-build: done and pending chunks, drawn on the map
            _wait_for(lambda: page.evaluate("document.body.dataset.state") == "building"
                      and int(w.text("#c-done")) > 0 and int(w.text("#c-pending")) > 0, 60, "a half-done chunk map")
            assert {"done", "pending"} <= w.map_colours()
            first = page.screenshot(path=_shot(tmp_path, "mid-build-1.png"), full_page=True)
            # Dask's own pages render during the build (Bokeh is installed)
            _dask_page_renders(b, url.replace("/pagecube", "/status"))
            _dask_page_renders(b, url.replace("/pagecube", "/individual-fine-performance-metrics"))
            # a few seconds later, still building, the picture has changed
            w.counts()
            second = page.screenshot(path=_shot(tmp_path, "mid-build-2.png"), full_page=True)
            assert page.evaluate("document.body.dataset.state") == "building" and proc.poll() is None
            assert first != second
            # the DOM's counts against `pagecube status` read just after: never ahead of the store (its
            # snapshot is at most CACHE_S old, and chunks of 4 pages finish many a second), and they add up
            shown = w.counts()
            st = readers.store_status(str(out))
            assert shown["done"] <= st.done and sum(shown.values()) == st.n_pages == 64, (shown, st)
            assert shown["failed"] == st.failed == 0
            before = w.counts()
            cli = run_cli("status", out, check=0).stdout
            time.sleep(CACHE_S + 0.2)  # the page's server keeps its snapshot CACHE_S: read one taken after the CLI's
            after = w.counts()
            cli_done = int(re.search(r"done (\d+)", cli).group(1))
            assert before["done"] - CHUNK <= cli_done <= after["done"] + CHUNK, (before, cli, after)
            # one row per worker, each with its device and memory
            _wait_for(lambda: page.locator("#workers tr").count() == 2, 30, "two worker rows")
            rows = page.locator("#workers tr").all_inner_texts()
            assert all("cpu" in r and "MiB" in r for r in rows), rows
            # the end: 100% done, thumbnails drawn
            assert proc.wait(120) == 0, log.read_text()
            # (a snapshot is reused for a second: one taken before the lock's release may still say building)
            _wait_for(lambda: w.counts() and w.text("#pct") == "100%"
                      and page.evaluate("document.body.dataset.state") == "finished", 30, "100% and finished")
            _wait_for(lambda: w.thumbs_loaded() >= 3, 30, "thumbnails")
            page.screenshot(path=_shot(tmp_path, "final.png"), full_page=True)
            assert w.errors == [], w.errors
    finally:
        _stop(proc)


def test_page_and_dask_dashboard_on_a_local_build(pages64, tmp_path):
    out = tmp_path / "local.zarr"
    proc, log = _start_build(pages64, out, "--workers", "1", "--threads-per-worker", "1",
                             env={"PAGECUBE_TEST_DELAY": "1.0"})
    try:
        url = _page_link(proc, log)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/pagecube", url), url
        assert url.replace("/pagecube", "/status") in log.read_text()  # beside the dashboard link
        with browser() as b:
            w = Watched(b, url)
            _wait_for(lambda: int(w.text("#c-done") or 0) > 0, 60, "a finished chunk on the page")
            assert w.page.locator("#workers tr").count() == 1
            w.page.screenshot(path=_shot(tmp_path, "local.png"), full_page=True)
            _dask_page_renders(b, url.replace("/pagecube", "/status"))
            errors_while_building = list(w.errors)
            assert proc.poll() is None, "the build ended before the checks: make it slower"
            assert errors_while_building == [], errors_while_building
    finally:  # not waited for: stopped like Ctrl-C (its scheduler, and so the page, go with it)
        _stop(proc)


def test_page_shows_the_end_of_a_local_build(pages64, tmp_path):
    """The build's own scheduler serves the page and goes with the build (issue 25): the page's last word is
    FINISHED with the final counts and how to open it again, and its thumbnails are the last finished pages."""
    out = tmp_path / "end.zarr"
    proc, log = _start_build(pages64, out, "--workers", "1", "--threads-per-worker", "1",
                             env={"PAGECUBE_TEST_DELAY": "0.8"})
    try:
        url = _page_link(proc, log)
        with browser() as b:
            w = Watched(b, url)
            page = w.page
            bad = []
            page.on("response", lambda r: bad.append((r.status, r.url, r.text()[:200])) if r.status >= 400 else None)
            assert proc.wait(180) == 0, log.read_text()
            # the build waited for this page to show its end before its server went
            assert page.evaluate("document.body.dataset.state") == "finished", log.read_text()
            assert w.text("#end-state") == "FINISHED"
            assert w.text("#end-counts") == "64 of 64 pages done, none failed."
            assert w.text("#n-done") == "64" and w.text("#pct") == "100%"
            assert w.text("#end-reopen").endswith(f"pagecube status {out} --serve")
            # the thumbnails are those of the final snapshot (the latest finished chunks), all loaded
            final = page.evaluate("window.pagecube.last()")
            assert final["ended"]["state"] == "finished"
            shown = page.evaluate("[...document.querySelectorAll('#thumbs figcaption b')].map(b => b.textContent)")
            assert shown == [p["id"] for p in final["recent"]] and len(shown) == 6, (shown, final["recent"])
            assert w.thumbs_loaded() == 6
            latest = max(chunk_index.list_entries(StoreLocation.of(str(out)), with_times=True).values(),
                         key=lambda e: e.mtime)
            assert any(latest.chunk * CHUNK <= p["page"] < (latest.chunk + 1) * CHUNK for p in final["recent"])
            # the server is gone now; the end stays on the page
            w.page.evaluate("window.pagecube.refresh()")
            _wait_for(lambda: "server has closed" in w.text("#updated"), 10, "the page to notice the server went")
            assert w.text("#end-state") == "FINISHED" and page.locator("#banner").is_hidden()
            page.screenshot(path=_shot(tmp_path, "end.png"), full_page=True)
            assert all("ERR_CONNECTION_REFUSED" in e for e in w.errors), (w.errors, bad)  # the poll after the end
    finally:
        _stop(proc)


def test_page_shows_a_stopped_build_with_its_reason(pages64, tmp_path):
    """``show_the_end`` on a scheduler: it returns once the open page shows the end (0 pages left waiting),
    and the page says STOPPED, why, the counts and how to open it again."""
    from distributed import Client, LocalCluster

    import pipeline
    from pipeline.watch import install_page, show_the_end

    out = tmp_path / "stopped.zarr"
    pipeline.build(str(pages64), str(out), cluster="sync", chunk_pages=CHUNK, model="tiny", progress=False,
                   init_only=True)
    loc = Store.open(str(out))
    with LocalCluster(n_workers=0, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        url = install_page(client, loc, None, client.dashboard_link)
        assert show_the_end(client, loc, "finished") == 0  # no page open: nothing to wait for
        client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins["pagecube-page"].__setattr__(
            "ended", None))  # as a new build on this scheduler would be
        with browser() as b:
            w = Watched(b, url)
            _wait_for(lambda: w.page.evaluate("document.body.dataset.state") == "idle", 30, "the page")
            assert w.page.locator("#end").is_hidden()
            assert show_the_end(client, loc, "stopped", "the store's disk is full (errno 28)") == 0
            assert w.page.evaluate("document.body.dataset.state") == "stopped"
            assert w.text("#end-state") == "STOPPED"
            assert w.text("#end-counts") == "0 of 64 pages done, none failed, 64 pending."
            assert w.text("#end-reason") == "Stopped: the store's disk is full (errno 28)."
            assert w.text("#end-reopen").endswith(f"pagecube status {out} --serve")
            w.page.screenshot(path=_shot(tmp_path, "stopped.png"), full_page=True)
            assert w.errors == [], w.errors


@pytest.fixture(scope="module")
def failed_store(tmp_path_factory):
    """24 pages in chunks of 8, four of them bad (chunks 0 and 1): two missing images, two manifests that are not JSON."""
    import json

    import pipeline
    from pipeline.sample import make_sample

    base = tmp_path_factory.mktemp("watch-failed")
    listing = make_sample(base / "pages", 24, seed=5)

    for i in (3, 5):
        path = listing.parent / f"manifests/page_{i:05d}.json"
        m = json.loads(path.read_text())
        m["page_image_path"] = f"gone/page_{i}.png"
        path.write_text(json.dumps(m))
    for i in (9, 10):
        (listing.parent / f"manifests/page_{i:05d}.json").write_text("{not json")
    out = base / "cube.zarr"
    res = pipeline.build(str(listing), str(out), cluster="sync", chunk_pages=8, model="tiny", progress=False)
    assert (res.done, res.failed) == (20, 4)
    return out


def _serve(store, *extra, env=None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*CLI, "status", str(store), "--serve", "--port", "0", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cli_env(env), cwd=ROOT, start_new_session=True)
    line = proc.stdout.readline()
    m = re.search(r"(http://127\.0\.0\.1:\d+/pagecube)", line)
    if not m:
        _stop(proc)
        raise AssertionError(f"--serve printed: {line}{proc.stdout.read()}")
    return proc, m.group(1)


def test_serve_lists_failed_pages_under_their_reasons(failed_store, tmp_path):
    proc, url = _serve(failed_store)
    try:
        with browser() as b:
            w = Watched(b, url)
            _wait_for(lambda: w.page.locator("#failures tr").count() == 2, 30, "two failure reasons")
            rows = {r.split("\t")[0]: r for r in w.page.locator("#failures tr").all_inner_texts()}
            missing = next(r for k, r in rows.items() if k.startswith("image not found"))
            not_json = next(r for k, r in rows.items() if k.startswith("manifest is not JSON"))
            assert "00003" in missing and "00005" in missing, missing  # page ids (or manifest names)
            assert "page_00009" in not_json and "page_00010" in not_json, not_json
            assert w.text("#n-failed") == "4" and w.text("#pct") == "83.3%"
            assert w.map_colours() == {"done", "failed"}
            assert "Worker rows come from the build's scheduler" in w.text("#no-workers")
            _wait_for(lambda: w.thumbs_loaded() >= 3, 30, "thumbnails")
            w.page.screenshot(path=_shot(tmp_path, "served.png"), full_page=True)
            assert w.errors == [], w.errors
    finally:
        _stop(proc)


def test_chunk_map_stays_readable_at_40000_chunks(tmp_path):
    from pipeline.store import index as chunk_index
    from pipeline.store.location import StoreLocation
    from pipeline.store.template import StoreConfig, write_template

    n_chunks, chunk = 40_000, 256
    loc = StoreLocation.of(str(tmp_path / "big.zarr"))
    write_template(loc, StoreConfig(n_chunks * chunk, chunk, 4, 8, "float32", "tiny", "seed:0", "synthetic"), {})
    folder = Path(loc.meta_path(chunk_index.INDEX_DIR))
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for c in range(25_000):  # the first 25,000 chunks finished, a few with failures
        failed = int(rng.random() < 0.01)
        (folder / chunk_index.ChunkEntry(c, chunk - failed, failed).name).touch()
    proc, url = _serve(loc.url)
    try:
        with browser() as b:
            w = Watched(b, url)
            _wait_for(lambda: w.text("#c-done") not in ("0", "–"), 30, "the chunk map")
            assert w.text("#c-pending") == "15,000"
            scale = w.text("#map-scale")
            assert "40,000 chunks" in scale and "chunks per cell" in scale, scale
            assert w.map_colours() >= {"done", "pending", "failed"}
            height = w.page.evaluate("document.getElementById('map').clientHeight")
            assert 0 < height <= 240
            w.page.screenshot(path=_shot(tmp_path, "big.png"), full_page=True)
            assert w.errors == [], w.errors
    finally:
        _stop(proc)
