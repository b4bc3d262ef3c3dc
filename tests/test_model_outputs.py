"""Model outputs that cannot be stored fail their page with the reason; the rest of the chunk is done."""
from __future__ import annotations

import numpy as np
import xarray as xr

import pipeline


def test_non_finite_and_overflowing_outputs_fail_only_their_pages(sample40, tmp_path):
    store = tmp_path / "f16.zarr"
    result = pipeline.build(str(sample40), str(store), cluster="sync", progress=False,
                            model="models_for_tests:faulty_tiny", embedding_dtype="float16")
    ds = xr.open_zarr(store).load()
    ids = ds["page_id"].values
    status = ds["status"].values
    errors = ds["error"].values
    nan_pages = [i for i, p in enumerate(ids) if p.endswith("3")]
    big_pages = [i for i, p in enumerate(ids) if p.endswith("5")]
    assert nan_pages and big_pages
    for i in nan_pages:
        assert status[i] == 2 and errors[i] == "model returned non-finite page_embeddings"
    for i in big_pages:
        assert status[i] == 2 and "overflows the store's float16" in errors[i]
    good = [i for i in range(len(ids)) if i not in nan_pages + big_pages]
    assert (status[good] == 1).all()
    assert np.isfinite(ds["page_embeddings"].values[good].astype(np.float32)).all()
    assert result.exit_code == 3 and result.failed == len(nan_pages) + len(big_pages)


def test_a_batch_the_model_fails_on_is_rerun_page_by_page_and_its_time_counted_once(sample40, tmp_path):
    """One page breaks its batch of 4: the batch runs again page by page and only that page fails, with
    the model's error.  The receipt's model time counts every forward once: 4 batches and 4 single pages
    at 0.2 s each is 1.6 s (it read 2.4 s when the reruns were counted inside the failed batch too)."""
    import os

    from pipeline.inputs import PageSource

    listing = tmp_path / "16.txt"
    listing.write_text("".join(f"{sample40.parent / r.path}\n" for r in PageSource(str(sample40)).slice(0, 16).refs()))
    os.environ["PAGECUBE_TEST_DELAY"] = "0.2"
    try:
        result = pipeline.build(str(listing), str(tmp_path / "b.zarr"), cluster="sync", progress=False,
                                model="models_for_tests:breaking_tiny", chunk_pages=8, batch_size=4)
    finally:
        del os.environ["PAGECUBE_TEST_DELAY"]
    ds = xr.open_zarr(tmp_path / "b.zarr").load()
    broken = [i for i, p in enumerate(ds["page_id"].values) if p.endswith("7")]
    assert broken == [7]
    assert ds["status"].values[7] == 2
    assert ds["error"].values[7] == "model failed on this page: ValueError: this model cannot take page sample_00007"
    assert (np.delete(ds["status"].values, 7) == 1).all() and result.failed == 1
    assert 1.55 <= result.phases["inference"] < 2.0, result.phases


def test_after_a_sync_build_dask_still_has_distributeds_settings(sample40, tmp_path):
    """A fresh process that builds with ``cluster="sync"`` and then loads the store with xarray and dask.

    The build set ``distributed.*`` settings for its duration; distributed, imported inside them, lost
    its whole section of dask's config when they were undone, and ``.load()`` raised KeyError:
    'distributed'."""
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    code = (f"import dask, pipeline, xarray as xr\n"
            f"pipeline.build({str(sample40)!r}, {str(tmp_path / 's.zarr')!r}, cluster='sync', progress=False,"
            f" model='tiny')\n"
            f"print(dask.config.get('distributed.comm.timeouts.connect'))\n"
            f"print(int(xr.open_zarr({str(tmp_path / 's.zarr')!r})['status'].sum().load()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=cli_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["30s", "40"]
