"""``pagecube show``: the page picture for done, failed and pending pages."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import pipeline
from pipeline.cli import main
from pipeline.sample import make_sample


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("show")
    listing = make_sample(tmp / "pages", 8, seed=5)
    (tmp / "pages" / "images" / "page_00002.jpg").unlink()  # page 2 fails: image not found
    store = tmp / "cube.zarr"
    result = pipeline.build(str(listing), str(store), cluster="sync", chunk_pages=4, model="tiny", progress=False)
    assert (result.done, result.failed) == (7, 1)
    pending = tmp / "pending.zarr"
    pipeline.build(str(listing), str(pending), cluster="sync", chunk_pages=4, init_only=True, model="tiny",
                   progress=False)
    return tmp, store, pending


def test_show_done_page_draws_boxes_on_the_page(built, capsys):
    tmp, store, _ = built
    out = tmp / "p1.png"
    assert main(["show", str(store), "sample_00001", "-o", str(out)]) == 0
    assert "(done)" in capsys.readouterr().out
    original = np.asarray(Image.open(tmp / "pages" / "images" / "page_00001.jpg").convert("RGB")).astype(int)
    drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert drawn.shape == original.shape  # the picture is the page's own size

    ds = pipeline.open_pages(str(store))
    page = ds.isel(page=int(np.flatnonzero(ds["page_id"].values == "sample_00001")[0])).load()
    boxes = page["panel_coordinates"].values[page["panel_mask"].values]
    assert len(boxes) > 0
    for x, y, w, h in boxes:
        x0, y0, x1, y1 = int(x), int(y), int(x + w), int(y + h)
        ym = (y0 + y1) // 2
        edge = drawn[ym - 5: ym + 5, x0: x0 + 2]  # the box outline on the left edge
        assert np.abs(edge - original[ym - 5: ym + 5, x0: x0 + 2]).max() > 40
        corners = [(slice(y0 + 6, y0 + 14), slice(x0 + 6, x0 + 30)), (slice(y0 + 6, y0 + 14), slice(x1 - 30, x1 - 6)),
                   (slice(y1 - 14, y1 - 6), slice(x0 + 6, x0 + 30)), (slice(y1 - 14, y1 - 6), slice(x1 - 30, x1 - 6))]
        # the "#order a=..." label sits in one inner corner of the box
        assert max(np.abs(drawn[c] - original[c]).mean() for c in corners) > 20
        inner = (slice(ym - 3, ym + 3), slice((x0 + x1) // 2 - 3, (x0 + x1) // 2 + 3))
        assert np.abs(drawn[inner] - original[inner]).max() <= 3  # the page itself is left as it was


def test_show_labels_hide_no_balloon_or_caption(built, tmp_path):
    """Labels go to a corner without lettering: every balloon the sample drew is left as it was, and a panel
    with a caption (drawn from its top-left corner) has its label elsewhere."""
    tmp, store, _ = built
    checked = 0
    for k in (0, 1, 3, 4, 5, 6, 7):  # the done pages (page 2 failed)
        out = tmp_path / f"b{k}.png"
        assert main(["show", str(store), f"@{k}", "-o", str(out)]) == 0
        manifest = json.loads((tmp / "pages" / "manifests" / f"page_{k:05d}.json").read_text())
        original = np.asarray(Image.open(tmp / "pages" / "images" / f"page_{k:05d}.jpg").convert("RGB")).astype(int)
        drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
        for panel in manifest["panels"]:
            x, y, w, h = panel["panel_coords"]
            for bx, by, bw, bh in panel["balloon_coords"]:
                inside = (slice(max(by, y + 12), min(by + bh, y + h - 12)), slice(max(bx, x + 12), min(bx + bw, x + w - 12)))
                assert np.abs(drawn[inside] - original[inside]).max() <= 3, (k, panel["panel_id"])
                checked += 1
            if panel["text"]["narration"]:
                caption = (slice(y + 8, y + 16), slice(x + 8, x + 40))
                assert np.abs(drawn[caption] - original[caption]).max() <= 3, (k, panel["panel_id"])
                checked += 1
    assert checked > 10


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Four pages built by a model whose attention is spread far apart (weights 1, 1/2, 1/4, ...)."""
    tmp = tmp_path_factory.mktemp("graded")
    listing = make_sample(tmp / "pages", 4, seed=5)
    store = tmp / "graded.zarr"
    result = pipeline.build(str(listing), str(store), cluster="sync", chunk_pages=4, progress=False,
                            model="models_for_tests:graded_attention")
    assert result.done == 4
    return tmp, store


