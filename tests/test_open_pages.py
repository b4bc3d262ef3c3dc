"""``pipeline.open_pages`` indexes the finished pages by page id (issue 25); the store itself keeps no index."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

import pipeline
from pipeline.readers import DuplicatePageIds


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """12 sample pages in chunks of 4; page 5's image is missing (failed), pages 7 and 9 share an id."""
    from pipeline.sample import make_sample

    base = tmp_path_factory.mktemp("open-pages")
    listing = make_sample(base / "pages", 12, seed=4)
    folder = listing.parent / "manifests"
    m = json.loads((folder / "page_00005.json").read_text())
    m["page_image_path"] = "gone.png"
    (folder / "page_00005.json").write_text(json.dumps(m))
    m = json.loads((folder / "page_00009.json").read_text())
    m["page_id"] = "sample_00007"
    (folder / "page_00009.json").write_text(json.dumps(m))
    out = base / "cube.zarr"
    res = pipeline.build(str(listing), str(out), cluster="sync", chunk_pages=4, model="tiny", progress=False)
    assert (res.done, res.failed) == (11, 1)
    return str(out)


def test_finished_pages_are_selected_by_page_id(store):
    with pytest.warns(DuplicatePageIds, match="1 finished pages repeat a page id"):
        ds = pipeline.open_pages(store)
    raw = pipeline.open_store(store)
    one = ds.sel(page="sample_00003")
    assert one["page_id"].values.item() == "sample_00003" and int(one["position"]) == 3
    np.testing.assert_array_equal(one["page_embeddings"].values, raw["page_embeddings"].values[3])
    unique = ds.drop_duplicates("page")  # xarray's own way to a unique index: the first of each id
    assert unique.sel(page=["sample_00010", "sample_00001"])["position"].values.tolist() == [10, 1]
    assert "sample_00005" not in ds.indexes["page"]  # failed: not a finished page
    assert ds.sizes["page"] == 11 and ds["position"].values.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]


def test_a_repeated_page_id_selects_every_page_that_has_it(store):
    with pytest.warns(DuplicatePageIds):
        ds = pipeline.open_pages(store)
    both = ds.sel(page="sample_00007")
    assert both.sizes["page"] == 2 and both["position"].values.tolist() == [7, 9]
    assert both["page_id"].values.tolist() == ["sample_00007", "sample_00007"]
    with pytest.raises(Exception, match="uniquely valued Index"):  # pandas refuses a list on a repeating index
        ds.sel(page=["sample_00007", "sample_00001"])
    some = ds.isel(page=ds["page"].isin(["sample_00007", "sample_00001"]).values)  # what works instead
    assert some["position"].values.tolist() == [1, 7, 9]


def test_the_store_and_open_store_keep_no_page_index(store):
    raw = pipeline.open_store(store)
    assert "page" not in raw.coords and "position" not in raw.coords
    assert "page" not in zarr.open_group(store, mode="r") and raw.sizes["page"] == 12
    assert "page" not in pipeline.open_pages(store, done_only=False).coords
    plain = pipeline.open_pages(store, by_id=False)  # no ids read: finished pages by position only
    assert "page" not in plain.coords and plain.sizes["page"] == 11
