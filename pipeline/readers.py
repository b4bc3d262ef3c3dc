"""Reading a store, at any moment of a build, from any process.

Open afresh for each look (a loaded handle keeps returning old values).
``status == 1`` marks complete pages; every other page may show fill values
(NaN embeddings, empty text) because its region has not been written yet.
"""
from __future__ import annotations

import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import zarr

from .errors import NotAStore
from .lookup import find_page
from .store import Store
from .store.schema import STATUS_DONE

RATE_WINDOW_CHUNKS = 64
#: At most this many chunks with failed pages are read to group failures by reason; with more, an
#: evenly spread sample of them is read (the failed total still comes, exact, from the index).
MAX_REASON_CHUNKS = 256


def _require_pagecube(where, store) -> None:
    """``store`` (a zarr Group or an xarray Dataset, opened from ``where``) has pagecube's arrays and attributes."""
    if "status" not in store or "chunk_pages" not in store.attrs:
        raise NotAStore(f"{where} is not a pagecube store (a Zarr group without pagecube's arrays and attributes)")


def open_store(store, storage_options: dict | None = None) -> "xr.Dataset":
    """The whole store as a Dataset (every page, pending ones too); ``store`` may be a ``Store``."""
    store = Store.open(store, storage_options)
    store.require()
    try:
        return store.dataset()  # xarray is imported there, not here: ``pagecube status`` reads without it
    except (KeyError, ValueError, zarr.errors.BaseZarrError) as exc:  # e.g. no consolidated metadata
        raise NotAStore(f"{store} is not a pagecube store ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_pages(store, done_only: bool = True, storage_options: dict | None = None, by_id: bool = True
               ) -> "xr.Dataset":
    """The store as a Dataset; with ``done_only`` only pages whose ``status == 1``, indexed by page id.

    The finished pages get what the store itself does not hold (it has no ``page`` index, so that its
    metadata never changes during a build): ``page`` coordinate values are the page ids, so
    ``ds.sel(page="sample_00003")`` works, and a ``position`` coordinate keeps each page's place in
    the store (``@N`` for ``show`` and ``similar``).  Page ids that occur more than once stay in the
    index: ``.sel(page=ID)`` then returns every page with that id (a ``page`` dimension of their
    number, told apart by ``position``), a list of ids is refused by pandas (use
    ``ds.isel(page=ds.page.isin(ids).values)``, or ``ds.drop_duplicates("page")`` first), and a
    warning says how many pages repeat an id.  ``done_only=False`` is the raw store (pending pages have
    no id yet), as ``open_store`` gives it.

    The index reads every finished page's id (about 2 s and 80 MB per million pages); ``by_id=False``
    skips it and gives the finished pages by position only, as before.
    """
    ds = open_store(store, storage_options)
    if not done_only:
        return ds
    keep = np.flatnonzero(ds["status"].values == STATUS_DONE)
    ds = ds.isel(page=keep)
    if not by_id:
        return ds
    ids = np.asarray(ds["page_id"].values, dtype=object)  # StringDType: pandas indexes objects
    ds = ds.assign_coords(page=("page", ids), position=("page", keep.astype(np.int64)))
    ds["page"].attrs["description"] = "page id (a reader-side index of finished pages, not in the store)"
    ds["position"].attrs["description"] = "the page's position in the store (@N)"
    repeated = len(ids) - len(set(ids))
    if repeated:
        warnings.warn(f"{repeated} finished pages repeat a page id held by another: .sel(page=ID) returns every page "
                      "with that id (tell them apart by the 'position' coordinate)", DuplicatePageIds, stacklevel=2)
    return ds


class DuplicatePageIds(UserWarning):
    """Some finished pages share a page id (user data can): ``.sel(page=ID)`` returns all of them."""


def readable_group(store: Store) -> zarr.Group:
    """The store's Zarr group, or ``NotAStore`` with one line (zarr's own error says less)."""
    try:
        return store.group()
    except (KeyError, ValueError, zarr.errors.BaseZarrError) as exc:
        raise NotAStore(f"{store} is not a pagecube store ({_first_line(exc)})") from None