def test_show_labels_and_colours_follow_attention(graded, tmp_path):
    """Read the picture: each box's outline is a viridis colour whose place on the scale follows the
    panel's attention (the most attended panel at the yellow end, the least at the dark end), and a
    label in that colour, with text on it, sits inside each box."""
    from matplotlib import colormaps

    tmp, store = graded
    ds = pipeline.open_pages(str(store))
    n_valid = ds["panel_mask"].values.sum(axis=1)
    index = int(np.argmax(n_valid))  # the page with the most panels
    page = ds.isel(page=index).load()
    pid = str(page["page_id"].item())
    out = tmp_path / "graded.png"
    assert main(["show", str(store), pid, "-o", str(out)]) == 0
    drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
    original = np.asarray(Image.open(tmp / "pages" / "images" / f"page_{index:05d}.jpg").convert("RGB")).astype(int)

    mask = page["panel_mask"].values
    att = page["attention_weights"].values[mask]
    boxes = page["panel_coordinates"].values[mask]
    assert len(att) >= 4 and att.max() > 8 * att.min()  # far from uniform: the colours must tell them apart
    lut = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(int)
    line = max(2, int(4 * max(drawn.shape[:2]) / 1000))  # outline width in pixels

    places = []
    for x, y, w, h in boxes:
        x0, y0, ym = int(round(x)), int(round(y)), int(y + h / 2)
        x1, y1 = int(round(x + w)), int(round(y + h))
        edge = drawn[ym - 5: ym + 5, x0 + 1]  # the middle of the box's left edge
        colour = np.median(edge, axis=0).astype(int)
        assert (np.abs(edge - colour).sum(axis=1) == 0).mean() > 0.8, edge  # one flat colour
        dist = np.abs(lut - colour).sum(axis=1)
        assert dist.min() <= 6, (colour, "not a viridis colour")
        places.append(int(np.argmin(dist)) / 255)

        # the label: a patch of the box's colour inside it (an inner corner when that is clear of lettering),
        # with text in white or black on it
        inside = (slice(y0 + line + 1, y1 - line - 1), slice(x0 + line + 1, x1 - line - 1))
        window = drawn[inside]
        ys, xs = np.nonzero(np.abs(window - colour).sum(axis=2) <= 3)
        assert len(ys) >= 200 and ys.max() - ys.min() >= 12, "no label at the box"
        patch = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        ink = (255, 255, 255) if colour.sum() <= 450 else (0, 0, 0)
        assert (np.abs(window[patch] - ink).sum(axis=2) < 150).sum() >= 15, "a label without text"
        assert np.abs(window[patch] - original[inside][patch]).mean() > 20  # drawn over the page

    places = np.array(places)
    hi, lo = int(np.argmax(att)), int(np.argmin(att))
    assert places[hi] >= 0.9, places  # the most attended panel: the yellow end
    assert places[lo] <= 0.15, places  # the least attended panel: the dark end
    order = np.argsort(att)
    assert (np.diff(places[order]) >= 0).all(), (att[order], places[order])  # more attention, further up the scale


def test_show_failed_page_has_a_banner_with_the_reason(built, capsys):
    tmp, store, _ = built
    out = tmp / "p2.png"
    assert main(["show", str(store), "sample_00002", "-o", str(out)]) == 0  # found through its manifest
    printed = capsys.readouterr().out
    assert "(failed)" in printed and "image not found" in printed
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    r, g, b = img[5, 5]
    assert r > 150 and g < 80 and b < 80  # the red banner


