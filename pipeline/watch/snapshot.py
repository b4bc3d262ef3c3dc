"""One JSON-ready picture of a store, for the live page: what `pagecube status` says, and more.

Everything comes from the store's own bookkeeping, so the page works on the scheduler, from
``pagecube status --serve`` on another machine, and after the fact: counts and failures from
``readers.store_status`` (and its rate once the build is over); the live rate, the pages/s
history and one state per chunk from the finished-chunk index (entry times) and the running
marks.  One listing of the index per snapshot, shared by all of it.

Safety: storage options, credentials and environment variables never enter a snapshot: the
store's root attributes are copied by an explicit list of keys, and URLs lose any user, password
and query string.
"""
from __future__ import annotations

import time
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..readers import readable_group, store_status
from ..store import Store
from ..store.lock import holder_is_gone
from ..store.schema import STATUS_DONE

#: chunk states in the map string, one character per chunk
PENDING, RUNNING, DONE, PARTLY_FAILED = "0", "1", "2", "3"
HISTORY_BUCKET_S = 5
HISTORY_BUCKETS = 120  # ten minutes
RECENT_PAGES = 6
EXAMPLES_PER_REASON = 3
RATE_WINDOW_S = 120.0
MIN_RATE_SPAN_S = 5.0
#: root attributes the page shows; nothing else of the store's attributes is ever sent
MODEL_KEYS = ("model", "weights_digest", "model_weights_source", "embedding_dim", "embedding_dtype", "max_panels",
              "chunk_pages", "codec", "config_fingerprint", "input_digest", "inputs", "pagecube_version", "created")
URL_KEYS = {"model_weights_source", "inputs"}


def clean_url(text: str) -> str:
    """A path or URL without user, password, query or fragment (where credentials hide)."""
    text = str(text)
    if "://" not in text:
        return text
    parts = urlsplit(text)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _writer(store: Store, pending: int, stopped: str = "") -> dict:
    info = store.holder()
    if stopped and (info is None or holder_is_gone(info)):  # a fault of the world stopped the last build
        return {"state": "stopped", "text": stopped}
    if info is None:
        return {"state": "finished" if pending == 0 else "idle", "text": "no build holds the store"}
    gone = holder_is_gone(info)
    if gone:
        return {"state": "stopped", "text": f"the last build stopped ({gone})"}
    return {"state": "building", "text": f"run {info.run_id} on {info.host} (pid {info.pid})",
            "started": info.started, "heartbeat": info.heartbeat}


def chunk_map(n_chunks: int, entries: dict, running: set[int], chunk_pages: int, n_pages: int) -> tuple[str, dict]:
    """One character per chunk (0 pending, 1 running, 2 done, 3 partly failed) and the counts."""
    cells = np.full(n_chunks, ord(PENDING), dtype=np.uint8)
    for c in running:
        if 0 <= c < n_chunks:
            cells[c] = ord(RUNNING)
    for c, e in entries.items():
        if 0 <= c < n_chunks and c not in running:
            cells[c] = ord(PARTLY_FAILED) if e.failed else ord(DONE)
    text = cells.tobytes().decode("ascii")
    counts = {name: text.count(code) for name, code in
              (("pending", PENDING), ("running", RUNNING), ("done", DONE), ("partly_failed", PARTLY_FAILED))}
    return text, counts


