"""Incremental growth: append pages to a store whose page list grew at its end.

A store may grow only when its page list is a prefix of the new one (the
store's ``input_digest`` ``"<hex>:<n>"`` equals the digest of the new list's
first ``n`` entries).  Any other change of the list is refused by the build.

Growth, under the writer lock, in an order that is safe to repeat after a crash
at any step and never breaks a reader that opens with consolidated metadata:

1. drop the finished-chunk index entry of the old last chunk when it was
   partial (it becomes a full chunk, so it must be planned again; its old pages
   are kept byte for byte by the task, ``written_at`` included);
2. ``resize`` every array along ``page`` with zarr (only each array's own
   ``zarr.json`` changes; consolidated readers keep seeing the old, complete
   store, whose chunks are untouched);
3. the new root attributes (``input_digest``, ``config_fingerprint``) through
   a group opened WITH consolidated metadata (the root ``zarr.json`` is
   replaced atomically and keeps the old consolidated metadata, which still
   describes a complete store), then ``zarr.consolidate_metadata``, another
   atomic replacement, with the new shapes.  Root attributes are never written
   through a group opened without consolidated metadata: that deletes the
   consolidated metadata and consolidated readers would fail meanwhile.
"""
from __future__ import annotations

import zarr

from . import index as chunk_index
from .location import StoreLocation, quiet_zarr_warnings


def grow_store(loc: StoreLocation, new_n: int, new_digest: str, chunk_pages: int, old_n: int) -> None:
    """Grow ``loc`` from ``old_n`` to ``new_n`` pages (idempotent)."""
    if new_n < old_n:
        raise ValueError(f"cannot shrink a store from {old_n} to {new_n} pages")
    # 1. the old partial last chunk must be recomputed (its new pages are pending)
    if old_n % chunk_pages:
        last = old_n // chunk_pages
        entry = chunk_index.list_entries(loc).get(last)
        if entry is not None:
            chunk_index.remove_entry(loc, entry)
    with quiet_zarr_warnings():
        group = zarr.open_group(loc.zarr_store, mode="r+", use_consolidated=False)
        # 2. resize every array along page (a no-op for arrays already grown by a crashed attempt)
        for _, arr in group.arrays():
            if arr.shape[0] != new_n:
                arr.resize((new_n, *arr.shape[1:]))
        # 3. root attributes, then consolidated metadata (each an atomic rewrite of the root zarr.json)
        _write_root(loc, new_digest)


def _write_root(loc: StoreLocation, new_digest: str) -> None:
    from .template import StoreConfig

    # Through a group opened WITH consolidated metadata: the root document is rewritten (atomically)
    # with the new attributes and the old consolidated metadata, which still describes a complete store.
    group = zarr.open_group(loc.zarr_store, mode="r+", use_consolidated=True)
    attrs = dict(group.attrs)
    cfg = StoreConfig(
        n_pages=0, chunk_pages=int(attrs["chunk_pages"]), max_panels=int(attrs["max_panels"]),
        embedding_dim=int(attrs["embedding_dim"]), embedding_dtype=str(attrs["embedding_dtype"]),
        model=str(attrs["model"]), weights_digest=str(attrs["weights_digest"]), input_digest=new_digest,
    )
    group.attrs.update({"input_digest": new_digest, "config_fingerprint": cfg.fingerprint()})
    # Then re-consolidate: one more atomic rewrite of the root document, now with the new shapes.
    zarr.consolidate_metadata(loc.zarr_store)
