"""Pages decoded at the size the model needs (JPEG DCT scaling), and what must not change for it.

Every crop from a reduced decode is compared with the crop a full decode gives, on real files:
scan-size JPEGs, EXIF-rotated, CMYK and greyscale JPEGs, PNGs with alpha; truncated files and
boxes outside the image keep their reasons at any scale; stored boxes stay in page pixels.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from pipeline import images
from pipeline.inputs import PageSource
from pipeline.manifest import PageError, read_page
from pipeline.sample import SCAN_SIZE, make_sample

TOLERANCE = 6.0  # mean absolute difference of a crop, in levels of 255 (flat art, black line work)


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    return make_sample(tmp_path_factory.mktemp("scans"), 6, seed=2, image_size=SCAN_SIZE, scan=True)


def _ref(listing: Path, i: int = 0):
    return PageSource(str(listing)).slice(i, i + 1).refs()[0]


def _crops(page, side: int) -> np.ndarray:
    return images.crop_panels(page.rgb(), page.image_boxes(), side)


def _close(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_reduction_is_the_strongest_that_keeps_every_crop_at_the_side():
    boxes = np.array([[0, 0, 600, 900], [600, 0, 530, 1000]], dtype=np.float32)
    assert images.reduction_for(boxes, (2000, 3000), 64) == 8  # 530 / 8 = 66 >= 64
    assert images.reduction_for(boxes, (2000, 3000), 67) == 4
    assert images.reduction_for(boxes, (2000, 3000), 224) == 2  # 265 >= 224, 132 < 224
    assert images.reduction_for(boxes, (2000, 3000), 300) == 1
    assert images.reduction_for(boxes, (2000, 3000), None) == 1  # a model that says nothing: full size
    assert images.reduction_for(np.zeros((0, 4)), (2000, 3000), 224) == 8  # no panels: the page is the crop
    assert images.reduction_for(np.zeros((0, 4)), (800, 1200), 224) == 2


def test_scan_size_sample_pages_are_scans(scans):
    m = json.loads((scans.parent / "manifests" / "page_00000.json").read_text())
    assert m["page_size"] == {"width": SCAN_SIZE[0], "height": SCAN_SIZE[1]}
    img = Image.open(scans.parent / "images" / "page_00000.jpg")
    assert img.size == SCAN_SIZE
    sizes = [p.stat().st_size for p in (scans.parent / "images").glob("*.jpg")]
    assert 150_000 < min(sizes) and max(sizes) < 2_000_000, sizes
    corner = np.asarray(img.crop((2, 2, 12, 12)), dtype=np.int16).mean(axis=(0, 1))
    assert corner[2] < corner[0] - 4  # tinted paper: less blue than red


@pytest.mark.parametrize("crop", [64, 224])
def test_reduced_decode_gives_the_crops_of_a_full_decode(scans, crop):
    side = images.least_side(crop)
    reduced = 0
    for i in range(4):
        full = read_page(_ref(scans, i), max_panels=12)
        small = read_page(_ref(scans, i), max_panels=12, panel_side=side)
        assert full.image_scale == 1.0 and full.image.size == SCAN_SIZE
        assert small.size == full.size == SCAN_SIZE
        np.testing.assert_array_equal(small.boxes, full.boxes)  # stored boxes stay in page pixels
        expect = images.reduction_for(full.boxes, full.size, side)
        assert min(small.boxes[:, 2:].min() * small.image_scale, 1e9) >= side  # no crop below the side
        reduced += expect > 1
        assert small.image_scale == 1 / expect
        assert small.image.size == tuple(-(-v // expect) for v in SCAN_SIZE)
        assert _close(_crops(small, side), _crops(full, side)) < TOLERANCE
    assert reduced >= 3, "scan-size panels leave room to reduce"


def _one_page(tmp: Path, name: str, img: Image.Image, fmt: str, page_size=None, **save) -> Path:
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    img.save(tmp / "images" / name, fmt, **save)
    w, h = page_size or img.size
    panels = [{"panel_id": "a", "panel_coords": [40, 40, w // 2 - 60, h // 2 - 60], "order_index": 0},
              {"panel_id": "b", "panel_coords": [w // 2, h // 2, w // 2 - 40, h // 2 - 40], "order_index": 1}]
    manifest = {"page_id": name, "page_image_path": f"images/{name}", "page_size": {"width": w, "height": h},
                "panels": panels}
    (tmp / f"{name}.json").write_text(json.dumps(manifest))
    (tmp / f"{name}.txt").write_text(f"{name}.json\n")
    return tmp / f"{name}.txt"


def _art(scans: Path) -> Image.Image:
    return Image.open(scans.parent / "images" / "page_00001.jpg").convert("RGB")


@pytest.mark.parametrize("kind", ["cmyk", "grey", "png-alpha", "webp"])
def test_other_modes_and_formats_crop_alike_at_any_scale(scans, tmp_path, kind):
    art = _art(scans)
    if kind == "cmyk":
        listing = _one_page(tmp_path, "cmyk.jpg", art.convert("CMYK"), "JPEG", quality=92)
    elif kind == "grey":
        listing = _one_page(tmp_path, "grey.jpg", art.convert("L"), "JPEG", quality=92)
    elif kind == "webp":
        listing = _one_page(tmp_path, "page.webp", art, "WEBP", quality=90)
    else:
        rgba = art.convert("RGBA")
        alpha = np.full(rgba.size[::-1], 255, np.uint8)
        alpha[:, : rgba.size[0] // 3] = 0  # a transparent strip: composited on white
        rgba.putalpha(Image.fromarray(alpha))
        listing = _one_page(tmp_path, "alpha.png", rgba, "PNG")
    full = read_page(_ref(listing), max_panels=12)
    small = read_page(_ref(listing), max_panels=12, panel_side=64)
    assert small.image.mode == full.image.mode == "RGB"
    assert small.image_scale == 1 / 8
    assert _close(_crops(small, 64), _crops(full, 64)) < TOLERANCE
    if kind == "png-alpha":
        assert (np.asarray(small.image)[:, :50] >= 250).all()  # white where the page was transparent


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_libjpeg_turbo_gives_pils_own_pixels_at_every_scale(scans, mode):
    """The fast decode (simplejpeg, into numpy) is PIL's ``draft`` decode pixel for pixel, colour and
    greyscale alike, and hands the built-in models that same array without a copy."""
    import io

    raw = (scans.parent / "images" / "page_00001.jpg").read_bytes()
    if mode == "L":
        buf = io.BytesIO()
        Image.open(io.BytesIO(raw)).convert("L").save(buf, "JPEG", quality=90)
        raw = buf.getvalue()
    for r in (1, 2, 4, 8):
        fast = images.decode(images.open_image(raw, 10**9), r, raw=raw)
        pil = images.decode(images.open_image(raw, 10**9), r)
        assert fast.pixels is not None and pil.pixels is None
        assert fast.scale == pil.scale == 1 / r
        np.testing.assert_array_equal(fast.pixels, np.asarray(pil.image))
        np.testing.assert_array_equal(np.asarray(fast.image), fast.pixels)


def test_a_jpeg_libjpeg_only_warns_about_still_decodes(scans, tmp_path):
    """Bytes after the image's end marker make libjpeg-turbo warn (the strict fast path refuses); PIL
    decodes such a page as it always did, so the page is built, not failed."""
    folder = tmp_path / "pages"
    shutil.copytree(scans.parent, folder)
    jpeg = folder / "images" / "page_00000.jpg"
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[:-2] + b"\x00" * 64 + data[-2:])  # extraneous bytes before the EOI marker
    clean = read_page(_ref(scans), max_panels=12, panel_side=64)
    page = read_page(_ref(folder / "pages.txt"), max_panels=12, panel_side=64)
    assert page.pixels is None and clean.pixels is not None  # PIL decoded it, the fast path refused
    assert page.image_scale == clean.image_scale < 1
    assert _close(_crops(page, 64), _crops(clean, 64)) < 1.0


def test_exif_rotated_scan_is_turned_when_the_manifest_says_so(scans, tmp_path):
    upright = _art(scans)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # a camera's raw frame; EXIF 6 turns it back
    exif = Image.Exif()
    exif[images.ORIENTATION] = 6
    listing = _one_page(tmp_path, "rotated.jpg", stored, "JPEG", page_size=upright.size, exif=exif, quality=92)
    _one_page(tmp_path, "upright.jpg", upright, "JPEG", quality=92)
    reference = read_page(_ref(tmp_path / "upright.jpg.txt"), max_panels=12)
    for side in (None, 64):
        page = read_page(_ref(listing), max_panels=12, panel_side=side)
        assert page.size == upright.size
        assert _close(_crops(page, 64), _crops(reference, 64)) < TOLERANCE, side


def test_exif_orientation_is_left_alone_when_boxes_are_in_the_stored_frame(scans, tmp_path):
    stored = _art(scans).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[images.ORIENTATION] = 6
    listing = _one_page(tmp_path, "raw.jpg", stored, "JPEG", exif=exif, quality=92)  # page_size: stored frame
    full, small = (read_page(_ref(listing), max_panels=12, panel_side=s) for s in (None, 64))
    assert full.size == small.size == stored.size
    assert _close(_crops(small, 64), _crops(full, 64)) < TOLERANCE


def test_truncated_jpeg_fails_its_page_at_any_scale(scans, tmp_path):
    folder = tmp_path / "pages"
    shutil.copytree(scans.parent, folder)
    jpeg = folder / "images" / "page_00000.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    for side in (None, 64, 224):
        with pytest.raises(PageError, match=r"^corrupt or truncated image: .*page_00000\.jpg: .*truncated"):
            read_page(_ref(folder / "pages.txt"), max_panels=12, panel_side=side)


def test_box_outside_the_image_keeps_its_reason_at_any_scale(scans, tmp_path):
    folder = tmp_path / "pages"
    shutil.copytree(scans.parent, folder)
    path = folder / "manifests" / "page_00000.json"
    m = json.loads(path.read_text())
    m["panels"][0]["panel_coords"] = [5000, 5000, 100, 100]
    path.write_text(json.dumps(m))
    for side in (None, 64):
        with pytest.raises(PageError, match=r"lies outside the 1988x3056 image"):
            read_page(_ref(folder / "pages.txt"), max_panels=12, panel_side=side)


def test_a_scan_size_build_stores_page_pixel_boxes_and_matches_full_decoding(scans, tmp_path):
    """A real build (in process) of scan-size pages: boxes as in the manifests, outputs as a full decode's."""
    import xarray as xr

    from pipeline.model.registry import load_model

    out = tmp_path / "scan.zarr"
    run_cli("build", scans, "--out", out, "--cluster", "sync", "--model", "tiny", check=0)
    ds = xr.open_zarr(out)
    assert (ds.status.values == 1).all()
    for i in range(2):
        m = json.loads((scans.parent / "manifests" / f"page_{i:05d}.json").read_text())
        stored = ds.panel_coordinates.values[i][ds.panel_mask.values[i]]
        want = sorted(tuple(p["panel_coords"]) for p in m["panels"])[: len(stored)]
        assert sorted(map(tuple, stored.tolist())) == want
    model = load_model("tiny", device="cpu")
    full = [model.prepare(read_page(_ref(scans, i), max_panels=12)) for i in range(len(ds.page))]
    expect = model.forward(model.collate(full))["page_embeddings"]
    got = ds.page_embeddings.values
    cos = (got * expect).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expect, axis=1))
    assert cos.min() > 0.99, cos