def reason_kind(reason: str) -> str:
    """Group failure reasons: paths and numbers stripped."""
    text = re.sub(r"(\w+://|/)[^\s:]+", "<path>", reason)
    text = re.sub(r"\[[^\]]*\]", "[..]", text)
    return re.sub(r"\d+", "N", text)[:160]


@dataclass
class StoreStatus:
    store: str
    n_pages: int
    chunk_pages: int
    done: int
    failed: int
    pages_per_s: float | None
    lock: str
    failures: Counter = field(default_factory=Counter)
    last_write: float | None = None
    failure_chunks: int = 0  # chunks that hold failed pages
    failure_chunks_read: int = 0  # of those, how many were read to group failures by reason
    examples: dict = field(default_factory=dict)  # reason -> [(page index, page id)], when asked for
    stopped: str = ""  # "stopped: disk full (...)" when a fault of the world stopped the last build

    @property
    def stop_label(self) -> str:
        """``disk full`` of ``stopped: disk full (...)``; empty unless stopped."""
        return self.stopped.split(": ", 1)[1].split(" (", 1)[0] if self.stopped else ""

    @property
    def pending(self) -> int:
        return self.n_pages - self.done - self.failed

    @property
    def eta_s(self) -> float | None:
        if not self.pages_per_s or self.pending == 0 or self.stopped:
            return None
        return self.pending / self.pages_per_s

    def lines(self) -> list[str]:
        pct = 100.0 * self.done / self.n_pages if self.n_pages else 100.0
        out = [
            f"store    {self.store}",
            f"pages    {self.n_pages}  done {self.done} ({pct:.1f}%)  failed {self.failed}  pending {self.pending}",
            f"writer   {self.lock}",
        ]
        if self.stopped:
            out.append(f"state    {self.stopped}")
        if self.pages_per_s:
            eta = self.eta_s
            eta_txt = "" if self.stopped else "; ETA " + ("-" if eta is None else f"{eta / 60:.1f} min")
            out.append(f"rate     {self.pages_per_s:.1f} pages/s between the last chunks written "
                       f"(start-up not counted){eta_txt}")
        if self.last_write:
            ago = time.time() - self.last_write
            out.append(f"last     chunk written {ago:.0f}s ago")
        if self.failures:
            sample = ("" if self.failure_chunks_read >= self.failure_chunks else
                      f" (from {self.failure_chunks_read} of the {self.failure_chunks} chunks with failures)")
            out.append(f"failures by reason{sample}:")
            out.extend(f"  {n:>8}  {why}" for why, n in self.failures.most_common(10))
        return out


def store_status(store, storage_options: dict | None = None, *, entries: dict | None = None,
                 examples: int = 0) -> StoreStatus:
    """Counts from the finished-chunk index, rate from ``written_at`` of the latest chunks.

    Reads one listing plus a few chunks, so it answers fast for 10^7 pages. ``entries``: a
    listing (with times) the caller already made; ``examples``: keep that many failed pages
    (position, id) per reason.
    """
    store = Store.open(store, storage_options)
    store.require()
    group = readable_group(store)
    _require_pagecube(store, group)
    n_pages = int(group["status"].shape[0])
    chunk_pages = int(group.attrs["chunk_pages"])
    if entries is None:
        entries = store.chunks(with_times=True)
    done = sum(e.done for e in entries.values())
    failed = sum(e.failed for e in entries.values())

    failures: Counter = Counter()
    bad = sorted(c for c, e in entries.items() if e.failed)
    picked = bad
    if len(bad) > MAX_REASON_CHUNKS:  # evenly spread sample, first and last included
        picked = [bad[i] for i in np.linspace(0, len(bad) - 1, MAX_REASON_CHUNKS).round().astype(int)]
    shown: dict[str, list] = {}
    if picked:
        errs = _read_chunks(group["error"], picked, chunk_pages, n_pages)
        kinds = [reason_kind(str(r)) if str(r) else "" for r in errs]
        failures.update(k for k in kinds if k)
        if examples:
            shown = _failure_examples(group, kinds, picked, chunk_pages, n_pages, examples)

    rate, last = None, None
    timed = sorted((e for e in entries.values() if e.mtime is not None), key=lambda e: e.mtime)
    if timed:
        last = timed[-1].mtime
        recent = sorted(e.chunk for e in timed[-RATE_WINDOW_CHUNKS:])
        stamps = _read_chunks(group["written_at"], recent, chunk_pages, n_pages).astype(np.int64)
        stamps = stamps[stamps != np.iinfo(np.int64).min]
        if len(stamps) > 1 and stamps.max() > stamps.min():
            rate = float(len(stamps) / ((stamps.max() - stamps.min()) / 1000.0))
    return StoreStatus(store.url, n_pages, chunk_pages, done, failed, rate, store.lock_state(), failures, last,
                       len(bad), len(picked), shown, stopped_state(store))


