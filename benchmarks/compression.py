"""Benchmark 5: compression and precision of the embedding arrays.

Real tiny-model outputs for the sample's pages are written (whole chunks,
through the same region writer the tasks use) into stores that differ only in
the embedding arrays' codec and dtype: zstd (zarr's default), Blosc-lz4 with
bitshuffle, none, each at float32 and float16 (``--codec``,
``--embedding-dtype``).  Printed: the embedding arrays' bytes on disk, the
ratio to raw float32, the time to write every variable of a chunk, and the
float16 error.  The choice of default is explained at the end.
"""
from __future__ import annotations

import os
import time

from common import Workdir, figure, header, note, parser, quiet_logs

CONFIGS = [("zstd", "float32"), ("lz4", "float32"), ("none", "float32"),
           ("zstd", "float16"), ("lz4", "float16")]


def embeddings(listing, n: int):
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from pipeline.inputs import PageSource
    from pipeline.manifest import read_page
    from pipeline.model.registry import load_model

    m = load_model("tiny", device="cpu")
    refs = PageSource(str(listing)).slice(0, n).refs()
    pages = [read_page(r, max_panels=12) for r in refs]
    outs = [m.forward(m.collate([m.prepare(p) for p in pages[i:i + 16]])) for i in range(0, n, 16)]
    out = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    return pages, out


def dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv=None) -> None:
    import numpy as np

    from pipeline.store.location import StoreLocation
    from pipeline.store.schema import STATUS_DONE, empty_region
    from pipeline.store.template import StoreConfig, write_template
    from pipeline.store.writer import open_store_group, write_region

    p = parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    quiet_logs()
    js = args.json
    header("5. compression and precision of the embedding arrays")
    chunk, repeats = 100, (3 if args.quick else 10)
    with Workdir(args.workdir) as wd:
        pages, out = embeddings(wd.sample(200), 200)
        n = len(pages) * repeats
        raw = (out["page_embeddings"].nbytes + out["panel_embeddings"].nbytes) * repeats
        results = {}
        for codec, dtype in CONFIGS:
            store = wd.fresh(f"codec-{codec}-{dtype}.zarr")
            loc = StoreLocation.of(str(store))
            write_template(loc, StoreConfig(n, chunk, 12, 128, dtype, "tiny", "seed:0", "bench"), {}, codec=codec)
            group = open_store_group(loc, f"codec-{codec}-{dtype}")
            regions = []
            for start in range(0, len(pages), chunk):
                r = empty_region(chunk, 12, 128, dtype)
                for i, page in enumerate(pages[start:start + chunk]):
                    k = page.n_kept
                    r["page_id"][i] = page.page_id
                    r["panel_coordinates"][i, :k] = page.boxes
                    r["text_content"][i, :k] = page.texts
                    r["panel_mask"][i, :k] = True
                for name in ("page_embeddings", "panel_embeddings", "attention_weights", "reading_order"):
                    r[name][:] = out[name][start:start + chunk]
                r["status"][:] = STATUS_DONE
                regions.append(r)
            t = time.perf_counter()
            for c in range(n // chunk):
                write_region(group, regions[c % len(regions)], c * chunk, (c + 1) * chunk, chunk)
            per_chunk = (time.perf_counter() - t) / (n // chunk)
            size = dir_bytes(store / "page_embeddings") + dir_bytes(store / "panel_embeddings")
            results[(codec, dtype)] = (size, per_chunk)
            figure(f"{codec:>4} {dtype}: embedding bytes / raw float32", size / raw, unit=f"({size / 1e6:.2f} MB)",
                   json_path=js, fmt="{:.3f}")
            figure(f"{codec:>4} {dtype}: write time per {chunk}-page chunk (all variables)", 1000 * per_chunk,
                   unit="ms", json_path=js, fmt="{:.1f}")
        f16 = out["panel_embeddings"].astype(np.float16).astype(np.float32)
        err = float(np.nanmax(np.abs(f16 - out["panel_embeddings"])))
        rel = err / float(np.nanmax(np.abs(out["panel_embeddings"])))
        figure("float16 storage: max abs error on panel embeddings", err, unit=f"(relative {rel:.1e})",
               json_path=js, fmt="{:.2e}")
        z32, l32 = results[("zstd", "float32")], results[("lz4", "float32")]
        note(f"zstd vs lz4-bitshuffle at float32: size {z32[0] / l32[0]:.2f}x, write time "
             f"{z32[1] / l32[1]:.2f}x; float16 halves the bytes whatever the codec")


if __name__ == "__main__":
    main()
