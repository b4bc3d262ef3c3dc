"""A page as the model and the store see it, after validation.

Manifests are parsed by :mod:`pipeline.inputs`; this module only holds the
validated, capped result so that models and writers share one shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

TEXT_KINDS = ("dialogue", "narration", "sfx")


@dataclass
class Page:
    """One page, panels capped to the store's panel cap.

    ``boxes`` is float32 ``[n_kept, 4]`` (x, y, w, h in pixels, clipped to the
    image), ``texts`` one string per kept panel (dialogue, narration and sfx
    joined by newlines), ``n_panels`` the count before the cap.  Kept panels are
    the first ``max_panels`` by ``order_index`` and stay in manifest order, so
    the reading order is not given away by slot position.
    """

    page_id: str
    image: Image.Image | None  # RGB, decoded at ``image_scale`` of the page (None before decoding / after prepare)
    boxes: np.ndarray
    texts: list[str]
    n_panels: int
    true_order: np.ndarray | None = None  # order_index of kept panels, for evaluation
    meta: dict = field(default_factory=dict)  # source, series, volume, issue, page_num
    image_scale: float = 1.0  # image pixels per page pixel: 1/2, 1/4 or 1/8 when decoded for a model's crops
    page_size: tuple[int, int] | None = None  # (width, height) of the full page, the frame of ``boxes``
    image_path: str = ""  # where the image was read (its folder vanishing mid-task is the world's fault)
    pixels: np.ndarray | None = None  # ``image`` as uint8 [H, W, 3] when the decoder made it first (JPEGs)

    @property
    def n_kept(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """The full page's (width, height) in pixels, whatever size the image was decoded at."""
        return self.page_size if self.page_size is not None else self.image.size

    def rgb(self) -> np.ndarray:
        """The decoded image as uint8 ``[H, W, 3]``: the decoder's own array where it made one, else
        copied out of ``image`` (what the built-in models crop from)."""
        if self.pixels is not None:
            return self.pixels
        return np.array(self.image if self.image.mode == "RGB" else self.image.convert("RGB"))

    def image_boxes(self) -> np.ndarray:
        """``boxes`` in the decoded image's pixels (what a model crops)."""
        from .images import scaled

        return scaled(self.boxes, self.image_scale)
