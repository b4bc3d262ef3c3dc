"""Draw one page of a store: its image, each panel's box, reading order and attention.

Works at any moment of a build:

- a **done** page (``status == 1``) is drawn from the store: boxes from
  ``panel_coordinates``, labels ``#order a=0.23`` from ``reading_order`` and
  ``attention_weights``, box colour by attention (viridis: dark low, yellow high);
- a **failed** page gets a red banner with the stored ``error`` and, when its
  manifest still parses, its panel boxes from the manifest;
- a **pending** page (not written yet, so its ``page_id`` is not in the store)
  is asked for by position, ``@N``; it is drawn from its manifest with grey
  boxes and a "pending" banner.

Labels keep clear of the lettering: each goes where the page has no ink within a margin (edges on the
pixels: balloons, captions, sound effects, line art; and the manifest's ``balloon_coords``,
``caption_coords``, ``sfx_coords`` where it has them), an inner corner of its box when one is clear,
else the clear spot nearest a corner.  A banner (failed, pending) goes on a strip above the page, so
it covers no panel: such a picture is taller than the page by the strip.

The image is found again from ``manifest_path`` (the manifest's
``page_image_path``, relative to ``image_root`` when given, else to the
manifest's folder), exactly as the build found it.
"""
from __future__ import annotations

import io
import re
import textwrap
from dataclasses import dataclass

import dask
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .inputs import PageRef, PageSource, join_path, parent
from .manifest import PageError, build_page, load_image, parse_manifest, read_manifest_bytes
from .lookup import page_position
from .readers import open_store
from .store.schema import STATUS_DONE, STATUS_FAILED

PENDING_GREY = (150, 150, 150)
FAILED_RED = (200, 30, 30)
PLACEHOLDER_SIZE = (800, 1100)
MAX_FAILED_SCAN = 500  # failed pages whose manifests are read to find a page id


class ShowError(ValueError):
    """The page cannot be found or drawn (one clear line)."""


@dataclass
class ShownPage:
    index: int
    page_id: str
    state: str  # "done" | "failed" | "pending"
    size: tuple[int, int]
    panels: int
    note: str = ""


def _colour(value: float) -> tuple[int, int, int]:
    """Attention (0..1 of the page's maximum) to a colour: matplotlib's viridis when installed."""
    value = float(np.clip(value, 0.0, 1.0))
    try:
        from matplotlib import colormaps

        r, g, b, _ = colormaps["viridis"](value)
        return int(r * 255), int(g * 255), int(b * 255)
    except ImportError:  # a plain blue -> yellow ramp
        return int(60 + 195 * value), int(40 + 190 * value), int(140 - 110 * value)


def _detail(image: Image.Image) -> np.ndarray:
    """Where the page is busy (edges: lettering, balloon outlines, line art), as a boolean mask."""
    return np.array(image.convert("L").filter(ImageFilter.FIND_EDGES)) > 48


#: keys of a manifest's panels that say where lettering is (``[[x, y, w, h], ...]``, page pixels)
LETTERING_KEYS = ("balloon_coords", "caption_coords", "sfx_coords")


def _ink(image: Image.Image, lettering: list) -> np.ndarray:
    """Where a label must not go: edges on the pixels (lettering, balloon outlines, line art) and the
    lettering boxes the manifest gives (a balloon's white inside has no edges, but belongs to it)."""
    ink = _detail(image)
    H, W = ink.shape
    for x, y, w, h in lettering:
        ink[max(0, int(y)):min(H, int(np.ceil(y + h))), max(0, int(x)):min(W, int(np.ceil(x + w)))] = True
    return ink


