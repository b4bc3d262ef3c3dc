"""Benchmark 9: pages as large as real scans: decoding at the size the model needs.

Real comic scans are about 2000x3000 pixels; the models crop panels to 64 px
(``tiny``) or 224 px (``pretrained``, ``closure-lite-base``).  Pages are
decoded just large enough for those crops (JPEG DCT scaling, ``pipeline.images``).

1. CPU ms to read + prepare one page on one thread, step by step (read the
   files, decode, crop + resize, text and the rest of ``prepare``), with a full
   decode ("before") and at the model's size ("after"), on sample-size pages
   (800x1200) and on the same pages at scan size.  Goals: <= 12 ms for
   ``pretrained`` / ``closure-lite-base`` and <= 9 ms for ``tiny`` at scan size.
2. A whole build of the same pages, 2 workers, ``tiny``: time at sample size /
   time at scan size, builds alternating on one kept cluster.  Goal >= 0.75.
3. Page-embedding cosine of scan-size against sample-size pages, ``tiny`` and
   ``pretrained`` (the read + prepare + forward a task runs).  Goal >= 0.99.

"The same pages at scan size" are the sample's pages upscaled to 1988 px wide
on tinted paper, JPEG quality 90, boxes and ``page_size`` scaled in their
manifests (:meth:`common.Workdir.scanned`), so both sizes show one picture.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from common import LocalDask, Workdir, figure, header, load_average, model_available, note, parser, quiet_logs

GOAL_MS = {"tiny": 9.0, "pretrained": 12.0, "closure-lite-base": 12.0}
GOAL_BUILD = 0.75
GOAL_COSINE = 0.99
STEPS = ("read", "decode", "crops", "text + rest")


def _refs(listing, n):
    from pipeline.inputs import PageSource

    return PageSource(str(listing)).slice(0, n).refs()


def pil_crops(image, boxes, side):
    """The crops as they were made before (PIL ``resize(box=...)`` on the full image), for "before"."""
    from PIL import Image

    from pipeline.images import crop_box

    return np.stack([np.asarray(image.resize((side, side), Image.BILINEAR, box=crop_box(image.size, b)))
                     for b in boxes]) if len(boxes) else None


def step_ms(model, refs, before: bool) -> dict[str, float]:
    """Median CPU ms per step of one page on this thread.

    ``before``: a full decode and PIL crops, as every page was read before; else the build's way (decoded
    at ``model.panel_side``, crops by :func:`pipeline.images.crop_panels`).  "text + rest" is the rest
    of the model's ``prepare`` (its own crops taken off)."""
    from pipeline import images
    from pipeline.inputs import join_path
    from pipeline.manifest import (MAX_IMAGE_PIXELS, page_from_manifest, parse_manifest, read_image_bytes,
                                   read_manifest_bytes)

    clock = time.thread_time
    per: dict[str, list[float]] = {s: [] for s in STEPS}
    for ref in refs:
        t0 = clock()
        m = parse_manifest(read_manifest_bytes(ref))
        raw = read_image_bytes(join_path(ref.base_dir, m.page_image_path))
        t1 = clock()
        header_ = images.open_image(raw, MAX_IMAGE_PIXELS)
        page = page_from_manifest(m, header_.size, model.info.max_panels)
        side = None if before else model.panel_side
        reduction = images.reduction_for(page.boxes, page.size, side)
        page.image, page.image_scale, page.pixels = images.decode(header_, reduction, raw=None if before else raw)
        t2 = clock()
        crop = getattr(model, "crop_size", None) or model.image_size
        if before:
            pil_crops(page.image, page.image_boxes(), crop)
        else:
            images.crop_panels(page.rgb(), page.image_boxes(), crop)
        t3 = clock()
        if not before:
            model.prepare(page)
            t4 = clock()
            rest = (t4 - t3) - (t3 - t2)
        else:
            t4 = clock()
            images.crop_panels(page.rgb(), page.image_boxes(), crop)
            t5 = clock()
            model.prepare(page)
            rest = (clock() - t5) - (t5 - t4)
        for name, v in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, rest)):
            per[name].append(1000 * max(v, 0.0))
    return {s: statistics.median(v) for s, v in per.items()}


