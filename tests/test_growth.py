"""Incremental growth: a page list that grew at its end is appended to the store (issue 3, part 7)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from faultkit import MODEL, env, make_pages, read, run, wait_for

VARS = ("status", "written_at", "page_embeddings", "panel_embeddings", "attention_weights", "reading_order",
        "panel_coordinates", "text_content", "panel_mask", "n_panels", "page_id", "manifest_path", "error")


def test_grow_200_to_300_keeps_old_pages_and_readers_never_fail(tmp_path):
    pages = make_pages(tmp_path / "s", 300, seed=2)
    lines = pages.read_text().splitlines(keepends=True)
    first = pages.parent / "first200.txt"
    first.write_text("".join(lines[:200]))
    store = tmp_path / "g.zarr"
    # 16-page chunks: page 200 falls inside chunk 12, whose old pages 192..199 must be kept as they are
    args = ["--out", store, "--cluster", "sync", "--model", MODEL, "--no-progress"]
    code, out, err = run("build", first, *args, "--chunk-pages", "16")
    assert code == 0, err
    old = dict(zip(VARS, read(store, *VARS)))
    assert len(old["status"]) == 200
    time.sleep(0.01)  # any rewrite of an old page would now get a later written_at

    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, str(Path(__file__).parent / "growth_reader.py"), str(store), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        wait_for(lambda: Path(str(stop) + ".ready").exists(), 60, "the reader's first poll", reader)
        time.sleep(0.2)
        code, out, err = run("build", pages, *args)
        time.sleep(0.5)
    finally:
        stop.write_text("")
        rout, rerr = reader.communicate(timeout=60)
    assert code == 0, err
    assert "grew store" in err
    seen = json.loads(rout)
    assert seen["n_errors"] == 0, seen
    assert seen["sizes"] == [200, 300], seen  # it read before and after the growth

    new = dict(zip(VARS, read(store, *VARS)))
    assert (new["status"] == 1).all()
    for name in VARS:
        a, b = old[name], new[name][:200]
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), f"{name} of an old page changed"
    import xarray as xr

    ds = xr.open_zarr(store, consolidated=True)
    assert ds.sizes["page"] == 300 and ds.attrs["input_digest"].endswith(":300")


def test_other_changes_of_the_page_list_are_refused(tmp_path):
    pages = make_pages(tmp_path / "s", 24, seed=4)
    lines = pages.read_text().splitlines(keepends=True)
    store = tmp_path / "r.zarr"
    args = ["--out", store, "--cluster", "sync", "--model", MODEL, "--no-progress", "--chunk-pages", "8"]
    first = pages.parent / "first16.txt"
    first.write_text("".join(lines[:16]))
    assert run("build", first, *args)[0] == 0
    before = read(store, "written_at")
    changed = pages.parent / "changed.txt"  # the prefix changed (two entries swapped), then grown
    changed.write_text("".join([lines[1], lines[0], *lines[2:]]))
    shorter = pages.parent / "shorter.txt"
    shorter.write_text("".join(lines[:12]))
    for listing, needle in ((changed, "does not start with"), (shorter, "is shorter than")):
        code, out, err = run("build", listing, *args)
        assert code == 2, err
        assert needle in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
    assert np.array_equal(read(store, "written_at"), before)
    assert len(read(store, "status")) == 16