def _integral(mask: np.ndarray) -> np.ndarray:
    """Summed-area table: ``t[y, x]`` counts the mask's pixels above and left of ``(x, y)``."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = mask.cumsum(axis=0).cumsum(axis=1)
    return table


def _label_spot(ink: np.ndarray, box, size, inset: int, clear: int, table: np.ndarray | None = None
                ) -> tuple[int, int]:
    """Where in ``box`` a label of ``size`` is ``clear`` px or more from any ink, nearest an inner corner.

    Every position on a grid over the box's inside is scored by the ink within ``clear`` of the label
    (the box's own border, ``inset + 3`` px, is not counted: it is the panel's frame, not lettering);
    the least ink wins, then an inner corner (top-left, top-right, bottom-right, bottom-left), then the
    spot nearest one.  A box too small for the label gets its top-left corner.
    """
    table = _integral(ink) if table is None else table
    H, W = ink.shape
    x, y, w, h = (int(round(v)) for v in box)
    lw, lh = (int(v) for v in size)
    m = inset + 1
    x0, y0 = max(0, x + m), max(0, y + m)  # the label's top-left may go from here ...
    x1, y1 = min(W - lw, x + w - lw - m), min(H - lh, y + h - lh - m)  # ... to here
    if x1 < x0 or y1 < y0:
        return max(0, min(x0, W - lw)), max(0, min(y0, H - lh))
    step = max(2, lh // 3)
    xs = np.unique(np.r_[np.arange(x0, x1 + 1, step), x1])
    ys = np.unique(np.r_[np.arange(y0, y1 + 1, step), y1])
    gx, gy = np.meshgrid(xs, ys)
    frame = inset + 3
    fx0, fy0, fx1, fy1 = max(0, x + frame), max(0, y + frame), min(W, x + w - frame), min(H, y + h - frame)
    ax0, ay0 = np.clip(gx - clear, fx0, fx1), np.clip(gy - clear, fy0, fy1)
    ax1, ay1 = np.clip(gx + lw + clear, fx0, fx1), np.clip(gy + lh + clear, fy0, fy1)
    score = table[ay1, ax1] - table[ay0, ax1] - table[ay1, ax0] + table[ay0, ax0]
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    rank = np.full(gx.shape, len(corners), dtype=np.int64)
    for k, (cx, cy) in reversed(list(enumerate(corners))):
        rank[(gx == cx) & (gy == cy)] = k
    near = np.min([np.hypot(gx - cx, gy - cy) for cx, cy in corners], axis=0)
    best = np.lexsort((near.ravel(), rank.ravel(), score.ravel()))[0]
    return int(gx.ravel()[best]), int(gy.ravel()[best])


def _lettering(ref: PageRef, storage_options) -> list:
    """The lettering boxes a manifest gives (``LETTERING_KEYS``), or none; never raises."""
    import json

    try:
        raw = json.loads(read_manifest_bytes(ref, storage_options))
        out = []
        for panel in raw.get("panels") or []:
            for key in LETTERING_KEYS:
                for b in panel.get(key) or []:
                    box = [float(v) for v in b]
                    if len(box) == 4 and np.isfinite(box).all() and box[2] > 0 and box[3] > 0:
                        out.append(box)
        return out
    except Exception:  # noqa: BLE001 - only a hint: the pixels are read anyway
        return []


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _find_page(ds, page: str, storage_options: dict | None = None) -> int:
    n = ds.sizes["page"]
    i = page_position(page, n, ShowError)
    if i is not None:
        return i
    ids = ds["page_id"].values
    hits = np.flatnonzero(ids == page)
    if len(hits) == 0:  # a failed page whose manifest did not parse has no id: try its manifest path
        paths = np.asarray(ds["manifest_path"].values, dtype=object)
        hits = [i for i, p in enumerate(paths)
                if p and (p == page or str(p).rsplit("/", 1)[-1].rsplit(".", 1)[0] == page)]
    if len(hits) == 0:  # failed pages store no id when their image failed: look in their manifests (few)
        status = ds["status"].values
        for i in np.flatnonzero(status == STATUS_FAILED)[:MAX_FAILED_SCAN]:
            try:
                ref = _ref_for(ds, int(i), storage_options)
                if str(parse_manifest(read_manifest_bytes(ref, storage_options)).page_id) == page:
                    return int(i)
            except Exception:
                continue
    if len(hits) == 0:
        done = int((ds["status"].values != 0).sum())
        raise ShowError(
            f"page id {page!r} is not in the store ({done} of {n} pages written so far); a page's id is "
            f"stored when its chunk is written - for a pending page ask by position, e.g. '@17'")
    return int(hits[0])


def _ref_for(ds, index: int, storage_options: dict | None) -> PageRef:
    """Where page ``index``'s manifest is: its ``manifest_path``, else the store's page list."""
    label = str(ds["manifest_path"].values[index])
    if label:
        m = re.fullmatch(r"(.+\.(?:jsonl|ndjson))#(\d+)", label)
        if m:
            src = PageSource(m.group(1), storage_options)
            return src.slice(int(m.group(2)), int(m.group(2)) + 1).refs()[0]
        return PageRef(label=label, path=label, base_dir=parent(label))
    inputs = ds.attrs.get("inputs")
    if not inputs:
        raise ShowError(f"page @{index} is pending and the store does not name its page list")
    try:
        src = PageSource(inputs, storage_options)
    except Exception as exc:
        raise ShowError(f"page @{index} is pending and its page list {inputs!r} cannot be read "
                        f"from here ({exc}); run show from the folder the build ran in") from None
    return src.slice(index, index + 1).refs()[0]


def _manifest_boxes(ref: PageRef, image_root, storage_options, max_panels):
    """What the manifest says, never raising on bad input.

    Returns (image or None, boxes, order labels, problem, placeholder size, page id).
    """
    try:
        manifest = parse_manifest(read_manifest_bytes(ref, storage_options))
    except PageError as exc:
        return None, np.zeros((0, 4), np.float32), [], str(exc), None, ""
    pid = str(manifest.page_id)
    raw = [(p.panel_coords, p.order_index if p.order_index is not None else i) for i, p in enumerate(manifest.panels)]
    image_path = join_path(image_root or ref.base_dir, manifest.page_image_path)
    try:
        image = load_image(image_path, storage_options)
    except PageError as exc:  # draw the manifest's boxes on a blank page of its size
        size = manifest.page_size
        return (None, np.array([c for c, _ in raw], np.float32).reshape(-1, 4), [o for _, o in raw], str(exc),
                (int(size.width), int(size.height)) if size else None, pid)
    try:
        page = build_page(manifest, image, max_panels)
    except PageError as exc:
        return (image, np.array([c for c, _ in raw], np.float32).reshape(-1, 4), [o for _, o in raw], str(exc),
                None, pid)
    return image, page.boxes, [int(o) for o in page.true_order], "", None, pid


def _image_for(ref: PageRef, image_root, storage_options):
    manifest = parse_manifest(read_manifest_bytes(ref, storage_options))
    return load_image(join_path(image_root or ref.base_dir, manifest.page_image_path), storage_options)


def _with_banner(page: Image.Image, text: str, colour, font, pad: int) -> Image.Image:
    """``page`` below a strip that holds ``text``: a banner over the page would cover its top panels."""
    width = page.width
    chars = max(20, int(width / (font.size * 0.55))) if hasattr(font, "size") else 80
    lines = textwrap.wrap(text, chars)[:4]
    line_h = (font.size if hasattr(font, "size") else 11) + pad // 2
    strip = pad * 2 + line_h * len(lines)
    canvas = Image.new("RGB", (width, page.height + strip), colour)
    canvas.paste(page, (0, strip))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((pad, pad + k * line_h), line, fill=(255, 255, 255), font=font)
    return canvas


def render_page(store, page: str, out=None, *, image_root: str | None = None,
                storage_options: dict | None = None) -> tuple[Image.Image, ShownPage]:
    """Draw page ``page`` (a page id, or ``@N`` for the page at position N) of ``store``.

    Returns the picture (the page's own size; a failed or pending page has a banner strip above it)
    and what was drawn; writes it to ``out`` (a path or file object, PNG) when given.
    """
    # Read in this thread: in a process that also holds a Dask client (the build's own, serving the
    # /pagecube page's thumbnails) dask would otherwise send these small reads to the build's workers.
    with dask.config.set(scheduler="synchronous"):
        return _render_page(store, page, out, image_root, storage_options)


def _render_page(store, page: str, out, image_root: str | None,
                 storage_options: dict | None) -> tuple[Image.Image, ShownPage]:
    ds = open_store(store, storage_options)
    index = _find_page(ds, page, storage_options)
    p = ds.isel(page=index).load()
    status = int(p["status"])
    max_panels = ds.sizes["panel"]
    ref = _ref_for(ds, index, storage_options)
    state = {STATUS_DONE: "done", STATUS_FAILED: "failed"}.get(status, "pending")

    note = legend = ""
    labels: list[tuple[np.ndarray, str, tuple[int, int, int]]] = []
    if state == "done":
        try:
            image = _image_for(ref, image_root, storage_options)
        except PageError as exc:
            raise ShowError(f"page {page}: {exc} (pass --image-root if the build used one)") from None
        mask = p["panel_mask"].values
        att = p["attention_weights"].values
        order = p["reading_order"].values
        boxes = p["panel_coordinates"].values
        n_valid = max(1, int(mask.sum()))
        for slot in np.flatnonzero(mask):
            a = float(att[slot])
            # colour: weight against the uniform 1/n, so mid-scale means "an average panel"
            labels.append((boxes[slot], f"#{int(order[slot])} a={a:.2f}", _colour(a * n_valid / 2.0)))
        note = ""
        legend = f"box colour: attention (viridis; mid = uniform 1/{n_valid}, yellow = 2x or more)"
        size = None
    else:
        image, boxes, order, problem, size, manifest_id = _manifest_boxes(ref, image_root, storage_options,
                                                                          max_panels)
        grey = FAILED_RED if state == "failed" else PENDING_GREY
        for box, o in zip(boxes, order):
            labels.append((box, f"#{o}", grey))
        if state == "failed":
            note = f"FAILED: {p['error'].item() or problem or 'no reason stored'}"
        else:
            note = "PENDING: not embedded yet; boxes and order from the manifest"
            if problem:
                note += f" ({problem})"
    if image is None:  # nothing to draw on: a blank page of the manifest's size
        image = Image.new("RGB", size or PLACEHOLDER_SIZE, (235, 235, 235))
    canvas = image.convert("RGB").copy()
    W, H = canvas.size
    draw = ImageDraw.Draw(canvas)
    scale = max(W, H) / 1000.0
    font = _font(max(12, int(18 * scale)))
    line = max(2, int(4 * scale))
    pad = max(4, int(6 * scale))
    ink = _ink(canvas, _lettering(ref, storage_options))  # before any box is drawn: lettering and line art
    table = _integral(ink)
    for box, text, colour in labels:
        x, y, w, h = (float(v) for v in box)
        if not np.isfinite([x, y, w, h]).all():
            continue
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=line)
        tb = draw.textbbox((0, 0), text, font=font)
        size = (tb[2] - tb[0] + 2 * pad, tb[3] - tb[1] + pad)
        lx, ly = _label_spot(ink, (x, y, w, h), size, line, pad, table)
        draw.rectangle([lx, ly, lx + size[0], ly + size[1]], fill=colour)  # the box's colour: the attention scale
        light = sum(colour) > 450
        draw.text((lx + pad - tb[0], ly + pad // 2 - tb[1]), text, fill=(0, 0, 0) if light else (255, 255, 255),
                  font=font)
    if legend:
        small = _font(max(10, int(13 * scale)))
        tb = draw.textbbox((pad, H - pad), legend, font=small, anchor="ld")
        draw.rectangle([tb[0] - 3, tb[1] - 3, tb[2] + 3, tb[3] + 3], fill=(255, 255, 255))
        draw.text((pad, H - pad), legend, fill=(0, 0, 0), font=small, anchor="ld")
    if note:
        canvas = _with_banner(canvas, note, FAILED_RED if state == "failed" else (90, 90, 90), font, pad)
    if out is not None:
        if isinstance(out, (str, bytes)) or hasattr(out, "__fspath__"):
            canvas.save(out, format="PNG")
        else:
            buf = io.BytesIO()
            canvas.save(buf, format="PNG")
            out.write(buf.getvalue())
    pid = str(p["page_id"].item()) if state == "done" else (str(p["page_id"].item()) or manifest_id or page)
    shown = ShownPage(index, pid, state, canvas.size, len(labels), note)
    return canvas, shown