def stopped_state(store: Store) -> str:
    """``stopped: disk full (the stop line)`` when a fault of the world stopped the last build and no
    build holds the store now; else empty."""
    if store.live_holder() is not None:
        return ""  # a build runs (it cleared the record, or is about to)
    stop = store.stop_record()
    return stop.describe() if stop is not None else ""


def _failure_examples(group, kinds, chunks, chunk_pages, n_pages, per_reason) -> dict[str, list]:
    """A few failed pages per reason: (position, page id; else the manifest's name; else "@N")."""
    wanted = [j for j, k in enumerate(kinds) if k]
    starts = np.asarray(chunks, dtype=np.int64) * chunk_pages
    index = (starts[:, None] + np.arange(chunk_pages, dtype=np.int64)[None, :]).ravel()
    index = index[index < n_pages]
    ids = _read_chunks(group["page_id"], chunks, chunk_pages, n_pages)
    paths = _read_chunks(group["manifest_path"], chunks, chunk_pages, n_pages)
    out: dict[str, list] = {}
    for j in wanted:
        rows = out.setdefault(kinds[j], [])
        if len(rows) < per_reason:
            i = int(index[j])
            name = str(ids[j]) or str(paths[j]).rsplit("/", 1)[-1].rsplit(".", 1)[0] or f"@{i}"
            rows.append((i, name))
    return out


def _read_chunks(array, chunks: list[int], chunk_pages: int, n_pages: int) -> np.ndarray:
    """The values of whole page chunks, in one selection (zarr fetches the chunks concurrently)."""
    if not chunks:
        return np.array([])
    starts = np.asarray(chunks, dtype=np.int64) * chunk_pages
    idx = (starts[:, None] + np.arange(chunk_pages, dtype=np.int64)[None, :]).ravel()
    idx = idx[idx < n_pages]
    return np.asarray(array.get_orthogonal_selection(idx))


def page_summaries(store, *, max_pages: int = 5, text_len: int = 80, compact: bool = False,
                   page_id: str | None = None, storage_options: dict | None = None) -> list[str]:
    """The seed's page summaries: id, series, panels, embedding norm, panel text."""
    opened = Store.open(store, storage_options)
    ds = open_store(opened)
    _require_pagecube(store, ds)  # named as the caller named it
    status = ds["status"].values
    if page_id is not None:
        pages = [find_page(opened, page_id)]  # streams page_id chunk by chunk; also takes @N
    else:
        pages = np.flatnonzero(status == STATUS_DONE)[:max_pages]
    out = [f"{int((status == STATUS_DONE).sum())} of {len(status)} pages done"]
    for i in pages:
        p = ds.isel(page=int(i)).load()
        mask = p["panel_mask"].values
        n = int(mask.sum())
        norm = float(np.linalg.norm(p["page_embeddings"].values)) if int(p["status"]) == STATUS_DONE else float("nan")
        head = (f"page {int(i)}  id={p['page_id'].item()}  series={p['series'].item() or '-'}  "
                f"panels={n}/{int(p['n_panels'])}  status={int(p['status'])}  |emb|={norm:.3f}")
        if int(p["status"]) == 2:
            head += f"  error={p['error'].item()}"
        out.append(head)
        if compact:
            continue
        order = p["reading_order"].values
        att = p["attention_weights"].values
        for slot in np.argsort(np.where(mask, order, 10**6)):
            if not mask[slot]:
                continue
            text = " / ".join(str(p["text_content"].values[slot]).split("\n"))
            if len(text) > text_len:
                text = text[: text_len - 1] + "…"
            out.append(f"    #{int(order[slot])} slot {int(slot)}  att={att[slot]:.3f}  {text}")
    return out
