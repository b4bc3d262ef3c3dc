"""Benchmarks 2 and 3: pagecube against the seed's loop, and write amplification of both.

The seed's loop, re-created faithfully: one process, torch at its default
threads, pages read and prepared one after the other, batches of 8 pages,
each batch written with xarray ``to_zarr(region=...)`` into a store chunked
at 1000 pages (so every batch rewrites whole 1000-page chunks: zarr reads,
patches and recompresses them), and a "flush" every 10 batches (the store
reopened and its metadata consolidated).  Same pages, same model (tiny).

pagecube: ``pipeline.build`` on a LocalCluster of 2 workers x 1 thread.
Goal: pagecube pages/s >= 1.8x the seed loop's.

Write amplification = bytes written to storage during the build / size of the
finished store.  Counted two ways, in every process that writes (client,
workers, the seed process):
- store: bytes handed to zarr's LocalStore ``set`` (a counting patch installed
  in each process); divided by the sum of the store's file sizes;
- disk: the kernel's ``write_bytes`` from /proc/PID/io (page-granular, counts
  the temp files zarr renames and the finished-chunk index); divided by the
  store's allocated blocks.
Goal: <= 1.1 for pagecube (the seed loop is about 125 by design: 1000/8).
"""
from __future__ import annotations

import time

from common import (LocalDask, Workdir, figure, header, install_store_counter, load_average, note, parser,
                    quiet_logs, store_bytes, store_counter)

GOAL_SPEEDUP = 1.8
GOAL_AMP = 1.1


def seed_loop(listing, out, n_pages: int, batch: int = 8, chunk: int = 1000, flush_every: int = 10) -> dict:
    import numpy as np
    import torch
    import xarray as xr
    import zarr

    from pipeline.inputs import PageSource
    from pipeline.manifest import PageError, read_page
    from pipeline.model.registry import load_model
    from pipeline.store.location import StoreLocation, quiet_zarr_warnings
    from pipeline.store.schema import DATA_VARS, STATUS_DONE, STATUS_FAILED, empty_region
    from pipeline.store.template import StoreConfig, write_template

    torch.set_num_threads(torch.get_num_threads())  # the seed left torch at its default
    model = load_model("tiny", device="cpu")
    loc = StoreLocation.of(str(out))
    cfg = StoreConfig(n_pages, chunk, 12, model.info.embedding_dim, "float32", "tiny", model.info.weights_digest,
                      "seed-loop")
    write_template(loc, cfg, {"title": "seed loop"})
    refs = PageSource(str(listing)).slice(0, n_pages).refs()
    dims = {"page_embeddings": ("page", "embedding_dim"), "panel_embeddings": ("page", "panel", "embedding_dim")}
    from pipeline.store.schema import VARIABLES

    install_store_counter()
    c0 = store_counter(reset=True)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    for b, start in enumerate(range(0, n_pages, batch)):
        stop = min(start + batch, n_pages)
        region = empty_region(stop - start, 12, model.info.embedding_dim)
        pages, prepared = [], []
        for i, ref in enumerate(refs[start:stop]):
            try:
                page = read_page(ref, max_panels=12)
                pages.append((i, page))
                prepared.append(model.prepare(page))
            except PageError as exc:
                region["status"][i], region["error"][i] = STATUS_FAILED, str(exc)
        if prepared:
            outs = model.forward(model.collate(prepared))
            for j, (i, page) in enumerate(pages):
                k = page.n_kept
                region["page_id"][i] = page.page_id
                region["panel_coordinates"][i, :k] = page.boxes
                region["text_content"][i, :k] = page.texts
                region["panel_mask"][i, :k] = True
                region["n_panels"][i] = page.n_panels
                for name in ("page_embeddings", "panel_embeddings", "attention_weights", "reading_order"):
                    region[name][i] = outs[name][j]
                region["status"][i] = STATUS_DONE
        region["written_at"][:] = np.int64(time.time() * 1000)
        ds = xr.Dataset({name: (VARIABLES[name].dims, region[name]) for name in (*DATA_VARS, "status")})
        with quiet_zarr_warnings():
            ds.to_zarr(loc.zarr_store, region={"page": slice(start, stop)}, zarr_format=3)
            if (b + 1) % flush_every == 0:  # the seed's "flush": reopen and consolidate
                zarr.consolidate_metadata(loc.zarr_store)
                xr.open_zarr(loc.zarr_store, consolidated=True).close()
    seconds = time.perf_counter() - t0
    c1 = store_counter()
    return {"pages_per_s": n_pages / seconds, "cpu_per_page": (time.process_time() - cpu0) / n_pages,
            "store_bytes": c1["bytes"] - c0["bytes"],
            "disk_bytes": c1["write_bytes"] - c0["write_bytes"]}


