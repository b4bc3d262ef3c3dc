"""Write the store's template once: metadata only, consolidated, never changed mid-build.

The lazy arrays are ONE dask chunk per variable (a 10^7-page template then
takes about 0.1 s) and the real page chunking lives in ``encoding``.  Nothing
that changes during a build is an attribute: progress lives in ``status``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import asdict, dataclass

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from .location import META_DIR, StoreLocation, quiet_zarr_warnings
from .schema import NAT_INT, VARIABLES, dim_sizes, storage_dtype

EMBEDDING_DTYPES = ("float32", "float16")
CODECS = ("zstd", "lz4", "none")


@dataclass(frozen=True)
class StoreConfig:
    """Everything that fixes the store's bytes; two builds may share a store only if equal."""

    n_pages: int
    chunk_pages: int
    max_panels: int
    embedding_dim: int
    embedding_dtype: str
    model: str
    weights_digest: str
    input_digest: str

    def fingerprint(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k != "n_pages"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: "StoreConfig", ignore: tuple[str, ...] = ()) -> list[str]:
        from ..resume_check import short_digest

        mine, theirs = asdict(self), asdict(other)
        return [f"{k} {short_digest(theirs[k])!r} (store) vs {short_digest(mine[k])!r} (this build)"
                for k in mine if k not in ignore and mine[k] != theirs[k]]


def _compressors(codec: str, dtype: np.dtype):
    if codec == "none":
        return None
    if codec == "lz4":
        from zarr.codecs import BloscCodec

        return (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=dtype.itemsize),)
    return "auto"  # zarr's default: zstd


def template_dataset(config: StoreConfig, attrs: dict) -> tuple[xr.Dataset, dict]:
    sizes = dim_sizes(config.n_pages, config.max_panels, config.embedding_dim)
    data_vars, encoding = {}, {}
    for name, var in VARIABLES.items():
        shape = tuple(sizes[d] for d in var.dims)
        dtype = var.dtype
        if dtype == "embedding":
            dtype = config.embedding_dtype
        lazy = da.empty(shape, dtype=np.dtype(dtype) if dtype != "datetime64[ms]" else "datetime64[ns]", chunks=shape)
        data_vars[name] = xr.Variable(var.dims, lazy, attrs={"description": var.description})
        encoding[name] = {"chunks": (config.chunk_pages, *shape[1:])}
        if name == "written_at":
            encoding[name].update(units="milliseconds since 1970-01-01", dtype="int64",
                                  _FillValue=NAT_INT, fill_value=NAT_INT)
        elif var.dtype != np.dtypes.StringDType() and storage_dtype(name).kind in "iub":
            encoding[name]["fill_value"] = var.fill
    ds = xr.Dataset(data_vars, attrs=attrs)
    return ds, encoding


def clear_for_template(loc: StoreLocation, keep: str = "lock.json") -> None:
    """Empty the store for a fresh template, keeping only the writer lock that the caller holds.

    ``to_zarr(mode="w")`` would clear the whole prefix, the lock included, and
    leave a moment in which a second build finds the store unlocked.
    """
    fs = loc.fs
    if not fs.exists(loc.root):
        return
    for entry in fs.ls(loc.root, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1] != META_DIR:
            fs.rm(entry, recursive=True)
    meta = loc.meta_path()
    if fs.exists(meta):
        for entry in fs.ls(meta, detail=False):
            if entry.rstrip("/").rsplit("/", 1)[-1] != keep:
                fs.rm(entry, recursive=True)
    fs.invalidate_cache()


def write_template(loc: StoreLocation, config: StoreConfig, attrs: dict, codec: str = "zstd") -> None:
    """Create the store (metadata only) under the caller's writer lock, which is kept."""
    full_attrs = {
        **attrs,
        **{k: v for k, v in asdict(config).items() if k != "n_pages"},
        "config_fingerprint": config.fingerprint(),
        "codec": codec,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "status_meanings": "0 pending, 1 done, 2 failed",
    }
    ds, encoding = template_dataset(config, full_attrs)
    for name in ("page_embeddings", "panel_embeddings"):
        comp = _compressors(codec, np.dtype(config.embedding_dtype))
        if comp != "auto":
            encoding[name]["compressors"] = comp
    # Written in memory first, then copied with the root zarr.json (which holds the consolidated
    # metadata) last: a reader never finds a store whose metadata is half there.
    from zarr.storage import MemoryStore

    keys: dict = {}
    with quiet_zarr_warnings():
        ds.to_zarr(MemoryStore(keys), mode="w", compute=False, encoding=encoding, consolidated=True, zarr_format=3)
        clear_for_template(loc)
    fs, root = loc.fs, loc.root
    for key in sorted(keys, key=lambda k: (k == "zarr.json", k)):
        path = f"{root}/{key}"
        if loc.is_local:
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, keys[key].to_bytes())
    fs.invalidate_cache()


def read_config(loc: StoreLocation) -> tuple[StoreConfig, dict]:
    """The existing store's config and attributes (from consolidated metadata)."""
    with quiet_zarr_warnings():
        group = zarr.open_group(loc.zarr_store, mode="r", use_consolidated=True)
    attrs = dict(group.attrs)
    n_pages = int(group["status"].shape[0])
    config = StoreConfig(
        n_pages=n_pages,
        chunk_pages=int(attrs["chunk_pages"]),
        max_panels=int(attrs["max_panels"]),
        embedding_dim=int(attrs["embedding_dim"]),
        embedding_dtype=str(attrs["embedding_dtype"]),
        model=str(attrs["model"]),
        weights_digest=str(attrs["weights_digest"]),
        input_digest=str(attrs["input_digest"]),
    )
    return config, attrs
