"""Build a store from Python on a LocalCluster, then read it back.

    python examples/build_from_python.py [--out DIR] [--pages N] [--workers W]

1. ``pipeline.sample.make_sample`` writes synthetic comic pages (images,
   DataSpec manifests and a ``pages.txt`` list);
2. ``pipeline.build`` embeds them on a LocalCluster (the same call as
   ``pagecube build``); run it twice and the second run resumes (nothing to do);
3. ``pipeline.open_pages`` opens the finished pages as an xarray Dataset.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import pipeline
from pipeline.sample import make_sample


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="example-out", help="folder for the sample pages and the store")
    ap.add_argument("--pages", type=int, default=32, help="how many synthetic pages")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster workers")
    args = ap.parse_args(argv)

    listing = make_sample(os.path.join(args.out, "pages"), args.pages, seed=0)
    store = os.path.join(args.out, "cube.zarr")

    result = pipeline.build(
        str(listing), store,
        cluster="local", workers=args.workers, threads_per_worker=1,
        model="tiny", chunk_pages=8, batch_size=8,
        progress=False,
    )
    print(f"build: {result.done} done, {result.failed} failed of {result.n_pages} "
          f"({result.pages_per_s:.1f} pages/s), dashboard was {result.dashboard}")

    ds = pipeline.open_pages(store)  # only pages with status == 1
    print(ds)
    emb = ds["page_embeddings"].values
    print(f"page_embeddings {emb.shape}, mean norm {np.linalg.norm(emb, axis=1).mean():.3f}")
    first = ds.isel(page=0).load()  # one page into memory
    order = first["reading_order"].values
    mask = first["panel_mask"].values
    for slot in np.argsort(np.where(mask, order, 999))[: int(mask.sum())]:
        print(f"  {first['page_id'].item()} panel #{order[slot]}: attention "
              f"{float(first['attention_weights'][slot]):.3f}  {str(first['text_content'].values[slot])[:50]!r}")
    return result.exit_code


if __name__ == "__main__":  # needed: LocalCluster workers are spawned processes
    sys.exit(main())
