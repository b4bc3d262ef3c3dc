"""Bad input never crashes a build: every kind of bad page mixed into good ones (issue 3, part 4).

Also: ``--retry-failed`` redoes failed pages only, and bad command-line
arguments get one clear line and exit code 2.
"""
from __future__ import annotations

import copy
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faultkit import MODEL, cli, make_pages, read

GOOD = 30


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, then a tiny IDAT: a decompression bomb's shape."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _corpus(tmp: Path):
    """Good sample pages with bad pages mixed in; returns (pages.txt, {line index: expectation})."""
    pages_txt = make_pages(tmp, GOOD, seed=5)
    man_dir, img_dir = tmp / "manifests", tmp / "images"
    good_lines = pages_txt.read_text().split()
    base = json.loads((tmp / good_lines[0]).read_text())
    jpeg = (img_dir / "page_00000.jpg").read_bytes()
    src = Image.open(img_dir / "page_00000.jpg")
    bad: list[tuple[str, object, str]] = []  # (name, manifest dict or raw bytes or None, expectation)

    def m(**changes):
        d = copy.deepcopy(base)
        d["page_id"] = f"bad-{len(bad)}"
        d.update(changes)
        return d

    def image(name: str, data: bytes | None = None, pil: Image.Image | None = None, fmt: str = "PNG") -> str:
        p = img_dir / name
        if pil is not None:
            pil.save(p, fmt)
        else:
            p.write_bytes(data)
        return f"../images/{name}"

    def panel(coords, text=None, order=0):
        return {"panel_id": f"x{order}", "panel_coords": coords, "order_index": order,
                "text": text if text is not None else {"dialogue": [f"panel {order}"]}}

    bad += [
        ("missing_manifest", None, "failed:manifest not found"),
        ("not_json", b"{ this is not json", "failed:not JSON"),
        ("wrong_shape", b"[1, 2, 3]", "failed:not an object"),
        ("missing_fields", {k: v for k, v in m().items() if k != "page_image_path"},
         "failed:invalid manifest: page_image_path"),
        ("no_panels_field", {k: v for k, v in m().items() if k != "panels"}, "failed:invalid manifest: panels"),
        ("image_missing", m(page_image_path="../images/nope.jpg"), "failed:image not found"),
        ("image_truncated", m(page_image_path=image("trunc.jpg", jpeg[: len(jpeg) // 3])),
         "failed:corrupt or truncated image"),
        ("image_corrupt", m(page_image_path=image("corrupt.jpg", jpeg[:400] + bytes(range(256)) * 40)),
         "failed:corrupt or truncated image"),
        ("not_an_image", m(page_image_path=image("text.jpg", b"hello, I am text\n" * 50)), "failed:not an image"),
        ("huge_image", m(page_image_path=image("bomb.png", _png_header(30000, 30000))),
         "failed:decompression-bomb"),
        ("grayscale", m(page_image_path=image("gray.png", pil=src.convert("L"))), "done"),
        ("cmyk", m(page_image_path=image("cmyk.jpg", pil=src.convert("CMYK"), fmt="JPEG")), "done"),
        ("palette", m(page_image_path=image("pal.png", pil=src.convert("P"))), "done"),
        ("alpha", m(page_image_path=image("alpha.png", pil=src.convert("RGBA"))), "done"),
        ("box_outside", m(panels=[panel([5000, 5000, 50, 50])]), "failed:outside"),
        ("box_partly_outside", m(panels=[panel([150, 250, 100, 100])]), "done"),
        ("box_zero", m(panels=[panel([10, 10, 0, 40])]), "failed:zero or negative"),
        ("box_negative", m(panels=[panel([10, 10, 30, -40])]), "failed:zero or negative"),
        ("box_nan", json.dumps(m(panels=[panel([float("nan"), 10, 30, 40])])).encode(), "failed:non-finite"),
        ("zero_panels", m(panels=[]), "done"),
        ("over_cap", m(panels=[panel([10 + j, 10, 40, 40], order=15 - j) for j in range(16)]), "done"),
        ("text_not_string", m(panels=[panel([10, 10, 40, 40], text={"dialogue": [{"nested": 1}]})]),
         "failed:invalid manifest: panels.0.text.dialogue"),
        ("text_number", m(panels=[panel([10, 10, 40, 40], text={"dialogue": [42]})]), "done"),
        ("text_long", m(panels=[panel([10, 10, 40, 40], text={"dialogue": ["a" * 100_000]})]), "done"),
        ("text_bad_utf8", json.dumps(m(panels=[panel([10, 10, 40, 40], text={"dialogue": ["BADBYTES"]})]))
         .encode().replace(b"BADBYTES", b"ok \xff\xfe\xc3 end"), "done"),
        ("text_lone_surrogate", json.dumps(m(panels=[panel([10, 10, 40, 40], text={"dialogue": ["X"]})]))
         .replace('"X"', '"lone \\ud800 here"').encode(), "done"),
        ("duplicate_page_id", dict(base), "done"),
    ]
    lines, expect = [], {}
    # interleave: bad pages land in the middle of chunks of good pages
    for i, line in enumerate(good_lines):
        expect[len(lines)] = ("good", "done")
        lines.append(line)
        if i < len(bad):
            name, content, exp = bad[i]
            path = man_dir / f"bad_{name}.json"
            if isinstance(content, dict):
                path.write_text(json.dumps(content))
            elif isinstance(content, bytes):
                path.write_bytes(content)
            expect[len(lines)] = (name, exp)
            lines.append(f"manifests/bad_{name}.json")
    for name, content, exp in bad[len(good_lines):]:
        raise AssertionError("more bad kinds than good pages: enlarge GOOD")
    listing = tmp / "mixed.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing, expect


def test_every_bad_input_kind_is_failed_or_handled_and_retry_failed_redoes_only_those(tmp_path):
    listing, expect = _corpus(tmp_path / "corpus")
    store = tmp_path / "mixed.zarr"
    proc = cli("build", listing, "--out", store, "--cluster", "sync", "--chunk-pages", "8", "--model", MODEL,
               "--no-progress")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    status, error, n_panels, mask, text, pid, emb, written = read(
        store, "status", "error", "n_panels", "panel_mask", "text_content", "page_id", "page_embeddings", "written_at")
    assert len(status) == len(expect)
    for i, (name, exp) in expect.items():
        if exp == "done":
            assert status[i] == 1, f"{name}: status {status[i]} error {error[i]!r}"
            assert error[i] == ""
            assert np.isfinite(emb[i]).all(), name
        else:
            want = exp.split(":", 1)[1]
            assert status[i] == 2, f"{name}: status {status[i]}"
            assert want in error[i], f"{name}: reason {error[i]!r} lacks {want!r}"
    by = {name: i for i, (name, _) in expect.items() if name != "good"}
    # handled as documented
    assert n_panels[by["zero_panels"]] == 0 and not mask[by["zero_panels"]].any()
    i = by["over_cap"]
    assert n_panels[i] == 16 and mask[i].sum() == 12
    kept = sorted(text[i][mask[i]])  # the first 12 by order_index: order 0..11 = panels j = 15..4
    assert kept == sorted(f"panel {o}" for o in range(12))
    assert len(text[by["text_long"]][0]) <= 4000
    assert text[by["text_number"]][0] == "42"
    assert "\ufffd" in text[by["text_bad_utf8"]][0] and text[by["text_bad_utf8"]][0].startswith("ok ")
    assert text[by["text_lone_surrogate"]][0] == "lone \ufffd here"
    assert pid[by["duplicate_page_id"]] == pid[0]  # duplicates are both kept (page axis = list order)
    assert np.array_equal(emb[by["duplicate_page_id"]], emb[0])
    from pipeline.diagnose import diagnose

    notes = " ".join(diagnose(str(store)).notes)
    assert f"page ids (e.g. {pid[0]!r} at pages 0, {by['duplicate_page_id']}" in notes
    # a clear summary line on stdout
    assert "failed" in proc.stdout

    # fix one bad file, retry failed pages only: it becomes done, nothing else changes
    fixed = by["not_json"]
    good_manifest = json.loads((listing.parent / "manifests" / "page_00001.json").read_text())
    (listing.parent / "manifests" / "bad_not_json.json").write_text(json.dumps(good_manifest))
    proc = cli("build", listing, "--out", store, "--cluster", "sync", "--model", MODEL, "--retry-failed",
               "--no-progress")
    assert proc.returncode == 3, proc.stderr[-3000:]
    status2, error2, written2, emb2 = read(store, "status", "error", "written_at", "page_embeddings")
    assert status2[fixed] == 1 and error2[fixed] == ""
    was_done = status == 1
    assert np.array_equal(written2[was_done], written[was_done]), "retry touched pages that were done"
    assert np.array_equal(emb2[was_done], emb[was_done])
    still = (status == 2) & (np.arange(len(status)) != fixed)
    assert (status2[still] == 2).all()
    assert (written2[still] > written[still]).all(), "failed pages were not retried"


@pytest.mark.parametrize("args, needle", [
    (["build", "/nonexistent/pages.txt", "--out", "{tmp}/s.zarr"], "page list not found"),
    (["build", "{pages}", "--out", "{tmp}/s.zarr", "--chunk-pages", "0"], "--chunk-pages"),
    (["build", "{pages}", "--out", "{tmp}/s.zarr", "--model", "no-such-model"], "unknown model"),
    (["build", "{pages}", "--out", "{tmp}/s.zarr", "--checkpoint", "{tmp}/none.pt"], "checkpoint not found"),
    (["build", "{pages}", "--out", "{tmp}/s.zarr", "--checkpoint", "{tmp}"], "checkpoint"),
    (["build", "{pages}", "--out", "{tmp}/s.zarr", "--checkpoint", "{tmp}/empty.pt"], "empty"),
    (["build", "{pages}", "--out", "{tmp}/s.zarr", "--cluster", "bogus://x"], "cluster"),
    (["build", "{pages}", "--out", "{tmp}/s.zarr", "--no-workers-timeout", "-1"], "--no-workers-timeout"),
    (["build", "{pages}"], "--out"),
])
def test_bad_arguments_one_line_exit_2(tmp_path, args, needle):
    from pipeline.cli import main

    pages = tmp_path / "pages.txt"
    pages.write_text("a.json\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    argv = [a.format(tmp=tmp_path, pages=pages) for a in args]
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    text = err.getvalue()
    assert code == 2, text
    assert needle in text, text
    assert "Traceback" not in text
    assert sum("rror" in ln for ln in text.splitlines()) == 1, text  # one error line (click may add usage)
    assert not (tmp_path / "s.zarr").exists()


def test_python_api_takes_build_options_whole_or_as_keywords(tmp_path):
    """``pipeline.build`` takes every option of ``BuildOptions`` as a keyword (a misspelt one is a
    TypeError naming it, as Python says it), or a ``BuildOptions`` whole; keywords win over it; one
    ``validate`` refuses bad values from Python as from the command line."""
    import pipeline
    from pipeline import BadArgument, BuildOptions

    pages = make_pages(tmp_path, 8, seed=1)
    with pytest.raises(TypeError, match=r"build\(\) got an unexpected keyword argument 'wrokers'"):
        pipeline.build(str(pages), str(tmp_path / "s.zarr"), wrokers=2)
    with pytest.raises(BadArgument, match="--preflight-timeout must be a positive number"):
        pipeline.build(str(pages), str(tmp_path / "s.zarr"), preflight_timeout=0)
    assert not (tmp_path / "s.zarr").exists()
    options = BuildOptions(cluster="sync", model=MODEL, chunk_pages=8, max_panels=6, progress=False)
    result = pipeline.build(str(pages), str(tmp_path / "s.zarr"), options, max_panels=4, init_only=True)
    assert (result.n_pages, result.done) == (8, 0)
    ds = pipeline.open_pages(tmp_path / "s.zarr", done_only=False)
    assert ds.sizes["panel"] == 4 and int(ds.attrs["chunk_pages"]) == 8
