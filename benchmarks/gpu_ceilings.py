#!/usr/bin/env python3
"""The two ceilings a GPU build runs under, measured apart: the model alone and the CPU work alone.

    python benchmarks/gpu_ceilings.py PAGES.txt MODEL [--device cuda] [--batch-size 64] [--threads N]

A build can be no faster than the slower of:
  - the model: ``collate`` + ``forward`` (host-to-device copy, bf16 autocast on CUDA, outputs back to
    numpy) on batches prepared once beforehand, so reading and preparing cost nothing here;
  - reading + preparing pages (manifest, image decode, crops, tokenisation: what the workers'
    read threads do), with 1 thread and with N threads.
gpu_check.sh prints these beside the build's own rate, so a shortfall names its cause.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pages")
    ap.add_argument("model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seconds", type=float, default=4.0, help="time spent on each figure")
    a = ap.parse_args()

    import torch

    from pipeline.inputs import PageSource
    from pipeline.manifest import read_page
    from pipeline.model import load_model

    source = PageSource(a.pages)  # the build's own reading of a page list (relative lines, JSONL, URLs)
    refs = source.slice(0, min(len(source), 256)).refs()
    model = load_model(a.model, device=a.device)

    def load(ref):
        page = read_page(ref, max_panels=model.info.max_panels, panel_side=getattr(model, "panel_side", None))
        return model.prepare(page)

    def rate(fn, per_call: int) -> float:
        fn()  # warm-up (allocator, kernels, autotuning)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < a.seconds:
            fn()
            n += per_call
        return n / (time.perf_counter() - t0)

    n = max(a.batch_size, min(len(refs), 256))
    distinct = (refs * (n // len(refs) + 1))[:n]  # at least one whole batch, cycling a short list
    prepared = [load(r) for r in distinct]
    batches = [prepared[i:i + a.batch_size] for i in range(0, len(prepared) - a.batch_size + 1, a.batch_size)]
    collated = [model.collate(b) for b in batches]
    k = {"i": 0}

    def forward_only():
        model.forward(collated[k["i"] % len(collated)])
        k["i"] += 1

    def collate_forward():
        model.forward(model.collate(batches[k["i"] % len(batches)]))
        k["i"] += 1

    cuda = a.device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    f_rate = rate(forward_only, a.batch_size)
    cf_rate = rate(collate_forward, a.batch_size)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    one = rate(lambda: [load(r) for r in distinct[:16]], 16)
    with ThreadPoolExecutor(a.threads) as pool:
        many = rate(lambda: list(pool.map(load, distinct)), len(distinct))
    print(f"ceilings of {a.model} on {a.device}, batch {a.batch_size}:")
    print(f"  model alone, forward on collated batches     {f_rate:9.1f} pages/s"
          + (f"   (peak memory allocated {peak:.0f} MiB)" if peak is not None else ""))
    print(f"  model alone, collate + forward               {cf_rate:9.1f} pages/s")
    print(f"  read + prepare, 1 thread                     {one:9.1f} pages/s")
    print(f"  read + prepare, {a.threads:2d} threads                   {many:9.1f} pages/s")


if __name__ == "__main__":
    main()
