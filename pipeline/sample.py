"""Deterministic synthetic comic pages for demos, tests and benchmarks.

Why: the project must be runnable and testable with no real comics at hand
(they are large and rarely redistributable), and tests need inputs whose
ground truth is known.  :func:`make_sample` draws simple comic pages (grid
layouts with gutters and borders, tall and wide panels, shapes as art, speech
balloons, captions and sound effects) and writes one "DataSpec" manifest per
page plus a list file, exactly the inputs ``pagecube build`` reads.

What the pages exercise on purpose:

- ``order_index`` is the true reading order, and most manifests list their
  panels shuffled, so a model cannot read the order off the slot position.
  Order is that of a recursive X-Y cut: rows top to bottom, panels left to
  right; a band with a tall panel spanning two rows is read column by column
  (a tall panel on the left comes first, one on the right comes after the two
  short rows beside it).
- About 1 page in 25 has 13-16 panels (over the default panel cap of 12) and
  about 1 in 50 is a single-panel splash page.  Both are placed by index from
  the seed, so any 100 consecutive pages hold 4 dense pages and 2 splashes.
- ``twins=k`` makes the last ``k`` pages redraw pages ``0..k-1``: the same
  panel texts in the same reading order with different art (and usually a
  different layout with the same number of panels), for similarity tests.

Everything is derived from ``(seed, page index)`` through
:class:`numpy.random.SeedSequence` (never from time or ``hash()``), so the same
arguments give byte-identical files with the same Pillow/libjpeg, and page
``i`` does not depend on how many pages are generated (twins aside).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["make_sample", "scan_look", "SERIES", "SCAN_SIZE"]

SERIES = (
    "Lantern Street Irregulars",
    "Captain Moth",
    "The Glass Orchard",
    "Rust & Thunder",
    "Nightjar Station",
)

PAGES_PER_ISSUE = 24
ISSUES_PER_VOLUME = 12
DENSE_EVERY = 25  # one page in 25 has 13-16 panels
SPLASH_EVERY = 50  # one page in 50 is a single-panel splash
SHUFFLE_PROB = 0.85  # share of multi-panel pages whose manifest lists panels shuffled

# streams of per-page randomness
_LAYOUT, _TEXT, _ART, _META = range(4)

# --------------------------------------------------------------------------- text

_NAMES = ["Mara", "Tobin", "Ines", "Okoro", "Vell", "Juno", "Captain", "Doc", "Pip", "Sable"]
_NOUNS = ["lantern", "map", "engine", "orchard", "signal", "key", "tower", "river", "mask",
          "machine", "letter", "storm", "bridge", "comet", "vault", "garden", "train", "mirror"]
_ADJS = ["broken", "silent", "golden", "hidden", "burning", "ancient", "stolen", "frozen",
         "crooked", "humming", "last", "secret"]
_PLACES = ["harbor", "old mill", "rooftops", "station", "market", "lighthouse", "canal",
           "observatory", "tunnels", "orchard gate"]
_VERBS = ["find", "fix", "open", "follow", "guard", "hide", "stop", "carry", "wake", "catch"]
_TIMES = ["Meanwhile", "Later that night", "Three days earlier", "At dawn", "Moments later",
          "Far below", "Back at the station"]
_SFX = ["BAM!", "KRAK!", "WHOOSH", "ZAP!", "THOOM", "SKREE!", "POW!", "CLANG!", "FWOOSH", "KA-BLAM!"]

_DIALOGUE = [
    "{name}, {verb} the {noun}!",
    "Where is the {adj} {noun}?",
    "I told you the {noun} was {adj}.",
    "We have to {verb} it before the {noun} wakes.",
    "Is that the {noun} from the {place}?",
    "Nobody goes to the {place} after dark.",
    "Quick, {verb} the {adj} {noun}!",
    "You never said the {noun} could talk.",
    "Meet me at the {place}, {name}.",
    "That {noun} is not {adj}... it is {adj2}!",
    "Hold on! The {noun} is moving!",
    "{name}? Is that you?",
]
_NARRATION = [
    "{time}, at the {place}...",
    "The {adj} {noun} waited in the {place}.",
    "{time}.",
    "Nobody in the {place} had seen a {noun} like it.",
    "{name} remembered the {adj} {noun}.",
]


def _fill(template: str, rng: random.Random) -> str:
    adj = rng.choice(_ADJS)
    return template.format(
        name=rng.choice(_NAMES), verb=rng.choice(_VERBS), noun=rng.choice(_NOUNS),
        adj=adj, adj2=rng.choice([a for a in _ADJS if a != adj]),
        place=rng.choice(_PLACES), time=rng.choice(_TIMES),
    )


def _panel_text(rng: random.Random) -> dict:
    n_dialogue = rng.choices([0, 1, 2], weights=[0.3, 0.45, 0.25])[0]
    dialogue = [_fill(rng.choice(_DIALOGUE), rng) for _ in range(n_dialogue)]
    narration = [_fill(rng.choice(_NARRATION), rng)] if rng.random() < 0.25 else []
    sfx = [rng.choice(_SFX)] if rng.random() < 0.2 else []
    return {"dialogue": dialogue, "narration": narration, "sfx": sfx}


# ------------------------------------------------------------------------- layout

Box = tuple[int, int, int, int]  # x, y, w, h


def _split(start: int, total: int, n: int, gap: int, rng: random.Random, jitter: float = 0.3):
    """Split [start, start+total) into n spans separated by gap: [(pos, size)]."""
    avail = total - gap * (n - 1)
    weights = [rng.uniform(1 - jitter, 1 + jitter) for _ in range(n)]
    s = sum(weights)
    edges, cum = [0], 0.0
    for w in weights:
        cum += w
        edges.append(round(avail * cum / s))
    out, pos = [], start
    for k in range(n):
        size = edges[k + 1] - edges[k]
        out.append((pos, size))
        pos += size + gap
    return out


def _row(x0: int, width: int, y: int, h: int, k: int, gap: int, rng: random.Random) -> list[Box]:
    return [(x, y, w, h) for x, w in _split(x0, width, k, gap, rng)]


def _layout_from_bands(bands: list, W: int, H: int, rng: random.Random) -> list[Box]:
    """Boxes in reading order for a list of bands (("row", k) or ("double", side, kt, kb))."""
    margin = max(4, round(0.04 * W))
    gap = max(3, round(0.016 * W))
    units = sum(2 if b[0] == "double" else 1 for b in bands)
    rows = _split(margin, H - 2 * margin, units, gap, rng, jitter=0.25)
    x0, width = margin, W - 2 * margin
    boxes: list[Box] = []
    u = 0
    for band in bands:
        if band[0] == "row":
            y, h = rows[u]
            boxes += _row(x0, width, y, h, band[1], gap, rng)
            u += 1
            continue
        _, side, kt, kb = band
        (y1, h1), (y2, h2) = rows[u], rows[u + 1]
        tall_w = round((width - gap) * rng.uniform(0.35, 0.5))
        rest_w = width - gap - tall_w
        tall_h = y2 + h2 - y1
        if side == "left":
            boxes.append((x0, y1, tall_w, tall_h))
            rx = x0 + tall_w + gap
            boxes += _row(rx, rest_w, y1, h1, kt, gap, rng)
            boxes += _row(rx, rest_w, y2, h2, kb, gap, rng)
        else:
            boxes += _row(x0, rest_w, y1, h1, kt, gap, rng)
            boxes += _row(x0, rest_w, y2, h2, kb, gap, rng)
            boxes.append((x0 + rest_w + gap, y1, tall_w, tall_h))
        u += 2
    return boxes


def _bands_normal(rng: random.Random) -> list:
    n_units = rng.choice([2, 3, 3, 3, 4, 4])
    bands, u, has_double = [], 0, False
    while u < n_units:
        if n_units - u >= 2 and not has_double and rng.random() < 0.3:
            bands.append(("double", rng.choice(["left", "right"]),
                          rng.choice([1, 1, 2]), rng.choice([1, 1, 2])))
            has_double, u = True, u + 2
        else:
            bands.append(("row", rng.choices([1, 2, 3], weights=[0.2, 0.5, 0.3])[0]))
            u += 1
    return bands


def _bands_dense(rng: random.Random) -> list:
    return [("row", rng.choice([3, 4])) for _ in range(rng.choice([4, 5]))]


def _n_of(bands: list) -> int:
    return sum(b[1] if b[0] == "row" else 1 + b[2] + b[3] for b in bands)


def _layout(kind: str, W: int, H: int, rng: random.Random, target: int | None = None) -> list[Box]:
    """Panel boxes in reading order. ``target`` forces the panel count (twins)."""
    if target == 1 or (target is None and kind == "splash"):
        return _layout_from_bands([("row", 1)] * 1, W, H, rng)
    gen = _bands_dense if (kind == "dense" if target is None else target > 12) else _bands_normal
    lo, hi = (13, 16) if gen is _bands_dense else (2, 9)
    for _ in range(200):
        bands = gen(rng)
        n = _n_of(bands)
        if (n == target) if target is not None else lo <= n <= hi:
            return _layout_from_bands(bands, W, H, rng)
    # fallback for an unusual target: plain grid, up to 4 panels a row
    per_row = 3 if target <= 9 else 4
    counts = [per_row] * (target // per_row) + ([target % per_row] if target % per_row else [])
    return _layout_from_bands([("row", k) for k in counts], W, H, rng)


# -------------------------------------------------------------------------- drawing

_FONTS: dict[int, ImageFont.ImageFont] = {}


def _font(size: int):
    size = max(8, int(size))
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: fixed bitmap font
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def _wrap(text: str, font, max_w: float) -> str:
    lines, cur = [], ""
    for word in text.split():
        trial = f"{cur} {word}" if cur else word
        if cur and font.getlength(trial) > max_w:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    if cur:
        lines.append(cur)
    return "\n".join(lines)


def _colour(rng: random.Random, lo: int = 30, hi: int = 230) -> tuple[int, int, int]:
    return (rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi))


def _draw_art(d: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random, ink: int = 2) -> None:
    if rng.random() < 0.5:  # ground
        gy = rng.randint(h // 2, h - 1)
        d.rectangle([0, gy, w, h], fill=_colour(rng, 90, 200))
    for _ in range(rng.randint(2, 5)):
        kind = rng.random()
        cx, cy = rng.randint(0, w), rng.randint(0, h)
        rx, ry = rng.randint(max(4, w // 12), max(5, w // 3)), rng.randint(max(4, h // 12), max(5, h // 3))
        fill, line = _colour(rng), (0, 0, 0)
        if kind < 0.4:
            d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill, outline=line, width=ink)
        elif kind < 0.7:
            d.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill, outline=line, width=ink)
        else:
            k = rng.randint(3, 6)
            angles = sorted(rng.uniform(0, 2 * np.pi) for _ in range(k))
            pts = [(cx + rx * float(np.cos(a)), cy + ry * float(np.sin(a))) for a in angles]
            d.polygon(pts, fill=fill, outline=line, width=ink)


def _draw_text(d: ImageDraw.ImageDraw, w: int, h: int, text: dict, page_w: int,
               rng: random.Random, ink: int = 2) -> dict[str, list[Box]]:
    """Caption, balloons and sfx inside a w x h panel; returns where each kind of lettering is (panel coords)."""
    pad = max(3, w // 40)
    size = max(9, min(round(page_w * 0.018), round(w * 0.07)))
    font = _font(size)
    top = pad
    captions: list[Box] = []
    for line in text["narration"]:
        s = _wrap(line, font, w * 0.8)
        bb = d.multiline_textbbox((0, 0), s, font=font, spacing=2)
        bw, bh = bb[2] + 2 * pad, bb[3] + 2 * pad
        d.rectangle([pad, top, min(w - pad, pad + bw), top + bh], fill=(250, 236, 160),
                    outline=(0, 0, 0), width=1)
        d.multiline_text((2 * pad, top + pad), s, font=font, fill=(0, 0, 0), spacing=2)
        captions.append((pad, top, min(w - pad, pad + bw) - pad + 1, bh + 1))
        top += bh + pad
    balloons: list[Box] = []
    n = len(text["dialogue"])
    for k, line in enumerate(text["dialogue"]):
        s = _wrap(line, font, min(w * (0.5 if n > 1 else 0.65), size * 11))
        bb = d.multiline_textbbox((0, 0), s, font=font, spacing=2, align="center")
        tw, th = bb[2] - bb[0], bb[3] - bb[1]
        ew = min(w - 2 * pad, round(tw * 1.35 + 2 * pad))
        eh = min(h - 2 * pad, round(th * 1.45 + 2 * pad))
        # first balloon to the left, second to the right and lower
        xlo, xhi = (pad, max(pad, w // 2 - ew // 2)) if (n > 1 and k == 0) else \
                   ((max(pad, w // 2 - ew // 2), max(pad, w - pad - ew)) if n > 1 else (pad, max(pad, w - pad - ew)))
        ylo = min(top, max(pad, h - pad - eh))
        yhi = max(ylo, min(ylo + h // 6, h - pad - eh))
        ex, ey = rng.randint(xlo, xhi), rng.randint(ylo, yhi)
        ex, ey = max(0, min(ex, w - ew)), max(0, min(ey, h - eh))
        cx, cy = ex + ew / 2, ey + eh / 2
        tip = (cx + rng.uniform(-0.3, 0.3) * ew, min(h - 1, ey + eh + rng.uniform(0.2, 0.5) * eh))
        d.polygon([(cx - ew * 0.1, cy + eh * 0.3), (cx + ew * 0.1, cy + eh * 0.3), tip],
                  fill=(255, 255, 255), outline=(0, 0, 0), width=ink)
        d.ellipse([ex, ey, ex + ew - 1, ey + eh - 1], fill=(255, 255, 255), outline=(0, 0, 0), width=ink)
        d.multiline_text((cx, cy), s, font=font, fill=(0, 0, 0), anchor="mm", align="center", spacing=2)
        balloons.append((ex, ey, ew, eh))
        top = ey + round(eh * 0.85)  # the next balloon sits lower
    sfx: list[Box] = []
    for word in text["sfx"]:
        f = _font(max(12, min(round(w * 0.14), round(h * 0.2), round(page_w * 0.06))))
        tw = f.getlength(word)
        x = rng.randint(pad, max(pad, int(w - tw - pad)))
        y_hi = max(pad, h - pad - f.size)
        y = rng.randint(min(max(pad, h // 2), y_hi), y_hi)
        d.text((x, y), word, font=f, fill=_colour(rng, 150, 255), stroke_width=ink, stroke_fill=(0, 0, 0))
        x0, y0, x1, y1 = d.textbbox((x, y), word, font=f, stroke_width=ink)
        sfx.append((x0, y0, x1 - x0, y1 - y0))
    return {"balloon_coords": balloons, "caption_coords": captions, "sfx_coords": sfx}


def _draw_page(W: int, H: int, boxes: list[Box], texts: list[dict], rng: random.Random):
    page = Image.new("RGB", (W, H), (255, 255, 255))
    lettering: list[dict[str, list[list[int]]]] = []  # per panel: balloon, caption and sfx boxes (page coords)
    ink = max(2, round(2 * W / 800))  # line art keeps its weight on larger pages (2 px up to 1000 px wide)
    for (x, y, w, h), text in zip(boxes, texts):
        panel = Image.new("RGB", (w, h), _colour(rng, 170, 250))
        d = ImageDraw.Draw(panel)
        _draw_art(d, w, h, rng, ink)
        drawn = _draw_text(d, w, h, text, W, rng, ink)
        page.paste(panel, (x, y))
        lettering.append({k: [[x + bx, y + by, bw, bh] for bx, by, bw, bh in v] for k, v in drawn.items()})
    d = ImageDraw.Draw(page)
    bw = max(2, W // 300)
    for x, y, w, h in boxes:
        d.rectangle([x, y, x + w - 1, y + h - 1], outline=(0, 0, 0), width=bw)
    return page, lettering


def scan_look(img: Image.Image) -> Image.Image:
    """The faint warm tint of scanned paper (a printed page is not pure white); art stays flat colour."""
    r, g, b = img.split()
    return Image.merge("RGB", (r, g.point(lambda v: max(0, v - 3)), b.point(lambda v: max(0, v - 9))))


# ----------------------------------------------------------------------------- api

def _rng(seed: int, index: int, stream: int) -> random.Random:
    state = np.random.SeedSequence([seed % 2**64, index, stream]).generate_state(2, np.uint64)
    return random.Random(int(state[0]) << 64 | int(state[1]))


def _kind(seed: int, index: int) -> str:
    r = _rng(seed, 0, 99)  # page kinds: one draw per seed
    dense_off = r.randrange(DENSE_EVERY)
    # splash residue differs from the dense one mod 25, so the two never collide
    splash_off = (dense_off + 12) % DENSE_EVERY + DENSE_EVERY * r.randrange(SPLASH_EVERY // DENSE_EVERY)
    if (index + dense_off) % DENSE_EVERY == 0:
        return "dense"
    if (index + splash_off) % SPLASH_EVERY == 0:
        return "splash"
    return "normal"


@dataclass
class _Spec:
    boxes: list[Box]  # reading order
    texts: list[dict]  # reading order


def _spec(seed: int, index: int, W: int, H: int) -> _Spec:
    boxes = _layout(_kind(seed, index), W, H, _rng(seed, index, _LAYOUT))
    trng = _rng(seed, index, _TEXT)
    return _Spec(boxes, [_panel_text(trng) for _ in boxes])


#: A common size of digital comic scans (width, height), for ``pagecube sample --size``.
SCAN_SIZE = (1988, 3056)


def make_sample(out_dir: str | Path, pages: int, seed: int = 0, *,
                image_size: tuple[int, int] = (800, 1200), twins: int = 0, scan: bool = False) -> Path:
    """Write ``pages`` synthetic comic pages under ``out_dir`` and return ``pages.txt``.

    Writes ``images/page_00000.jpg ...``, ``manifests/page_00000.json ...`` (panel
    ``order_index`` is the true reading order; panels are listed shuffled on most
    pages) and ``pages.txt`` with one manifest path a line, relative to its folder.
    Each panel also says where its lettering is, in page pixels: ``balloon_coords``,
    ``caption_coords`` and ``sfx_coords`` (``[x, y, w, h]`` each).
    ``image_size`` is ``(width, height)``.  ``scan=True`` makes the pages look like scans: flat
    colour and line art on tinted paper, JPEG quality 90 (about 0.3-0.6 MB a page at :data:`SCAN_SIZE`).  With ``twins=k`` the last ``k`` pages
    carry the panel texts of pages ``0..k-1`` with different drawings.
    Same arguments give byte-identical files.
    """
    pages, seed, twins = int(pages), int(seed), int(twins)
    W, H = (int(v) for v in image_size)
    if pages < 0:
        raise ValueError(f"pages must be >= 0, got {pages}")
    if not 0 <= twins <= pages // 2:
        raise ValueError(f"twins must be between 0 and pages // 2 = {pages // 2}, got {twins}")
    if W < 100 or H < 100:
        raise ValueError(f"image_size must be at least 100x100, got {W}x{H}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "manifests").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(pages):
        name = f"page_{i:05d}"
        if i >= pages - twins:
            orig = _spec(seed, i - (pages - twins), W, H)
            n = len(orig.boxes)
            boxes = _layout("normal", W, H, _rng(seed, i, _LAYOUT), target=n)
            spec = _Spec(boxes, orig.texts)
        else:
            spec = _spec(seed, i, W, H)
        n = len(spec.boxes)
        img, lettering = _draw_page(W, H, spec.boxes, spec.texts, _rng(seed, i, _ART))
        if scan:
            img = scan_look(img)
        img.save(out / "images" / f"{name}.jpg", "JPEG", quality=90 if scan else 85)

        mrng = _rng(seed, i, _META)
        slots = list(range(n))
        if n > 1 and mrng.random() < SHUFFLE_PROB:
            mrng.shuffle(slots)
        issue_no = i // PAGES_PER_ISSUE
        manifest = {
            "page_id": f"sample_{i:05d}",
            "page_image_path": f"../images/{name}.jpg",
            "page_size": {"width": W, "height": H},
            "source": "pagecube-sample",
            "series": SERIES[(issue_no + seed) % len(SERIES)],
            "volume": str(issue_no // ISSUES_PER_VOLUME + 1),
            "issue": str(issue_no % ISSUES_PER_VOLUME + 1),
            "page_num": i % PAGES_PER_ISSUE + 1,
            "panels": [
                {
                    "panel_id": f"p{slot}",
                    "panel_coords": list(spec.boxes[r]),
                    "order_index": r,
                    "text": spec.texts[r],
                    "character_coords": [],
                    **lettering[r],  # balloon_coords, caption_coords, sfx_coords: where the lettering is
                }
                for slot, r in enumerate(slots)
            ],
        }
        (out / "manifests" / f"{name}.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        lines.append(f"manifests/{name}.json")
    pages_txt = out / "pages.txt"
    pages_txt.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return pages_txt
