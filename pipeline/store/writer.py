"""Region writes from tasks: every data variable first, ``status``/``written_at`` last.

Writes go straight through zarr (the layout was fixed by the template), with
the group handle cached per worker and build so no task re-reads metadata.
Every write covers whole chunks (checked here, again, because a misaligned
numpy region write is not rejected by anyone else), so a rerun rewrites the
same chunks and readers never see half a chunk: zarr's local store writes a
temp file and renames it.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr

from ..plan import check_aligned
from .location import StoreLocation, quiet_zarr_warnings
from .schema import COMPLETION_VARS, DATA_VARS, STATUS_DONE, STATUS_FAILED

_groups: dict[tuple[str, str], zarr.Group] = {}
_groups_lock = threading.Lock()
_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pagecube-write")


def open_store_group(loc: StoreLocation, run_id: str) -> zarr.Group:
    key = (loc.url, run_id)
    with _groups_lock:
        group = _groups.get(key)
        if group is None:
            with quiet_zarr_warnings():
                group = zarr.open_group(loc.zarr_store, mode="r+", use_consolidated=True)
            _groups.clear()  # one build at a time per worker process
            _groups[key] = group
        return group


def read_region(group: zarr.Group, name: str, start: int, stop: int) -> np.ndarray:
    return group[name][start:stop]


def write_region(group: zarr.Group, arrays: dict[str, np.ndarray], start: int, stop: int,
                 chunk_pages: int) -> None:
    """Data variables (in parallel), then the completion variables in a second step."""
    n_pages = group["status"].shape[0]
    check_aligned(start, stop, chunk_pages, n_pages)
    for name, arr in arrays.items():
        if arr.shape[0] != stop - start:
            raise ValueError(f"{name}: {arr.shape[0]} rows for a {stop - start}-page region")

    def put(name: str) -> None:
        target = group[name]
        data = arrays[name]
        if data.dtype != target.dtype and target.dtype.kind != "T":
            data = _checked_cast(name, data, target.dtype)
        target[start:stop] = data

    list(_pool.map(put, DATA_VARS))
    # completion last, in its own step: written_at, then status
    for name in ("written_at", "status"):
        put(name)


def _checked_cast(name: str, data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Casts are silent in zarr (300 into int8 becomes 44): refuse values that do not fit."""
    out = data.astype(dtype)
    if dtype.kind in "iu" and data.dtype.kind in "iuf":
        if not np.array_equal(out.astype(data.dtype), data, equal_nan=data.dtype.kind == "f"):
            raise ValueError(f"{name}: values do not fit {dtype}")
    return out


def verify_region(group: zarr.Group, arrays: dict[str, np.ndarray], start: int, stop: int) -> list[str]:
    """Read the region back and compare (``--verify``); returns the variables that differ."""
    bad = []
    for name in (*DATA_VARS, *COMPLETION_VARS):
        back = group[name][start:stop]
        want = arrays[name]
        if want.dtype.kind == "f" or back.dtype.kind == "f":
            same = np.allclose(back.astype(np.float64), want.astype(np.float64), equal_nan=True, atol=1e-3)
        else:
            same = np.array_equal(back, want.astype(back.dtype) if back.dtype.kind != "T" else want)
        if not same:
            bad.append(name)
    return bad


def region_counts(status: np.ndarray) -> tuple[int, int]:
    return int((status == STATUS_DONE).sum()), int((status == STATUS_FAILED).sum())
