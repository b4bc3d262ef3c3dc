"""The synthetic page generator: determinism, manifest shape, twins, paths."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.sample import make_sample

SMALL = (400, 600)  # keeps the tests fast; the layout scales with the page


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _manifests(pages_txt: Path) -> list[tuple[Path, dict]]:
    out = []
    for line in pages_txt.read_text(encoding="utf-8").splitlines():
        path = pages_txt.parent / line
        out.append((path, json.loads(path.read_text(encoding="utf-8"))))
    return out


@pytest.fixture(scope="module")
def hundred(tmp_path_factory) -> Path:
    return make_sample(tmp_path_factory.mktemp("s100"), 100, seed=3, image_size=SMALL, twins=5)


def test_same_seed_same_bytes(tmp_path):
    a = make_sample(tmp_path / "a", 12, seed=7, image_size=SMALL, twins=2)
    b = make_sample(tmp_path / "b", 12, seed=7, image_size=SMALL, twins=2)
    fa, fb = _files(a.parent), _files(b.parent)
    assert len(fa) == 12 * 2 + 1
    assert fa == fb


def test_page_independent_of_page_count(tmp_path):
    a = _files(make_sample(tmp_path / "a", 5, seed=1, image_size=SMALL).parent)
    b = _files(make_sample(tmp_path / "b", 9, seed=1, image_size=SMALL).parent)
    for name in ("images/page_00003.jpg", "manifests/page_00003.json"):
        assert a[name] == b[name]


def test_different_seed_different_files(tmp_path):
    a = _files(make_sample(tmp_path / "a", 4, seed=0, image_size=SMALL).parent)
    b = _files(make_sample(tmp_path / "b", 4, seed=1, image_size=SMALL).parent)
    assert a.keys() == b.keys()
    for name in a:
        if name != "pages.txt":
            assert a[name] != b[name], name


def test_manifests_valid(hundred):
    items = _manifests(hundred)
    assert len(items) == 100
    shuffled = multi = 0
    for path, m in items:
        for key in ("page_id", "page_image_path", "page_size", "panels", "source",
                    "series", "volume", "issue", "page_num"):
            assert key in m, (path, key)
        assert isinstance(m["volume"], str) and isinstance(m["issue"], str)
        assert isinstance(m["page_num"], int)
        W, H = m["page_size"]["width"], m["page_size"]["height"]
        assert (W, H) == SMALL
        panels = m["panels"]
        assert panels, path
        assert sorted(p["order_index"] for p in panels) == list(range(len(panels)))
        assert len({p["panel_id"] for p in panels}) == len(panels)
        for p in panels:
            x, y, w, h = p["panel_coords"]
            assert all(isinstance(v, int) for v in (x, y, w, h))
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= W and y + h <= H, (path, p)
            assert set(p["text"]) == {"dialogue", "narration", "sfx"}
            assert all(isinstance(s, str) and s for v in p["text"].values() for s in v)
            assert len(p["balloon_coords"]) == len(p["text"]["dialogue"])
            for bx, by, bw, bh in p["balloon_coords"]:
                assert bw > 0 and bh > 0 and bx >= x and by >= y and bx + bw <= x + w and by + bh <= y + h
        if len(panels) > 1:
            multi += 1
            shuffled += [p["order_index"] for p in panels] != list(range(len(panels)))
        # panels do not overlap
        boxes = [p["panel_coords"] for p in panels]
        for i, (ax, ay, aw, ah) in enumerate(boxes):
            for bx, by, bw, bh in boxes[i + 1:]:
                assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay, path
    assert shuffled >= multi // 2  # slot position does not give the order away
    counts = [len(m["panels"]) for _, m in items]
    assert max(counts) > 12 and max(counts) <= 16
    assert 1 in counts  # splash page
    assert sum(2 <= c <= 9 for c in counts) >= 85
    assert sum(not any(p["text"].values()) for _, m in items for p in m["panels"]) > 0  # textless panels


def test_reading_order_on_grid(hundred):
    """Panels whose rows do not overlap vertically are read top to bottom."""
    for _, m in _manifests(hundred):
        by_order = sorted(m["panels"], key=lambda p: p["order_index"])
        for a, b in zip(by_order, by_order[1:]):
            ax, ay, aw, ah = a["panel_coords"]
            bx, by, bw, bh = b["panel_coords"]
            if ay + ah <= by or by + bh <= ay:  # different bands
                assert by > ay or by + bh > ay + ah, m["page_id"]  # never goes back up a whole band
            elif ay == by and ah == bh:  # same row
                assert bx > ax, m["page_id"]


def test_twins_share_text(hundred):
    items = _manifests(hundred)

    def texts(m):
        return [p["text"] for p in sorted(m["panels"], key=lambda p: p["order_index"])]

    for k in range(5):
        orig, twin = items[k][1], items[95 + k][1]
        assert texts(twin) == texts(orig)
        assert twin["page_id"] != orig["page_id"]
        img_o = (items[k][0].parent / orig["page_image_path"]).read_bytes()
        img_t = (items[95 + k][0].parent / twin["page_image_path"]).read_bytes()
        assert img_o != img_t
    # pages that are not twins do not share their text
    assert texts(items[5][1]) != texts(items[6][1])


def test_paths_resolve(hundred):
    lines = hundred.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "manifests/page_00000.json"
    for path, m in _manifests(hundred):
        assert not Path(m["page_image_path"]).is_absolute()
        img = (path.parent / m["page_image_path"]).resolve()
        assert img.suffix == ".jpg" and img.is_file()
        with Image.open(img) as im:
            assert im.format == "JPEG"
            assert im.size == (m["page_size"]["width"], m["page_size"]["height"])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        make_sample(tmp_path, 4, twins=3)
    with pytest.raises(ValueError):
        make_sample(tmp_path, -1)


def test_scan_size_from_the_command_line(tmp_path):
    from conftest import run_cli

    run_cli("sample", tmp_path / "scans", "--pages", 2, "--size", "1988x3056", check=0)
    m = json.loads((tmp_path / "scans" / "manifests" / "page_00001.json").read_text())
    assert m["page_size"] == {"width": 1988, "height": 3056}
    assert Image.open(tmp_path / "scans" / "images" / "page_00001.jpg").size == (1988, 3056)
    bad = run_cli("sample", tmp_path / "bad", "--pages", 2, "--size", "1988")
    assert bad.returncode == 2
    assert "expected WIDTHxHEIGHT" in bad.stderr and not (tmp_path / "bad").exists()

