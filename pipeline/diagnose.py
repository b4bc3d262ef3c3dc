"""``pagecube diagnose``: check a store (the seed's diagnose_zarr_writes, done properly).

Checks, reading one chunk of pages at a time (memory stays bounded at any size):

- metadata opens both consolidated and not, and both views agree (arrays,
  shapes, dtypes, chunks, root attributes);
- every array has the store's page count and the schema's other dimensions;
- every done page has its data: finite page embeddings, a written time, panel
  mask consistent with the coordinates, the text and ``n_panels``;
- no chunk file is missing for done pages (local stores; zarr v3 keys
  ``VAR/c/<i>/0...``), and every chunk reads (no garbage);
- the zarr and xarray views agree on ``status`` and the embeddings;
- the finished-chunk index agrees with ``status``;
- debris (``*.partial``) and the writer lock are reported.

``repair=True`` (under the writer lock) marks the done pages whose data are
missing or garbled as pending (``status = 0``) and drops their chunks'
index entries, so the next ``pagecube build`` redoes exactly those chunks (the
task keeps the chunk's intact done pages byte for byte); it also drops index
entries that disagree with ``status``, re-consolidates metadata that disagrees,
and removes debris when no writer runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .errors import NotAStore
from .readers import stopped_state
from .store import Store
from .store.location import quiet_zarr_warnings
from .store.schema import NAT_INT, STATUS_DONE, STATUS_FAILED, STATUS_PENDING, VARIABLES, dim_sizes

#: Variables that always hold a non-fill value for a done page, so their chunk file must exist.
MUST_EXIST = ("page_embeddings", "manifest_path", "status", "written_at")
MAX_LISTED = 20


@dataclass
class Report:
    store: str
    n_pages: int = 0
    done: int = 0
    failed: int = 0
    faults: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    bad_pages: dict[int, set[int]] = field(default_factory=dict)  # chunk -> page offsets to redo
    bad_entries: set[int] = field(default_factory=set)  # chunks whose index entry is wrong
    debris: list[str] = field(default_factory=list)
    lock_live: bool = False
    metadata_disagrees: bool = False
    _fault_count: int = 0

    @property
    def ok(self) -> bool:
        return not self.faults

    def fault(self, msg: str) -> None:
        self._fault_count += 1
        if len(self.faults) < MAX_LISTED:
            self.faults.append(msg)
        elif len(self.faults) == MAX_LISTED:
            self.faults.append("... more faults not listed")

    def mark(self, chunk: int, offsets) -> None:
        self.bad_pages.setdefault(chunk, set()).update(int(o) for o in offsets)

    @property
    def n_bad_pages(self) -> int:
        return sum(len(v) for v in self.bad_pages.values())

    def lines(self) -> list[str]:
        out = [f"{self.store}: {self.n_pages} pages, {self.done} done, {self.failed} failed"]
        out += [f"  note: {n}" for n in self.notes]
        out += [f"  FAULT: {f}" for f in self.faults]
        if self.bad_pages:
            out.append(f"  {self.n_bad_pages} done pages in {len(self.bad_pages)} chunks have missing or bad data")
        out += [f"  repaired: {r}" for r in self.repaired]
        if self.ok:
            out.append("  ok: no faults found")
        elif not self.repaired:
            out.append("  run `pagecube diagnose STORE --repair`, then `pagecube build` to redo the bad pages")
        return out


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _open(store: Store, consolidated: bool, report: Report):
    try:
        return store.group(consolidated=consolidated)
    except Exception as exc:
        kind = "consolidated" if consolidated else "unconsolidated"
        report.fault(f"{kind} metadata does not open: {_one_line(exc)}")
        if consolidated:
            report.metadata_disagrees = True
        return None


def _describe(group) -> dict:
    out = {}
    for name, arr in group.arrays():
        out[name] = (tuple(arr.shape), str(arr.dtype), tuple(arr.chunks))
    return out


def _check_metadata(cons, plain, report: Report) -> None:
    a, b = _describe(cons), _describe(plain)
    if set(a) != set(b):
        report.fault(f"consolidated metadata lists arrays {sorted(set(a) ^ set(b))} differently")
        report.metadata_disagrees = True
    for name in sorted(set(a) & set(b)):
        if a[name] != b[name]:
            report.fault(f"{name}: consolidated metadata says {a[name]}, the array's own metadata {b[name]}")
            report.metadata_disagrees = True
    if dict(cons.attrs) != dict(plain.attrs):
        report.fault("root attributes differ between consolidated and unconsolidated metadata")
        report.metadata_disagrees = True


def _check_shapes(plain, attrs: dict, n: int, report: Report) -> bool:
    sizes = dim_sizes(n, int(attrs.get("max_panels", 0)), int(attrs.get("embedding_dim", 0)))
    good = True
    for name, var in VARIABLES.items():
        if name not in plain:
            report.fault(f"array {name} is missing")
            good = False
            continue
        want = tuple(sizes[d] for d in var.dims)
        if tuple(plain[name].shape) != want:
            report.fault(f"{name} has shape {tuple(plain[name].shape)}, expected {want} {var.dims}")
            good = False
    return good


def _chunk_file(store: Store, arr, name: str, chunk: int) -> str:
    key = arr.metadata.encode_chunk_key((chunk,) + (0,) * (arr.ndim - 1))
    return os.path.join(store.url, name, *key.split("/"))


def _check_chunk(store: Store, plain, ds, c: int, start: int, stop: int, P: int, entries: dict, report: Report) -> None:
    n = stop - start
    data: dict[str, np.ndarray | None] = {}
    for name in VARIABLES:
        try:
            data[name] = plain[name][start:stop]
        except Exception as exc:
            data[name] = None
            report.fault(f"{name}: chunk {c} (pages [{start}, {stop})) does not read: {_one_line(exc)}")
    status = data["status"]
    if status is None:  # nothing is known about this chunk: redo all of it
        report.mark(c, range(n))
        report.bad_entries.add(c)
        return
    done = status == STATUS_DONE
    report.done += int(done.sum())
    report.failed += int((status == STATUS_FAILED).sum())
    bad = np.zeros(n, dtype=bool)
    for name, arr in data.items():
        if arr is None:
            bad |= done  # garbled chunk: every done page of it is suspect
    if done.any() and store.is_local:
        for name in MUST_EXIST:
            if not os.path.exists(_chunk_file(store, plain[name], name, c)):
                report.fault(f"{name}: chunk {c} file is missing but {int(done.sum())} of its pages are done")
                bad |= done

    def flag(rows: np.ndarray, what: str) -> None:
        nonlocal bad
        rows = rows & done & ~bad
        if rows.any():
            idx = np.flatnonzero(rows)[:5] + start
            report.fault(f"{int(rows.sum())} done pages {what} (pages {', '.join(map(str, idx))}"
                         f"{' ...' if rows.sum() > 5 else ''})")
            bad |= rows

    emb, coords, mask = data["page_embeddings"], data["panel_coordinates"], data["panel_mask"]
    if emb is not None:
        flag(~np.isfinite(emb.astype(np.float64)).all(axis=1), "have non-finite page embeddings")
    if data["written_at"] is not None:
        flag(data["written_at"] == NAT_INT, "have no written_at")
    if mask is not None and coords is not None:
        flag((np.isfinite(coords).all(axis=2) != mask).any(axis=1), "have a panel mask that disagrees with the boxes")
    if mask is not None and data["text_content"] is not None:
        flag(((data["text_content"] != "") & ~mask).any(axis=1), "have text in empty panel slots")
    if mask is not None and data["n_panels"] is not None:
        flag(mask.sum(axis=1) != np.minimum(data["n_panels"].astype(np.int64), P), "have n_panels that disagree with the mask")
    if mask is not None and data["panel_embeddings"] is not None:
        pe = data["panel_embeddings"].astype(np.float64)
        flag((~np.isfinite(pe).all(axis=2) & mask).any(axis=1), "have non-finite panel embeddings in real panels")
    if data["error"] is not None:
        failed_quiet = (status == STATUS_FAILED) & (data["error"] == "")
        if failed_quiet.any():
            report.fault(f"chunk {c}: {int(failed_quiet.sum())} failed pages have no reason")
    if bad.any():
        report.mark(c, np.flatnonzero(bad))
    # the xarray view must say the same
    if ds is not None:
        try:
            xs = ds["status"][start:stop].values
            if not np.array_equal(xs, status):
                report.fault(f"chunk {c}: xarray and zarr disagree on status")
            if emb is not None:
                xe = ds["page_embeddings"][start:stop].values
                if not np.array_equal(xe, emb, equal_nan=True):
                    report.fault(f"chunk {c}: xarray and zarr disagree on page_embeddings")
        except Exception as exc:
            report.fault(f"chunk {c}: xarray cannot read it: {_one_line(exc)}")
    # the finished-chunk index must agree with status
    entry = entries.get(c)
    if entry is not None:
        d, f = int(done.sum()), int((status == STATUS_FAILED).sum())
        if d + f != n or (entry.done, entry.failed) != (d, f) or bad.any():
            if not bad.any():
                report.fault(f"index entry for chunk {c} says {entry.done} done, {entry.failed} failed; "
                             f"status says {d} done, {f} failed of {n}")
            report.bad_entries.add(c)


def diagnose(store, repair: bool = False, storage_options: dict | None = None) -> Report:
    """Check ``store``; with ``repair`` fix what can be fixed (see the module docstring)."""
    store = Store.open(store, storage_options)
    store.require(damaged_ok=True)  # a folder that is no store at all is a bad argument, not something to repair
    with quiet_zarr_warnings():
        return _diagnose(store, repair)


def _diagnose(store: Store, repair: bool) -> Report:
    report = Report(str(store))
    if not store.exists():
        report.fault(f"no store at {store} (no zarr.json)")
        return report
    cons = _open(store, True, report)
    plain = _open(store, False, report)
    if plain is None:
        return report
    if cons is not None:
        _check_metadata(cons, plain, report)
    attrs = dict(plain.attrs)
    if "status" not in plain and "chunk_pages" not in attrs:
        raise NotAStore(f"{store} is not a pagecube store (a Zarr group without pagecube's arrays and attributes)")
    if "status" not in plain:
        report.fault("array status is missing: not a pagecube store?")
        return report
    n = int(plain["status"].shape[0])
    report.n_pages = n
    if not _check_shapes(plain, attrs, n, report):
        return report
    chunk_pages = int(attrs.get("chunk_pages") or plain["status"].chunks[0])
    P = int(attrs.get("max_panels", plain["panel_mask"].shape[1]))
    ds = None
    try:
        import xarray as xr

        with quiet_zarr_warnings():
            ds = xr.open_zarr(store.zarr_store, consolidated=True, mask_and_scale=False, decode_times=False)
        if ds.sizes.get("page") != n:
            report.fault(f"xarray sees {ds.sizes.get('page')} pages, zarr {n}")
    except Exception as exc:
        report.fault(f"xarray cannot open the store (consolidated): {_one_line(exc)}")
    entries = store.chunks()
    for c in range(-(-n // chunk_pages)):
        start, stop = c * chunk_pages, min((c + 1) * chunk_pages, n)
        _check_chunk(store, plain, ds, c, start, stop, P, entries, report)
    _note_duplicate_ids(plain, n, chunk_pages, report)
    for c in sorted(entries):
        if c * chunk_pages >= n:
            report.fault(f"index entry for chunk {c} lies beyond the store's {n} pages")
            report.bad_entries.add(c)

    report.lock_live = store.live_holder() is not None
    report.notes.append(f"lock: {store.lock_state()}")
    stopped = stopped_state(store)
    if stopped:  # a fault of the world stopped the last build: the store is fine, the pages are pending
        report.notes.append(stopped)
    report.debris = store.debris(full=True)
    if report.debris:
        msg = f"{len(report.debris)} debris files (*.partial) from a killed writer, e.g. {report.debris[0]}"
        if report.lock_live:
            report.notes.append(msg + " (a build is running: they may be its temp files)")
        else:
            report.fault(msg)
    if repair and not report.ok:
        _repair(store, report, chunk_pages, n)
    return report


def _note_duplicate_ids(group, n: int, chunk_pages: int, report: Report) -> None:
    """Pages are keyed by position, so duplicate ids are kept; say so, since lookups by id take the first.

    Streams ``page_id`` chunk by chunk and keeps one 64-bit hash per page (80 MB at 10^7 pages).
    """
    ids = group["page_id"]
    hashes = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk_pages):
        block = ids[start:start + chunk_pages]
        hashes[start:start + len(block)] = [hash(str(x)) if str(x) else i for i, x in
                                            enumerate(block, start=start)]
    values, counts = np.unique(hashes, return_counts=True)
    dup = values[counts > 1]
    if len(dup):
        earliest = int(np.flatnonzero(np.isin(hashes, dup))[0])  # the duplicate seen first in page order
        first = np.flatnonzero(hashes == hashes[earliest])
        example = str(ids[int(first[0])])
        report.notes.append(f"{int((counts[counts > 1]).sum())} pages share {len(dup)} page ids "
                            f"(e.g. {example!r} at pages {', '.join(map(str, first[:5]))}); "
                            "lookups by id (show, similar, summary --page-id) take the first")


def _repair(store: Store, report: Report, chunk_pages: int, n: int) -> None:
    import zarr

    with store.lock():  # refuses (StoreLocked) while a build runs
        with quiet_zarr_warnings():
            if report.metadata_disagrees:
                zarr.consolidate_metadata(store.zarr_store)
                report.repaired.append("re-consolidated the metadata")
            group = store.group("r+", consolidated=False)
            status_arr = group["status"]
            for c, offsets in sorted(report.bad_pages.items()):
                start, stop = c * chunk_pages, min((c + 1) * chunk_pages, n)
                try:
                    status = status_arr[start:stop]
                except Exception:  # the status chunk itself is garbage: every page of it is redone
                    status = np.full(stop - start, STATUS_PENDING, dtype=status_arr.dtype)
                status[sorted(offsets)] = STATUS_PENDING
                status_arr[start:stop] = status
        entries = store.chunks()
        for c in set(report.bad_pages) | report.bad_entries:
            if c in entries:
                store.forget_chunk(entries[c])
        if report.bad_pages:
            report.repaired.append(f"marked {report.n_bad_pages} pages in {len(report.bad_pages)} chunks as pending; "
                                   "run `pagecube build` to redo them")
        if report.bad_entries - set(report.bad_pages):
            report.repaired.append(f"dropped {len(report.bad_entries - set(report.bad_pages))} wrong index entries")
        if report.debris:
            removed = store.clean_debris(full=True)
            report.repaired.append(f"removed {removed} debris files")