def history(entries: dict, now: float, chunk_pages: int, n_pages: int) -> list[float]:
    """Pages/s in each ``HISTORY_BUCKET_S`` bucket of the last ten minutes, oldest first."""
    counts = np.zeros(HISTORY_BUCKETS)
    start = now - HISTORY_BUCKET_S * HISTORY_BUCKETS
    for e in entries.values():
        if e.mtime is None or e.mtime < start:
            continue
        b = min(HISTORY_BUCKETS - 1, int((e.mtime - start) // HISTORY_BUCKET_S))
        counts[b] += e.done + e.failed
    return [round(float(v) / HISTORY_BUCKET_S, 3) for v in counts]


def live_rate(entries: dict, now: float, since: float | None) -> float | None:
    """Pages/s of a running build over the last ``RATE_WINDOW_S``, from the index entries' times.

    Counted from the first chunk finished in the window to now, so a stalled build's rate falls;
    with a single chunk so far, from the build's start (its lock).  ``written_at`` is one stamp
    per task, so early in a build it cannot give a rate (a few stamps milliseconds apart).
    """
    start = now - RATE_WINDOW_S if since is None else max(now - RATE_WINDOW_S, since)
    times = sorted((e.mtime, e.done + e.failed) for e in entries.values() if e.mtime is not None and e.mtime > start)
    if not times:
        return None
    if len(times) >= 2 and now - times[0][0] >= MIN_RATE_SPAN_S:
        return sum(p for _, p in times[1:]) / (now - times[0][0])
    return sum(p for _, p in times) / max(now - start, MIN_RATE_SPAN_S)


def recent_pages(group, entries: dict, chunk_pages: int, n_pages: int, n: int = RECENT_PAGES) -> list[dict]:
    """The last finished pages: a few done pages from the most recently written chunks."""
    latest = sorted((e for e in entries.values() if e.done and e.mtime is not None),
                    key=lambda e: e.mtime, reverse=True)[:n]
    out: list[dict] = []
    per_chunk = max(1, -(-n // max(1, len(latest))))
    for e in latest:
        lo, hi = e.chunk * chunk_pages, min(n_pages, (e.chunk + 1) * chunk_pages)
        status = np.asarray(group["status"][lo:hi])
        done = np.flatnonzero(status == STATUS_DONE)[::-1][:per_chunk]
        if len(done) == 0:
            continue
        ids = np.asarray(group["page_id"][lo:hi])
        out.extend({"page": int(lo + i), "id": str(ids[i])} for i in done)
        if len(out) >= n:
            break
    return out[:n]


def snapshot(store, storage_options: dict | None = None) -> dict:
    """The page's data for ``store`` right now (see the module docstring)."""
    store = Store.open(store, storage_options)
    now = time.time()
    base = {"store": clean_url(store.url), "time": now}
    if not store.exists():
        return {**base, "ready": False, "message": "the store does not exist yet (the build is starting)"}
    try:
        group = readable_group(store)
        attrs = dict(group.attrs)
        n_pages = int(group["status"].shape[0])
        chunk_pages = int(attrs["chunk_pages"])
    except Exception:  # noqa: BLE001 - a template being written, or not a pagecube store
        return {**base, "ready": False, "message": "the store has no complete template yet"}
    entries = store.chunks(with_times=True)
    st = store_status(store, entries=entries, examples=EXAMPLES_PER_REASON)
    n_chunks = -(-n_pages // chunk_pages)
    cmap, counts = chunk_map(n_chunks, entries, store.running_chunks(), chunk_pages, n_pages)
    writer = _writer(store, st.pending, st.stopped)
    building = writer["state"] == "building"
    rate = live_rate(entries, now, writer.get("started")) if building else st.pages_per_s
    model = {k: (clean_url(attrs[k]) if k in URL_KEYS else attrs[k]) for k in MODEL_KEYS if k in attrs}
    reasons = [{"reason": why, "count": int(n), "pages": [{"page": i, "id": pid} for i, pid in st.examples.get(why, [])]}
               for why, n in st.failures.most_common(20)]
    return {
        **base,
        "ready": True,
        "pages": {"total": n_pages, "done": st.done, "failed": st.failed, "pending": st.pending,
                  "percent": round(100.0 * st.done / n_pages, 2) if n_pages else 100.0},
        "rate": {"pages_per_s": rate, "eta_s": st.pending / rate if building and rate and st.pending else None,
                 "last_write": st.last_write, "bucket_s": HISTORY_BUCKET_S,
                 "history": history(entries, now, chunk_pages, n_pages)},
        "chunks": {"n": n_chunks, "pages_per_chunk": chunk_pages, "map": cmap, "counts": counts},
        "failures": {"total": st.failed, "reasons": reasons, "chunks": st.failure_chunks,
                     "chunks_read": st.failure_chunks_read},
        "writer": writer,
        "model": model,
        "recent": recent_pages(group, entries, chunk_pages, n_pages),
    }
