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
