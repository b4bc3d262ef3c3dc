"""Watching a build (issue 4): `pagecube status` from the store alone, the client's progress
output, and the scheduler-side page counters behind /metrics.

Builds on real clusters (dashboard link and progress lines in a CLI build's output, the
span's read/inference/write metrics, /metrics values) are in tests/test_remote.py.
"""
from __future__ import annotations

import asyncio
import io
import os
import sys

import numpy as np
import pytest
import zarr

from conftest import run_cli
from pipeline import readers
from pipeline.progress import Progress
from pipeline.store import index as chunk_index
from pipeline.store.location import StoreLocation
from pipeline.store.template import StoreConfig, write_template

N, CHUNK = 100, 10
T0_MS = 1_700_000_000_000  # written_at of page 0; one page every 100 ms after it


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """100 pages in chunks of 10: chunks 0-6 finished (chunk 2: 3 images missing, chunk 5: two bad
    manifests and one missing image), chunks 7-9 pending."""
    path = tmp_path_factory.mktemp("status") / "s.zarr"
    loc = StoreLocation.of(str(path))
    write_template(loc, StoreConfig(N, CHUNK, 4, 8, "float32", "tiny", "seed:0", "synthetic"), {"title": "t"})
    status = np.zeros(N, np.int8)
    error = np.full(N, "", dtype=object)
    written = np.full(N, np.iinfo(np.int64).min, np.int64)
    status[:70] = 1
    written[:70] = T0_MS + np.arange(70) * 100
    for i, why in {21: "image missing: /data/a/p21.png", 24: "image missing: /data/a/p24.png",
                   27: "image missing: s3://bucket/p27.png", 50: "manifest invalid: panel 3 has no panel_coords",
                   51: "manifest invalid: panel 12 has no panel_coords", 58: "image missing: /data/b/p58.png"}.items():
        status[i], error[i] = 2, why
    g = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    g["status"][:] = status
    g["error"][:] = error
    g["written_at"][:] = written
    for c in range(7):
        part = status[c * CHUNK:(c + 1) * CHUNK]
        chunk_index.write_entry(loc, chunk_index.ChunkEntry(c, int((part == 1).sum()), int((part == 2).sum())))
    return path


def test_status_counts_rate_eta_and_reasons(synthetic):
    st = readers.store_status(str(synthetic))
    assert (st.n_pages, st.done, st.failed, st.pending) == (100, 64, 6, 30)
    assert st.pages_per_s == pytest.approx(70 / 6.9, rel=1e-6)  # 70 stamps over 6.9 s of written_at
    assert st.eta_s == pytest.approx(30 / (70 / 6.9), rel=1e-6)
    assert st.failures == {"image missing: <path>": 4, "manifest invalid: panel N has no panel_coords": 2}
    assert (st.failure_chunks, st.failure_chunks_read) == (2, 2)
    text = "\n".join(st.lines())
    assert "done 64" in text and "failed 6" in text and "pending 30" in text and "ETA" in text
    assert "failures by reason:" in text and "image missing: <path>" in text


def test_status_reads_chunks_in_one_selection_and_samples_many_failures(synthetic, monkeypatch):
    calls = []
    real = readers._read_chunks

    def counting(array, chunks, *a):
        calls.append((array.basename, len(chunks)))
        return real(array, chunks, *a)

    monkeypatch.setattr(readers, "_read_chunks", counting)
    readers.store_status(str(synthetic))
    assert sorted(calls) == [("error", 2), ("written_at", 7)]  # not one read per chunk
    calls.clear()
    monkeypatch.setattr(readers, "MAX_REASON_CHUNKS", 1)
    st = readers.store_status(str(synthetic))
    assert ("error", 1) in calls
    assert st.failed == 6  # the total stays exact, from the index
    assert (st.failure_chunks, st.failure_chunks_read) == (2, 1)
    assert sum(st.failures.values()) == 3  # chunk 2's reasons only
    assert "(from 1 of the 2 chunks with failures)" in "\n".join(st.lines())


def test_status_cli_from_the_store_alone(synthetic):
    proc = run_cli("status", synthetic, check=0, timeout=60)
    assert "done 64" in proc.stdout and "failed 6" in proc.stdout and "pending 30" in proc.stdout
    assert "pages/s" in proc.stdout and "ETA" in proc.stdout
    assert "manifest invalid: panel N has no panel_coords" in proc.stdout


_RECORD: list | None = None  # file events seen while a test records them (audit hooks cannot be removed)


def _audit(event, args):
    if _RECORD is not None and event in ("open", "os.scandir", "os.listdir") and args and args[0] is not None:
        path = args[0]
        if not isinstance(path, int):
            _RECORD.append((event, os.path.realpath(os.fsdecode(path))))


