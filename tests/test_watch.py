"""The pagecube page's data and endpoints, without a browser (issue 12).

The snapshot agrees with `pagecube status` and with the store's bookkeeping (index, running
marks); no storage option, credential or environment variable reaches the page; malformed query
strings get 400 and one line, never a traceback; `--serve` binds 127.0.0.1; `--watch` returns when
the build ends.  The page in a real browser: tests/test_watch_browser.py.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import zarr

from conftest import CLI, ROOT, cli_env, run_cli
from pipeline import readers
from pipeline.store import index as chunk_index
from pipeline.store.location import StoreLocation
from pipeline.store.lock import RUNNING_DIR, WriterLock
from pipeline.store.template import StoreConfig, write_template
from pipeline.watch.snapshot import clean_url, snapshot

N, CHUNK = 100, 10
SECRET = "SEKRIT-7f3a"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """100 pages in chunks of 10: chunks 0-5 finished (chunk 2 with 3 missing images, chunk 4 with a bad
    manifest), chunk 6 running, 7-9 pending.  A root attribute holds a secret that must never be shown."""
    path = tmp_path_factory.mktemp("watch") / "s.zarr"
    loc = StoreLocation.of(str(path))
    write_template(loc, StoreConfig(N, CHUNK, 4, 8, "float32", "tiny", "seed:0", "synthetic"),
                   {"title": "t", "inputs": f"s3://user:{SECRET}@bucket/pages.txt?token={SECRET}",
                    "storage_secret": SECRET})
    status = np.zeros(N, np.int8)
    error = np.full(N, "", dtype=object)
    ids = np.array([f"p{i:03d}" for i in range(N)], dtype=object)
    written = np.full(N, np.iinfo(np.int64).min, np.int64)
    status[:60] = 1
    written[:60] = int(time.time() * 1000) - 30_000 + np.arange(60) * 100
    for i, why in {21: "image missing: /data/a/p21.png", 24: "image missing: /data/a/p24.png",
                   27: "image missing: /data/b/p27.png", 41: "manifest invalid: panel 3 has no panel_coords"}.items():
        status[i], error[i] = 2, why
    g = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    g["status"][:] = status
    g["error"][:] = error
    g["page_id"][:] = ids
    g["written_at"][:] = written
    for c in range(6):
        part = status[c * CHUNK:(c + 1) * CHUNK]
        chunk_index.write_entry(loc, chunk_index.ChunkEntry(c, int((part == 1).sum()), int((part == 2).sum())))
    os.makedirs(loc.meta_path(RUNNING_DIR))
    open(loc.meta_path(RUNNING_DIR, "000000006.somehost.123.abcd1234"), "w").close()
    return path


def test_snapshot_agrees_with_status_and_the_store_bookkeeping(store):
    snap = snapshot(str(store))
    st = readers.store_status(str(store))
    assert snap["pages"] == {"total": 100, "done": st.done, "failed": st.failed, "pending": st.pending,
                             "percent": 56.0}
    assert (st.done, st.failed) == (56, 4)
    assert snap["chunks"]["map"] == "2232321000"
    assert snap["chunks"]["counts"] == {"pending": 3, "running": 1, "done": 4, "partly_failed": 2}
    reasons = {r["reason"]: r for r in snap["failures"]["reasons"]}
    assert reasons["image missing: <path>"]["count"] == 3
    assert [p["id"] for p in reasons["image missing: <path>"]["pages"]] == ["p021", "p024", "p027"]
    assert reasons["manifest invalid: panel N has no panel_coords"]["pages"] == [{"page": 41, "id": "p041"}]
    assert sum(snap["rate"]["history"]) * snap["rate"]["bucket_s"] == 60  # every finished page, once
    assert snap["writer"]["state"] == "idle" and snap["rate"]["eta_s"] is None  # nobody builds: no ETA
    assert [p["page"] for p in snap["recent"]][:2] and all(p["id"].startswith("p") for p in snap["recent"])
    assert snap["model"]["model"] == "tiny" and snap["model"]["chunk_pages"] == CHUNK
    assert SECRET not in json.dumps(snap)
    assert snap["model"]["inputs"] == "s3://bucket/pages.txt"


def test_clean_url_drops_credentials_and_queries():
    assert clean_url("s3://key:secret@bucket/x.zarr?sig=1#f") == "s3://bucket/x.zarr"
    assert clean_url("https://h:8080/a") == "https://h:8080/a"
    assert clean_url("/plain/path") == "/plain/path"


def test_page_link_sits_beside_the_dashboard():
    from cluster.http import page_link

    assert page_link("http://127.0.0.1:8787/status", "/pagecube") == "http://127.0.0.1:8787/pagecube"
    assert page_link("https://h/proxy/8787/status", "pagecube") == "https://h/proxy/8787/pagecube"
    assert page_link(None, "/pagecube") is None


@pytest.fixture(scope="module")
def served(store):
    """`pagecube status STORE --serve --port 0` with a secret in its storage options and environment."""
    proc = subprocess.Popen([*CLI, "status", str(store), "--serve", "--port", "0", "--storage-options",
                             json.dumps({"secret": SECRET})], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=cli_env({"AWS_SECRET_ACCESS_KEY": SECRET}), cwd=ROOT)
    try:
        line = proc.stdout.readline()
        m = re.search(r"at (http://127\.0\.0\.1:\d+/pagecube) ", line)
        assert m, line + proc.stdout.read()
        yield m.group(1)
    finally:
        proc.terminate()
        proc.wait(10)


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def test_served_page_and_json_never_show_secrets(served):
    bodies = []
    for path in ("", "/static/page.js", "/static/page.css", "/api/status", "/thumb?page=3&w=120"):
        code, kind, body = _get(served + path)
        assert code == 200, (path, body[:300])
        bodies.append(body)
    assert _get(served + "/thumb?page=3")[1] == "image/jpeg"
    assert all(SECRET.encode() not in b for b in bodies)
    data = json.loads(bodies[3])
    assert data["workers"] is None and data["on_scheduler"] is False and data["pages"]["done"] == 56


@pytest.mark.parametrize("query", [
    "/api/status?x=1", "/api/status?%zz", "/thumb", "/thumb?page=abc", "/thumb?page=%ff", "/thumb?page=-1",
    "/thumb?page=1&page=2", "/thumb?page=100", "/thumb?page=1&w=99999", "/thumb?page=1&w=1e3", "/thumb?page=1&x",
])
def test_malformed_queries_get_400_and_one_line(served, query):
    code, kind, body = _get(served + query)
    assert code == 400, (query, body)
    assert kind.startswith("application/json") and b"Traceback" not in body
    assert list(json.loads(body)) == ["error"]


def test_unknown_paths_and_files_get_404_without_a_traceback(served):
    for path in ("/static/secret.txt", "/static/..%2fweb.py", "/nope"):
        code, _, body = _get(served + path)
        assert code == 404 and b"Traceback" not in body, (path, body)


def test_serve_and_watch_refuse_bad_arguments(store, tmp_path):
    assert "do not go together" in run_cli("status", store, "--serve", "--watch", check=2).stderr
    assert "no pagecube store" in run_cli("status", tmp_path / "none.zarr", "--serve", check=2).stderr


def test_watch_returns_when_the_build_ends(store):
    """--watch keeps going while a live build holds the lock, and prints the final status when it ends."""
    lock = WriterLock(StoreLocation.of(str(store))).acquire()
    try:
        proc = subprocess.Popen([*CLI, "status", str(store), "--watch", "--every", "0.2"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT)
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()
    finally:
        threading.Thread(target=lock.release).start()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "done 56" in out and "failed 4" in out and "pending 40" in out


def test_live_rate_counts_from_the_first_chunk_in_the_window_and_falls_when_stalled():
    from pipeline.store.index import ChunkEntry
    from pipeline.watch.snapshot import live_rate

    now = 1000.0
    # two chunks of 8 finished in the same millisecond: no absurd rate from two stamps
    same = {0: ChunkEntry(0, 8, 0, now - 0.001), 1: ChunkEntry(1, 8, 0, now)}
    assert live_rate(same, now, since=now - 10) == pytest.approx(16 / 10)
    steady = {c: ChunkEntry(c, 10, 0, now - 100 + 10 * c) for c in range(11)}  # 10 pages every 10 s
    assert live_rate(steady, now, since=None) == pytest.approx(1.0)
    assert live_rate(steady, now + 100, since=None) == pytest.approx(10 / 110)  # stalled for 100 s: falls
    assert live_rate({}, now, since=now - 5) is None