def cosines(model, small, large, n) -> np.ndarray:
    """Per-page cosine of page embeddings: the same pages read at sample size and at scan size."""
    from pipeline.manifest import read_page

    def embed(listing):
        prepared = [model.prepare(read_page(r, max_panels=model.info.max_panels, panel_side=model.panel_side))
                    for r in _refs(listing, n)]
        return np.concatenate([model.forward(model.collate(prepared[i:i + 16]))["page_embeddings"]
                               for i in range(0, len(prepared), 16)])

    a, b = embed(small), embed(large)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main(argv=None) -> int:
    import torch

    from pipeline.model.registry import load_model

    p = parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    quiet_logs()
    torch.set_num_threads(1)
    header("9. scan-size pages: decoding at the size the model needs")
    n_step = 24 if args.quick else 48
    with Workdir(args.workdir) as wd:
        small = wd.sample(100, seed=8)
        large = wd.scanned(small)
        note(f"scan-size pages: {large.parent.name}")

        models = [m for m in ("tiny", "pretrained", "closure-lite-base") if not model_available(m)]
        for name in models:
            model = load_model(name, device="cpu")
            for size, listing in (("sample", small), ("scan", large)):
                refs = _refs(listing, n_step)
                step_ms(model, refs[:4], False)  # first calls (imports, tokenizer caches) untimed
                before, after = step_ms(model, refs, True), step_ms(model, refs, False)
                for label, ms in (("before", before), ("after", after)):
                    note(f"{name:>17}, {size} page, {label:>6}: "
                         + ", ".join(f"{s} {ms[s]:.1f}" for s in STEPS) + f"  = {sum(ms.values()):.1f} ms")
                total = sum(after.values())
                goal = GOAL_MS[name] if size == "scan" else None
                figure(f"{name}: CPU ms to read + prepare a {size}-size page", total, unit="ms",
                       goal=f"<= {goal:g}" if goal else None, ok=(total <= goal) if goal else None,
                       json_path=args.json, fmt="{:.1f}")

        for name in ("tiny", "pretrained"):
            if name not in models:
                continue
            c = cosines(load_model(name, device="cpu"), small, large, 40 if args.quick else 100)
            figure(f"{name}: page-embedding cosine, scan-size vs sample-size (min)", float(c.min()),
                   goal=f">= {GOAL_COSINE}", ok=bool(c.min() >= GOAL_COSINE), json_path=args.json, fmt="{:.4f}")

        n_pages = 400
        rounds = 2 if args.quick else 3
        small_n, large_n = wd.repeated(small, n_pages), wd.repeated(large, n_pages)
        seconds: dict[str, list[float]] = {"sample": [], "scan": []}
        with LocalDask(2) as dask:
            for r in range(rounds):
                order = ("sample", "scan") if r % 2 == 0 else ("scan", "sample")
                for size in order:
                    listing = small_n if size == "sample" else large_n
                    t = time.perf_counter()
                    dask.build(listing, wd.fresh(f"scan-{size}.zarr"), n_pages, chunk_pages=50, overwrite=True)
                    seconds[size].append(time.perf_counter() - t)
                    note(f"build of {n_pages} {size}-size pages: {seconds[size][-1]:.1f} s (load {load_average()})")
        ratio = statistics.median(a / b for a, b in zip(seconds["sample"], seconds["scan"]))
        figure("whole build, tiny, 2 workers: sample-size time / scan-size time", ratio, goal=f">= {GOAL_BUILD}",
               ok=ratio >= GOAL_BUILD, json_path=args.json, fmt="{:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