def _counters_on(dask_worker=None):
    install_store_counter()
    return store_counter()


def pagecube_build(cl: LocalDask, listing, out, n_pages: int) -> dict:
    cl.warm(listing, out, {"workers": cl.workers})  # first-call costs before the counters start
    install_store_counter()
    before = cl.client.run(_counters_on)
    me0 = store_counter()
    res = cl.build(listing, out, n_pages, workers=cl.workers, overwrite=True)
    after = cl.client.run(store_counter)
    me1 = store_counter()
    res["store_bytes"] = (me1["bytes"] - me0["bytes"]) + sum(after[w]["bytes"] - before[w]["bytes"] for w in after)
    res["disk_bytes"] = (me1["write_bytes"] - me0["write_bytes"]) + sum(
        after[w]["write_bytes"] - before[w]["write_bytes"] for w in after)
    return res


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=None)
    args = p.parse_args(argv)
    quiet_logs()
    header("2./3. against the seed's loop; write amplification")
    n = args.pages or (400 if args.quick else 1000)
    with Workdir(args.workdir) as wd:
        listing = wd.repeated(wd.sample(200), n)
        load0 = load_average()
        seed_out = wd.fresh("seed-loop.zarr")
        seed = seed_loop(listing, seed_out, n)
        with LocalDask(2) as cl:
            out = wd.fresh("pagecube-w2.zarr")
            pc = pagecube_build(cl, listing, out, n)
        note(f"{n} pages; load average {load0} -> {load_average()}")
        js = args.json
        figure("seed loop (1 process, batches of 8, 1000-page chunks)", seed["pages_per_s"], unit="pages/s",
               json_path=js)
        figure("pagecube build, 2 workers x 1 thread", pc["pages_per_s"], unit="pages/s", json_path=js)
        speed = pc["pages_per_s"] / seed["pages_per_s"]
        figure("speed-up pagecube / seed loop", speed, goal=f">= {GOAL_SPEEDUP}", ok=speed >= GOAL_SPEEDUP,
               json_path=js, fmt="{:.2f}")
        cpu_speed = seed["cpu_per_page"] / pc["cpu_per_page"]
        figure("CPU s per page, seed loop / pagecube (x2 = speed-up on 2 idle cores)", cpu_speed, json_path=js,
               fmt="{:.2f}")
        note(f"CPU ms/page: seed loop {1000 * seed['cpu_per_page']:.1f} (torch at its default threads), "
             f"pagecube {1000 * pc['cpu_per_page']:.1f} (workers + client + scheduler)")
        for name, res, store in (("pagecube", pc, out), ("seed loop", seed, seed_out)):
            size, blocks = store_bytes(store)
            amp = res["store_bytes"] / size
            figure(f"{name}: write amplification (zarr store bytes / store size)", amp,
                   goal=f"<= {GOAL_AMP}" if name == "pagecube" else "~125 expected",
                   ok=(amp <= GOAL_AMP) if name == "pagecube" else None, json_path=js, fmt="{:.2f}")
            if res["disk_bytes"] > 0:
                figure(f"{name}: write amplification (disk write_bytes / allocated)", res["disk_bytes"] / blocks,
                       goal=f"<= {GOAL_AMP}" if name == "pagecube" else None, json_path=js, fmt="{:.2f}")
            note(f"{name}: store {size / 1e6:.2f} MB in files ({blocks / 1e6:.2f} MB allocated); "
                 f"zarr set {res['store_bytes'] / 1e6:.2f} MB; disk write_bytes {res['disk_bytes'] / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
