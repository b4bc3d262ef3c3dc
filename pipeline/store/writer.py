"""Region writes from tasks: every data variable first, ``status``/``written_at`` last.

Writes go straight through zarr (the layout was fixed by the template), with
the group handle cached per worker and build so no task re-reads metadata.
Every write covers whole chunks (checked here, again, because a misaligned
numpy region write is not rejected by anyone else), so a rerun rewrites the
same chunks and readers never see half a chunk: zarr's local store writes a
temp file and renames it.
"""
from __future__ import annotations

import asyncio
import os
import threading

import numpy as np
import zarr

from ..plan import check_aligned
from .location import StoreLocation, quiet_zarr_warnings
from .schema import DATA_VARS

#: The longest one write step may take (every data variable of a region, then ``written_at``, then
#: ``status``) before it counts as the store not answering, a fault of the world (``pipeline.faults``):
#: an S3 client's read timeout does not bound a request whose body a stalled server stopped reading.
#: The step is cancelled, so nothing of it lands later.
WRITE_STEP_ENV = "PAGECUBE_STORE_WRITE_S"
DEFAULT_WRITE_STEP_S = 120.0

_groups: dict[tuple[str, str], zarr.Group] = {}
_arrays: dict[tuple[int, str], zarr.Array] = {}
_groups_lock = threading.Lock()


def write_step_seconds() -> float:
    try:
        value = float(os.environ.get(WRITE_STEP_ENV, "") or DEFAULT_WRITE_STEP_S)
    except ValueError:
        value = DEFAULT_WRITE_STEP_S
    return value if value > 0 else DEFAULT_WRITE_STEP_S


def open_store_group(loc: StoreLocation, run_id: str) -> zarr.Group:
    key = (loc.url, run_id)
    with _groups_lock:
        group = _groups.get(key)
        if group is None:
            with quiet_zarr_warnings():
                group = zarr.open_group(loc.zarr_store, mode="r+", use_consolidated=True)
            _groups.clear()  # one build at a time per worker process
            _arrays.clear()
            _groups[key] = group
        return group


def array(group: zarr.Group, name: str) -> zarr.Array:
    """``group[name]``, cached: a lookup rebuilds the array from metadata (measured 0.6 ms each,
    11 ms a task for 18 variables), and the layout never changes during a build."""
    key = (id(group), name)
    arr = _arrays.get(key)
    if arr is None:
        arr = group[name]
        with _groups_lock:
            if len(_arrays) > 256:
                _arrays.clear()
            _arrays[key] = arr
    return arr


def read_region(group: zarr.Group, name: str, start: int, stop: int) -> np.ndarray:
    return array(group, name)[start:stop]


def write_region(group: zarr.Group, arrays: dict[str, np.ndarray], start: int, stop: int,
                 chunk_pages: int, before_completion=None) -> None:
    """Data variables (concurrently), then the completion variables in later steps.

    ``before_completion()`` runs between the data and the completion steps and
    may raise to stop the write there (the fence: a task whose build lost the
    store's lease never marks pages done).

    Each step is one call into zarr's event loop: the data variables are
    gathered together (their chunks are encoded and stored concurrently), and
    the step returns only when every chunk is stored; ``written_at`` and then
    ``status`` follow, each in its own step, so ``status`` is never on disk
    before the data it vouches for.
    """
    n_pages = array(group, "status").shape[0]
    check_aligned(start, stop, chunk_pages, n_pages)
    for name, arr in arrays.items():
        if arr.shape[0] != stop - start:
            raise ValueError(f"{name}: {arr.shape[0]} rows for a {stop - start}-page region")

    def data_for(name: str, target: zarr.Array) -> np.ndarray:
        data = arrays[name]
        if data.dtype != target.dtype and target.dtype.kind != "T":
            data = _checked_cast(name, data, target.dtype)
        return data

    _put_together(group, [n for n in DATA_VARS if n in arrays], data_for, start, stop)
    if before_completion is not None:
        before_completion()
    # completion last, in its own steps: written_at, then status
    for name in ("written_at", "status"):
        _put_together(group, [name], data_for, start, stop)


def _put_together(group: zarr.Group, names: list[str], data_for, start: int, stop: int) -> None:
    targets = [array(group, n) for n in names]
    datas = [data_for(n, t) for n, t in zip(names, targets)]  # casts checked before anything is written
    if all(hasattr(t, "_async_array") for t in targets):
        from zarr.core.sync import sync

        async def put_all():
            puts = asyncio.gather(*(t._async_array.setitem(slice(start, stop), d) for t, d in zip(targets, datas)))
            limit = write_step_seconds()
            try:
                await asyncio.wait_for(puts, limit)
            except asyncio.TimeoutError:
                raise TimeoutError(f"the store did not take pages [{start}, {stop}) of {', '.join(names)} "
                                   f"within {limit:g} s ({WRITE_STEP_ENV})") from None

        sync(put_all())
        return
    for t, d in zip(targets, datas):  # pragma: no cover - a zarr without the async layer
        t[start:stop] = d


def _checked_cast(name: str, data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Casts are silent in zarr (300 into int8 becomes 44): refuse values that do not fit."""
    out = data.astype(dtype)
    if dtype.kind in "iu" and data.dtype.kind in "iuf":
        if not np.array_equal(out.astype(data.dtype), data, equal_nan=data.dtype.kind == "f"):
            raise ValueError(f"{name}: values do not fit {dtype}")
    return out


def verify_region(group: zarr.Group, arrays: dict[str, np.ndarray], start: int, stop: int) -> list[str]:
    """Read the data variables of the region back and compare (``--verify``; before ``status`` is written,
    so a region that reads back different is never marked done); returns the variables that differ."""
    bad = []
    for name in DATA_VARS:
        back = array(group, name)[start:stop]
        want = arrays[name]
        if want.dtype.kind == "f" or back.dtype.kind == "f":
            same = np.allclose(back.astype(np.float64), want.astype(np.float64), equal_nan=True, atol=1e-3)
        else:
            same = np.array_equal(back, want.astype(back.dtype) if back.dtype.kind != "T" else want)
        if not same:
            bad.append(name)
    return bad
