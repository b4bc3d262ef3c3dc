"""``pagecube diagnose`` finds a deleted chunk and a garbled chunk of done pages; ``--repair`` + build heals both."""
from __future__ import annotations

import numpy as np
import pytest

from faultkit import MODEL, cli, index_entries, make_pages, read, run

VARS = ("status", "written_at", "page_embeddings", "panel_embeddings", "panel_mask", "text_content", "n_panels")


def test_diagnose_finds_missing_and_garbled_chunks_and_repair_then_build_heals(tmp_path):
    pages = make_pages(tmp_path / "s", 32, seed=11)
    store = tmp_path / "d.zarr"
    build = ["build", pages, "--out", store, "--cluster", "sync", "--chunk-pages", "8", "--model", MODEL,
             "--no-progress"]
    assert run(*build)[0] == 0
    code, out, err = run("diagnose", store)
    assert code == 0, out + err
    assert "ok: no faults found" in out
    before = dict(zip(VARS, read(store, *VARS)))

    # fault 1: a chunk file of done pages deleted; fault 2: another chunk overwritten with garbage;
    # plus debris a killed writer would leave
    (store / "page_embeddings" / "c" / "1" / "0").unlink()
    (store / "panel_embeddings" / "c" / "2" / "0" / "0").write_bytes(b"\x00garbage\xff" * 100)
    (store / "status" / "c" / ("3." + "ab" * 16 + ".partial")).write_bytes(b"half")

    proc = cli("diagnose", store)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "page_embeddings: chunk 1 file is missing" in out, out
    assert "panel_embeddings: chunk 2 (pages [16, 24)) does not read" in out, out
    assert "debris" in out
    assert "Traceback" not in proc.stderr

    code, out, err = run("diagnose", store, "--repair")
    assert code == 0, out + err
    assert "marked 16 pages in 2 chunks as pending" in out, out
    status = read(store, "status")
    assert (status[8:24] == 0).all() and (status[:8] == 1).all() and (status[24:] == 1).all()
    names = index_entries(store)
    assert not any(n.startswith(("000000001.", "000000002.")) for n in names), names
    assert not list(store.rglob("*.partial"))

    code, out, err = run(*build)
    assert code == 0, err[-2000:]
    code, out, err = run("diagnose", store)
    assert code == 0, out
    after = dict(zip(VARS, read(store, *VARS)))
    for name in VARS:
        if name == "written_at":
            continue
        a, b = before[name], after[name]
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
    untouched = np.r_[0:8, 24:32]
    assert np.array_equal(after["written_at"][untouched], before["written_at"][untouched])
    assert (after["written_at"][8:24] > before["written_at"][8:24]).all()


def _lossy_page_embeddings(store) -> None:
    """Make the store change what is written to ``page_embeddings``: a lossy codec (bit rounding to
    2 mantissa bits, a real zarr codec) slipped into the array's metadata, as a misconfigured or
    faulty storage layer would.  Every write of that variable then reads back different."""
    import json
    import warnings

    import zarr

    meta_path = store / "page_embeddings" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"].insert(0, {"name": "numcodecs.bitround", "configuration": {"keepbits": 2}})
    meta_path.write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(store))


NOT_IN_SPEC = "ignore:Numcodecs codecs are not in the Zarr version 3 specification"


@pytest.mark.filterwarnings(NOT_IN_SPEC)
def test_build_verify_reads_back_every_region(tmp_path):
    """``--verify`` compares each written region with what was meant: a float16 store passes, and a
    store that changes a variable on write is caught, naming the pages and the variable."""
    pages = make_pages(tmp_path / "s", 16, seed=12)
    args = ["--cluster", "sync", "--chunk-pages", "8", "--model", MODEL, "--no-progress"]
    for dtype in ("float32", "float16"):
        store = tmp_path / f"v-{dtype}.zarr"
        code, out, err = run("build", pages, "--out", store, *args, "--embedding-dtype", dtype, "--verify")
        assert code == 0, err
        assert "read back different" not in err, err
        assert (read(store, "status") == 1).all()

    store = tmp_path / "lossy.zarr"
    assert run("build", pages, "--out", store, *args, "--init-only")[0] == 0
    _lossy_page_embeddings(store)
    code, out, err = run("build", pages, "--out", store, *args, "--verify")
    for start, stop in ((0, 8), (8, 16)):
        assert f"verify: pages [{start}, {stop}) read back different page_embeddings" in err, err
    assert err.count("read back different") == 2, err
    assert "read back different page_embeddings," not in err, err  # the only variable that changed


@pytest.mark.filterwarnings(NOT_IN_SPEC)
def test_verify_mismatch_fails_its_pages(tmp_path):
    pages = make_pages(tmp_path / "s", 16, seed=12)
    store = tmp_path / "lossy.zarr"
    args = ["--cluster", "sync", "--chunk-pages", "8", "--model", MODEL, "--no-progress"]
    assert run("build", pages, "--out", store, *args, "--init-only")[0] == 0
    _lossy_page_embeddings(store)
    code, out, err = run("build", pages, "--out", store, *args, "--verify")
    assert code == 3, err
    status, error = read(store, "status", "error")
    assert (status == 2).all(), status
    assert all("read back different page_embeddings" in e for e in error), error