def _file_events(fn):
    """(fn's result, the files it opened and the folders it listed), from Python's audit events."""
    global _RECORD
    if not getattr(_file_events, "hooked", False):
        sys.addaudithook(_audit)
        _file_events.hooked = True
    _RECORD = []
    try:
        result = fn()
        return result, _RECORD
    finally:
        _RECORD = None


def test_status_is_fast_on_many_chunks(tmp_path):
    """2x10^5 pages in 782 finished chunks, 200 of them with failures.  What makes it fast is what it
    does not touch: one listing of the chunk index, no read of ``status`` (782 chunk files) nor of
    any index entry, and only the chunks it needs of ``error`` (failure reasons) and ``written_at``
    (the rate).  ``status`` holds the same counts, so only the cost tells the two ways apart."""
    n, chunk = 200_000, 256
    path = tmp_path / "big.zarr"
    loc = StoreLocation.of(str(path))
    write_template(loc, StoreConfig(n, chunk, 4, 8, "float32", "tiny", "seed:0", "synthetic"), {"title": "t"})
    n_chunks = -(-n // chunk)
    status = np.ones(n, np.int8)
    for c in range(n_chunks):
        length = min(chunk, n - c * chunk)
        failed = 1 if c % 4 == 0 and c < 800 else 0
        status[c * chunk: c * chunk + failed] = 2
        chunk_index.write_entry(loc, chunk_index.ChunkEntry(c, length - failed, failed))
    zarr.open_group(str(path), mode="r+", use_consolidated=False)["status"][:] = status

    st, events = _file_events(lambda: readers.store_status(str(path)))
    assert (st.done + st.failed, st.failed) == (n, 196)
    root = os.path.realpath(path)
    index_dir = os.path.join(root, "_pagecube", "chunks")
    listed = [p for e, p in events if e != "open"]
    opened = [p for e, p in events if e == "open" and p.startswith(root + os.sep)]
    assert listed == [index_dir], listed  # one listing, of the index only
    assert not [p for p in opened if p.startswith(index_dir + os.sep)], "read index entries one by one"
    chunks = [os.path.relpath(p, root).split(os.sep) for p in opened if f"{os.sep}c{os.sep}" in p]
    assert not [c for c in chunks if c[0] == "status"], "read status"
    assert {c[0] for c in chunks} <= {"error", "written_at"}, chunks
    with_failures = {c for c in range(n_chunks) if c % 4 == 0 and c < 800}
    error_chunks = [int(c[2]) for c in chunks if c[0] == "error"]
    assert set(error_chunks) <= with_failures and len(error_chunks) <= readers.MAX_REASON_CHUNKS, error_chunks
    assert len([c for c in chunks if c[0] == "written_at"]) <= readers.RATE_WINDOW_CHUNKS


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    p = Progress(10, stream=out, log_every_s=0)
    p.update(4, 0)
    p.update(3, 1)
    p.update(2, 0)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("pages 4/10 (done 4, failed 0)")
    assert lines[-1].startswith("pages 10/10 (done 9, failed 1)") and "pages/s ETA 0s" in lines[-1]
    assert "\x1b[" not in out.getvalue()  # no terminal control codes in logs


def test_progress_bar_on_a_terminal():
    out = _Tty()
    p = Progress(10, stream=out)
    p.update(6, 2)
    p.close()
    text = out.getvalue()
    assert "8/10" in text and "failed 2" in text and "pages/s" in text and "ETA" in text


def test_event_counter_plugin_feeds_prometheus():
    import prometheus_client

    from cluster.metrics import EventCounterPlugin

    plugin = EventCounterPlugin("pagecube", {"done": "d", "failed": "f"}, namespace="pagecube_unittest")
    asyncio.run(plugin.start(None))
    plugin.log_event("pagecube", {"done": 7, "failed": 2, "worker": "tcp://x"})
    plugin.log_event("pagecube", {"done": 3, "failed": 0})
    plugin.log_event("other-topic", {"done": 100})
    assert plugin.totals == {"done": 10, "failed": 2}
    again = EventCounterPlugin("pagecube", {"done": "d"}, namespace="pagecube_unittest")
    asyncio.run(again.start(None))  # a second plugin in the same process reuses the counter
    again.log_event("pagecube", {"done": 1})
    reg = prometheus_client.REGISTRY
    assert reg.get_sample_value("pagecube_unittest_done_total") == 11
    assert reg.get_sample_value("pagecube_unittest_failed_total") == 2
    assert b"pagecube_unittest_done_total 11.0" in prometheus_client.generate_latest()
