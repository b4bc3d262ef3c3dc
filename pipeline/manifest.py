"""Read and validate one page: manifest (DataSpec) + image -> :class:`Page`, or a reason.

Bad input never crashes a build: every problem becomes a :class:`PageError`
whose one-line message is stored in ``error`` with ``status == 2``.  What is
handled rather than failed (documented in the README):

- zero panels: an empty panel set; more panels than the cap: the first
  ``max_panels`` by ``order_index`` are kept, ``n_panels`` keeps the true count;
- boxes partly outside the image are clipped; a manifest ``page_size`` that
  differs from the image scales the boxes to the image;
- text items that are numbers are turned into strings, text longer than
  ``MAX_TEXT_CHARS`` per panel is cut, invalid UTF-8 and lone surrogates become
  U+FFFD; grayscale, CMYK, palette and alpha images are converted to RGB
  (alpha composited on white);
- duplicate page ids: every page is built (the page axis is the order of the
  list and ``page_id`` is metadata); lookups by id take the first match.

Failed (``status == 2``, reason in ``error``): manifest missing, not JSON, not
a JSON object, missing or mistyped fields (text that is not a string or a
number included); image missing, truncated, corrupt, not an image, or over
``MAX_IMAGE_PIXELS`` (checked from the header before decoding, so a
decompression bomb costs nothing); a panel box with a non-finite value, zero or
negative size, or entirely outside the image.
"""
from __future__ import annotations

import json
import math
from typing import Any

import fsspec
import numpy as np
from PIL import Image, ImageFile
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import images
from .inputs import PageRef, join_path
from .pages import TEXT_KINDS, Page

MAX_TEXT_CHARS = 4000
MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard: about 8000 x 8000
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
ImageFile.LOAD_TRUNCATED_IMAGES = False


class PageError(Exception):
    """A page that cannot be processed; ``str(err)`` is the stored reason."""


def clean_text(s: str) -> str:
    # lone surrogates (JSON "\ud800" escapes) -> U+FFFD; valid pairs were already joined by json
    s = s.encode("utf-16-le", errors="surrogatepass").decode("utf-16-le", errors="replace")
    return s if len(s) <= MAX_TEXT_CHARS else s[: MAX_TEXT_CHARS - 1] + "…"


