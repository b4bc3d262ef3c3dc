"""Benchmark 6: reading order and attention of each built-in model on sample pages.

The sample's manifests know the true reading order (``order_index``), so each
model's ``reading_order`` is compared with it: pages whose whole order is
right, and panels put in their true position (pages with two or more panels).
Attention is summarised by its entropy relative to uniform (1.0 = uniform)
and its peak (largest weight x panels: 1.0 = uniform).  ``closure-lite-base``
without a checkpoint is seeded (untrained) and slow on CPU: fewer pages.
These are the README's model-table figures.
"""
from __future__ import annotations

import time

from common import Workdir, figure, header, model_available, note, parser, quiet_logs

MODELS = (("tiny", 100), ("pretrained", 100), ("closure-lite-base", 24))


def main(argv=None) -> None:
    import torch

    from pipeline.model.quality import measure, sample_pages
    from pipeline.model.registry import default_model, load_model

    p = parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    quiet_logs()
    torch.set_num_threads(1)
    header("6. reading order and attention per model (sample pages, one CPU thread)")
    note(f"the default model here: {default_model()}")
    with Workdir(args.workdir) as wd:
        for name, n in MODELS:
            if args.quick and name == "closure-lite-base":
                continue
            why = model_available(name)
            if why:
                note(f"{name}: skipped ({why})")
                continue
            model = load_model(name, device="cpu")
            pages = sample_pages(wd.fresh(f"quality-{n}"), n, seed=0, panel_side=model.panel_side)
            t = time.perf_counter()
            q = measure(model, pages)
            note(f"{name} on {n} pages ({time.perf_counter() - t:.0f} s): {q.line()}")
            goal = ">= 90%" if name == default_model() else None
            figure(f"{name}: pages in exact reading order", 100 * q.order_accuracy, unit="%", goal=goal,
                   ok=(q.order_accuracy >= 0.9) if goal else None, json_path=args.json, fmt="{:.0f}")
            figure(f"{name}: panels in their true position", 100 * q.panels_placed / q.panels, unit="%",
                   json_path=args.json, fmt="{:.0f}")
            figure(f"{name}: attention entropy (1 = uniform)", q.attention_entropy, json_path=args.json, fmt="{:.2f}")
            figure(f"{name}: attention peak (x uniform)", q.attention_peak, json_path=args.json, fmt="{:.2f}")
            if name == default_model():  # the same pages drawn at scan size, decoded at the model's size
                scans = sample_pages(wd.fresh(f"quality-scan-{n}"), n, seed=0, scan=True, panel_side=model.panel_side)
                s = measure(model, scans)
                note(f"{name} on {n} scan-size pages: {s.line()}")
                figure(f"{name}: pages in exact reading order, scan-size pages", 100 * s.order_accuracy, unit="%",
                       goal=f"= {100 * q.order_accuracy:.0f}% (sample size)",
                       ok=s.order_accuracy == q.order_accuracy, json_path=args.json, fmt="{:.0f}")


if __name__ == "__main__":
    main()