def test_show_pending_page_mid_run(built, capsys):
    tmp, _, pending = built
    out = tmp / "pending.png"
    assert main(["show", str(pending), "@1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(pending)" in printed and "sample_00001" in printed
    drawn, page = Image.open(out), Image.open(tmp / "pages" / "images" / "page_00001.jpg")
    assert drawn.width == page.width and page.height < drawn.height < page.height + 100  # the page, a banner above
    # a pending page's id is not in the store yet: one clear line that says how to ask for it
    assert main(["show", str(pending), "sample_00001", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not in the store" in err and "@" in err and "Traceback" not in err
    assert main(["show", str(pending), "@99", "-o", str(out)]) == 2


def _outline_zone(shape, boxes, width: int) -> np.ndarray:
    """Pixels within ``width`` of a panel box's edges, where ``show`` draws its outlines."""
    zone = np.zeros(shape[:2], dtype=bool)
    for x, y, w, h in boxes:
        x0, y0, x1, y1 = int(x), int(y), int(np.ceil(x + w)), int(np.ceil(y + h))
        for a, b, c, d in ((y0, y1, x0, x0), (y0, y1, x1, x1), (y0, y0, x0, x1), (y1, y1, x0, x1)):
            zone[max(0, a - width):b + width + 1, max(0, c - width):d + width + 1] = True
    return zone


def test_show_labels_keep_clear_of_all_lettering_sound_effects_included(tmp_path):
    """Every balloon, caption and sound effect the sample drew (the manifest says where), and 2 px around it,
    is left as it was: no label touches lettering (issue 25: '#5 a=0.15' touched the T of THOOM)."""
    listing = make_sample(tmp_path / "pages", 12, seed=5)
    store = tmp_path / "cube.zarr"
    assert pipeline.build(str(listing), str(store), cluster="sync", chunk_pages=4, model="tiny",
                          progress=False).done == 12
    checked = {"balloon_coords": 0, "caption_coords": 0, "sfx_coords": 0}
    for k in range(12):
        out = tmp_path / f"l{k}.png"
        assert main(["show", str(store), f"@{k}", "-o", str(out)]) == 0
        manifest = json.loads((tmp_path / "pages" / "manifests" / f"page_{k:05d}.json").read_text())
        original = np.asarray(Image.open(tmp_path / "pages" / "images" / f"page_{k:05d}.jpg").convert("RGB")).astype(int)
        drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
        line = max(2, int(4 * max(drawn.shape[:2]) / 1000))
        changed = (np.abs(drawn - original).max(axis=2) > 3) & ~_outline_zone(
            drawn.shape, [p["panel_coords"] for p in manifest["panels"]], line + 1)
        for panel in manifest["panels"]:
            for key in checked:
                for bx, by, bw, bh in panel[key]:
                    around = changed[max(0, by - 2):by + bh + 2, max(0, bx - 2):bx + bw + 2]
                    assert not around.any(), (k, panel["panel_id"], key, panel["text"])
                    checked[key] += 1
    assert min(checked.values()) >= 5, checked  # sound effects, captions and balloons were all checked


def test_show_pending_banner_covers_no_panel(built, tmp_path):
    """The grey banner sits on a strip above the page: the top border of every panel, #0 and #1 included,
    is still drawn in the pending grey, and the page below the strip is the page."""
    from pipeline.show import PENDING_GREY

    tmp, _, pending = built
    for k in (0, 1, 3):
        out = tmp_path / f"pending{k}.png"
        assert main(["show", str(pending), f"@{k}", "-o", str(out)]) == 0
        manifest = json.loads((tmp / "pages" / "manifests" / f"page_{k:05d}.json").read_text())
        original = np.asarray(Image.open(tmp / "pages" / "images" / f"page_{k:05d}.jpg").convert("RGB")).astype(int)
        drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
        strip = drawn.shape[0] - original.shape[0]
        assert strip > 20 and (drawn[:strip, :, :] == (90, 90, 90)).all(axis=2).mean() > 0.8  # the banner's strip
        page = drawn[strip:]
        line = max(2, int(4 * max(drawn.shape[:2]) / 1000))
        for panel in sorted(manifest["panels"], key=lambda p: p["order_index"])[:12]:  # the panel cap's
            x, y, w, h = panel["panel_coords"]
            top = page[y + 1, x + line: x + w - line]  # inside the outline's width: the outline, not a label
            assert (top == PENDING_GREY).all(axis=1).mean() > 0.95, (k, panel["order_index"])
        interior = ~_outline_zone(page.shape, [p["panel_coords"] for p in manifest["panels"]], line + 1)
        same = (np.abs(page - original).max(axis=2) <= 3) | ~interior
        assert same.mean() > 0.97  # the page itself, under grey outlines and small labels only