def _text_items(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {type(value).__name__}")
    out = []
    for item in value:
        if item is None:
            continue
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ValueError(f"text items must be strings, got {type(item).__name__}")
        out.append(clean_text(str(item)))
    return out


class PanelText(BaseModel):
    model_config = ConfigDict(extra="ignore")
    dialogue: list[str] = Field(default_factory=list)
    narration: list[str] = Field(default_factory=list)
    sfx: list[str] = Field(default_factory=list)

    _coerce = field_validator(*TEXT_KINDS, mode="before")(classmethod(lambda cls, v: _text_items(v)))

    def joined(self) -> str:
        return clean_text("\n".join([*self.dialogue, *self.narration, *self.sfx]))


class PanelSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    panel_id: str | int | None = None
    panel_coords: list[float] = Field(min_length=4, max_length=4)
    order_index: int | None = None
    text: PanelText | None = None

    @field_validator("text", mode="before")
    @classmethod
    def _plain_text(cls, v):
        if isinstance(v, (str, list)):
            return {"dialogue": v}
        return v


class PageSize(BaseModel):
    width: float = Field(gt=0)
    height: float = Field(gt=0)


def _meta_str(v: Any) -> str:
    return "" if v is None else clean_text(str(v))


class Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    page_id: str | int
    page_image_path: str
    page_size: PageSize | None = None
    panels: list[PanelSpec]
    source: Any = None
    series: Any = None
    volume: Any = None
    issue: Any = None
    page_num: int | None = None

    @field_validator("page_num", mode="before")
    @classmethod
    def _num(cls, v):
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        if isinstance(v, str) or isinstance(v, float):
            return None if isinstance(v, str) or math.isnan(v) else int(v)
        return v


def _one_line_validation(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "manifest"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"invalid manifest: {where}: {first['msg']}{more}"


def parse_manifest(raw: bytes) -> Manifest:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise PageError(f"manifest is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} byte limit")
    try:
        data = json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise PageError(f"manifest is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict):
        raise PageError(f"manifest is JSON but not an object (got {type(data).__name__})")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise PageError(_one_line_validation(exc)) from None


def read_image_bytes(path: str, storage_options: dict | None = None) -> bytes:
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError:
        raise PageError(f"image not found: {path}") from None
    except OSError as exc:
        raise PageError(f"cannot read image {path}: {exc}") from None


def _why(path: str, err: images.ImageDecodeError) -> PageError:
    reason = str(err)
    if reason.startswith("image is "):  # over the pixel limit: the size says it all
        return PageError(reason)
    if reason.startswith("exceeds"):
        return PageError(f"image {reason}: {path}")
    kind, _, detail = reason.partition(": ")
    return PageError(f"{kind}: {path}: {detail}")


def load_image(path: str, storage_options: dict | None = None) -> Image.Image:
    """The whole image at full size, RGB (for drawing a page; builds decode at the model's size)."""
    raw = read_image_bytes(path, storage_options)
    try:
        return images.decode(images.open_image(raw, MAX_IMAGE_PIXELS), 1, raw=raw).image
    except images.ImageDecodeError as err:
        raise _why(path, err) from None


def build_page(m: Manifest, image: Image.Image, max_panels: int) -> Page:
    """Validate panels against a full-size image, cap them, and assemble the Page."""
    page = page_from_manifest(m, image.size, max_panels)
    page.image = image
    return page


def page_from_manifest(m: Manifest, size: tuple[int, int], max_panels: int) -> Page:
    """Validate panels against the page's ``size`` (width, height), cap them: a Page without its image."""
    W, H = size
    sx = W / m.page_size.width if m.page_size else 1.0
    sy = H / m.page_size.height if m.page_size else 1.0
    boxes, texts, order = [], [], []
    for i, p in enumerate(m.panels):
        name = p.panel_id if p.panel_id is not None else i
        x, y, w, h = p.panel_coords
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise PageError(f"panel {name}: non-finite panel_coords {p.panel_coords}")
        if w <= 0 or h <= 0:
            raise PageError(f"panel {name}: box {p.panel_coords} has zero or negative size")
        x0, y0 = max(0.0, x * sx), max(0.0, y * sy)
        x1, y1 = min(float(W), (x + w) * sx), min(float(H), (y + h) * sy)
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise PageError(f"panel {name}: box {p.panel_coords} lies outside the {W}x{H} image")
        boxes.append((x0, y0, x1 - x0, y1 - y0))
        texts.append(p.text.joined() if p.text else "")
        order.append(p.order_index if p.order_index is not None else i)
    n = len(boxes)
    keep = np.arange(n)
    if n > max_panels:
        by_order = sorted(range(n), key=lambda j: (order[j], j))[:max_panels]
        keep = np.array(sorted(by_order))
    arr = np.array(boxes, dtype=np.float32).reshape(-1, 4)[keep]
    return Page(
        page_id=_meta_str(m.page_id),
        image=None,
        page_size=(int(W), int(H)),
        boxes=arr,
        texts=[texts[j] for j in keep],
        n_panels=n,
        true_order=np.array([order[j] for j in keep], dtype=np.int64),
        meta={
            "source": _meta_str(m.source),
            "series": _meta_str(m.series),
            "volume": _meta_str(m.volume),
            "issue": _meta_str(m.issue),
            "page_num": -1 if m.page_num is None else int(m.page_num),
        },
    )


def read_manifest_bytes(ref: PageRef, storage_options: dict | None = None) -> bytes:
    if ref.inline is not None:
        return ref.inline
    try:
        with fsspec.open(ref.path, "rb", **(storage_options or {})) as f:
            return f.read(MAX_MANIFEST_BYTES + 1)
    except (FileNotFoundError, IsADirectoryError):
        raise PageError(f"manifest not found: {ref.path}") from None
    except OSError as exc:
        raise PageError(f"cannot read manifest {ref.path}: {exc}") from None


def read_page(ref: PageRef, *, max_panels: int, image_root: str | None = None,
              storage_options: dict | None = None, panel_side: int | None = None) -> Page:
    """Everything for one page, or PageError. Runs on workers, in a thread pool.

    ``panel_side`` is the side the model resizes panel crops to (``PageModel.panel_side``): the image
    is decoded just large enough for it (see :mod:`pipeline.images`); None decodes in full.
    """
    manifest = parse_manifest(read_manifest_bytes(ref, storage_options))
    image_path = join_path(image_root or ref.base_dir, manifest.page_image_path)
    raw = read_image_bytes(image_path, storage_options)
    try:
        header = images.open_image(raw, MAX_IMAGE_PIXELS)
        declared = (manifest.page_size.width, manifest.page_size.height) if manifest.page_size else None
        orientation = images.orientation_for(header, declared)
        page = page_from_manifest(manifest, images.upright_size(header, orientation), max_panels)
        reduction = images.reduction_for(page.boxes, page.size, panel_side)
        page.image, page.image_scale, page.pixels = images.decode(header, reduction, orientation, raw)
        page.image_path = image_path
    except images.ImageDecodeError as err:
        raise _why(image_path, err) from None
    return page
