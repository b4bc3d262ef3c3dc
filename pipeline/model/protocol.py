"""The small contract between the build and any model.

A model is three steps so the build can overlap them: ``prepare`` one page on
CPU (in a thread pool, next to image decoding), ``collate`` a batch, and
``forward`` a batch to named numpy outputs.  Everything the store needs beyond
these outputs (boxes, text, mask, metadata) comes from the page itself, so a
model never has to know about Zarr.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..pages import Page

#: The outputs every model returns from ``forward`` for a batch of B pages
#: with a panel cap of P and an embedding dimension of D.
OUTPUT_SPECS = {
    "page_embeddings": ("B", "D"),  # float32
    "panel_embeddings": ("B", "P", "D"),  # float32, zeros in padding slots
    "attention_weights": ("B", "P"),  # float32, sums to 1 over valid panels, 0 elsewhere
    "reading_order": ("B", "P"),  # int, position in reading order, -1 in padding slots
}


@dataclass(frozen=True)
class ModelInfo:
    """What the store records about the model (goes into root attributes and the fingerprint)."""

    name: str
    embedding_dim: int
    max_panels: int
    weights_digest: str  # sha256 of the checkpoint file, or "seed:<n>" for seeded init
    weights_source: str  # "checkpoint:<file name>" or "seeded-init"
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class PageModel(Protocol):
    """What the build calls. ``info.max_panels`` must equal the store's panel cap."""

    info: ModelInfo
    device: str
    #: Optional: the side in pixels that panel crops are resized to.  Pages are then decoded just
    #: large enough that every crop keeps at least this many pixels a side (JPEG DCT scaling), and
    #: ``prepare`` gets ``page.image`` at ``page.image_scale`` of the page: crop ``page.image_boxes()``
    #: (``page.rgb()``: the same image as a uint8 [H, W, 3] array, without a copy where the decoder made it).
    #: A model without it gets the full image (``image_scale == 1``).
    panel_side: int | None

    def prepare(self, page: "Page") -> Any:
        """CPU work for one page (crops, resize, tokenisation). Thread-safe."""

    def collate(self, prepared: list[Any]) -> Any:
        """Stack prepared pages into one batch (on CPU; ``forward`` moves it)."""

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        """Run the batch; return OUTPUT_SPECS arrays as numpy (float32 / int)."""


def info_dict(model) -> dict:
    """``model.info`` as a plain dict (what a worker sends back; importing this module is cheap there)."""
    from dataclasses import asdict

    return asdict(model.info)
