"""The store's variables, dtypes and fill values, in one table.

Pure description: no I/O.  The template writer, the task writer, readers and
``diagnose`` all read this table, so a variable is named, typed and filled the
same way everywhere.  Every variable has ``page`` as its first dimension and is
chunked along ``page`` only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STR = np.dtypes.StringDType()
NAT_INT = np.iinfo("int64").min  # written_at fill: reads back as NaT

STATUS_PENDING, STATUS_DONE, STATUS_FAILED = 0, 1, 2
STATUS_MEANINGS = "0 pending, 1 done, 2 failed"


def region_counts(status: np.ndarray) -> tuple[int, int]:
    """(done, failed) pages of a ``status`` range."""
    return int((status == STATUS_DONE).sum()), int((status == STATUS_FAILED).sum())


#: Variables that only the model produces.
MODEL_VARS = ("page_embeddings", "panel_embeddings", "attention_weights", "reading_order")
#: Page metadata copied from the manifest.
META_VARS = ("page_id", "manifest_path", "source", "series", "volume", "issue", "page_num")
#: Written last, in their own write call: they say the page is complete.
COMPLETION_VARS = ("status", "written_at")


@dataclass(frozen=True)
class Var:
    dims: tuple[str, ...]
    dtype: object  # numpy dtype, or "embedding" for the chosen embedding dtype
    fill: object
    description: str


VARIABLES: dict[str, Var] = {
    "page_embeddings": Var(("page", "embedding_dim"), "embedding", np.nan, "page embedding"),
    "panel_embeddings": Var(("page", "panel", "embedding_dim"), "embedding", np.nan, "embedding per panel slot"),
    "attention_weights": Var(("page", "panel"), np.float32, np.nan, "attention over panels; sums to 1 over valid panels"),
    "reading_order": Var(("page", "panel"), np.int16, -1, "position of each panel in reading order; -1 for padding"),
    "panel_coordinates": Var(("page", "panel", "coord"), np.float32, np.nan, "panel box x, y, w, h in pixels"),
    "text_content": Var(("page", "panel"), STR, "", "panel text: dialogue, narration and sfx joined by newlines"),
    "panel_mask": Var(("page", "panel"), np.bool_, False, "panel slot holds a real panel"),
    "n_panels": Var(("page",), np.int16, 0, "panels detected on the page before the panel cap"),
    "page_id": Var(("page",), STR, "", "page id from the manifest"),
    "manifest_path": Var(("page",), STR, "", "manifest the page came from"),
    "source": Var(("page",), STR, "", "page source"),
    "series": Var(("page",), STR, "", "series"),
    "volume": Var(("page",), STR, "", "volume"),
    "issue": Var(("page",), STR, "", "issue"),
    "page_num": Var(("page",), np.int32, -1, "page number; -1 when unknown"),
    "error": Var(("page",), STR, "", "why the page failed; empty unless status == 2"),
    "status": Var(("page",), np.int8, STATUS_PENDING, f"page status: {STATUS_MEANINGS}"),
    "written_at": Var(("page",), "datetime64[ms]", NAT_INT, "when the page's region was written (UTC)"),
}

#: Data variables in write order; completion variables last.
DATA_VARS = tuple(n for n in VARIABLES if n not in COMPLETION_VARS)


def dim_sizes(n_pages: int, max_panels: int, embedding_dim: int) -> dict[str, int]:
    return {"page": n_pages, "panel": max_panels, "embedding_dim": embedding_dim, "coord": 4}


def storage_dtype(name: str, embedding_dtype: str = "float32") -> np.dtype:
    """The numpy dtype a variable is held in (written_at is int64 ms on disk)."""
    dtype = VARIABLES[name].dtype
    if dtype == "embedding":
        return np.dtype(embedding_dtype)
    if dtype == "datetime64[ms]":
        return np.dtype("int64")
    return np.dtype(dtype)


def empty_region(n: int, max_panels: int, embedding_dim: int, embedding_dtype: str = "float32") -> dict[str, np.ndarray]:
    """Arrays for ``n`` pages, each variable at its fill value (failed pages keep these)."""
    sizes = dim_sizes(n, max_panels, embedding_dim)
    out = {}
    for name, var in VARIABLES.items():
        shape = tuple(sizes[d] for d in var.dims)
        out[name] = np.full(shape, var.fill, dtype=storage_dtype(name, embedding_dtype))
    return out
