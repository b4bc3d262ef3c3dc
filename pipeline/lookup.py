"""Finding a page in a store: by position (``@N``, pending pages too) or by page id.

Below ``readers`` (``pagecube summary --page-id``), ``similar`` and ``show``, which all look pages up
the same way.  A lookup by id streams ``page_id`` block by block (a block is a whole number of page
chunks), so memory stays bounded at 10^7 pages; the first match wins.
"""
from __future__ import annotations

import re
from typing import Iterator

import numpy as np
import zarr

from .store import Store

#: Default cap on the embeddings held at once (per block), in bytes.
BLOCK_BYTES = 64 * 2**20


class SimilarError(ValueError):
    """A query that cannot be answered: unknown page, page not done, wrong vector, mismatched model."""


class NotAStore(SimilarError):
    """The path or URL holds no readable pagecube store."""


def open_group(store, storage_options: dict | None = None) -> tuple[Store, zarr.Group]:
    """The store and its Zarr group, refused with one line unless it has the arrays a lookup reads."""
    store = Store.open(store, storage_options)
    try:
        group = store.group()
    except Exception as exc:  # missing folder, not a zarr group, unreadable metadata
        raise NotAStore(f"{store} is not a readable pagecube store ({type(exc).__name__})") from None
    missing = [n for n in ("page_embeddings", "status", "page_id") if n not in group]
    if missing or "chunk_pages" not in group.attrs:
        raise NotAStore(f"{store} is not a pagecube store (no {', '.join(missing) or 'chunk_pages attribute'})")
    return store, group


def pages_per_block(group: zarr.Group, block_pages: int | None, block_bytes: int) -> int:
    """Pages per block: a whole number of page chunks (at least one)."""
    chunk = int(group["status"].chunks[0]) or 1
    if block_pages is None:
        emb = group["page_embeddings"]
        row = max(1, int(np.prod(emb.shape[1:])) * emb.dtype.itemsize)
        block_pages = max(1, int(block_bytes) // row)
    return max(1, int(block_pages) // chunk) * chunk


def blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def page_position(page: str, n_pages: int, error: type[Exception] = ValueError) -> int | None:
    """``@N`` names a page by its position (pending pages have no id yet); None when ``page`` is an id."""
    m = re.fullmatch(r"@(\d+)", page.strip())
    if not m:
        return None
    i = int(m.group(1))
    if i >= n_pages:
        raise error(f"page @{i} is out of range: the store has {n_pages} pages (@0 .. @{n_pages - 1})")
    return i


def find_page(store, page_id: str, *, storage_options: dict | None = None, block_pages: int | None = None,
              _group: zarr.Group | None = None) -> int:
    """Position of ``page_id`` (or ``@N``), read ``page_id`` block by block; the first match wins."""
    group = _group if _group is not None else open_group(store, storage_options)[1]
    ids = group["page_id"]
    n = int(ids.shape[0])
    i = page_position(page_id, n, SimilarError)
    if i is not None:
        return i
    size = pages_per_block(group, block_pages, BLOCK_BYTES)
    for start, stop in blocks(n, size):
        hits = np.flatnonzero(np.asarray(ids[start:stop]) == page_id)
        if hits.size:
            return int(hits[0]) + start
    raise SimilarError(f"page id {page_id!r} is not among the {n} pages written to the store so far "
                       f"(a page's id is stored when its chunk is written)")
