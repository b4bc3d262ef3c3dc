"""The reference for whole-command timings: a plain W-process script, no Dask, no store.

    python benchmarks/plain_script.py PAGES.txt --workers 2 [--model tiny] [--batch-size 16]

Each of W spawned processes (torch at 1 thread) loads the model, then reads,
prepares and forwards its share of the pages in batches, preparing ahead in a
small thread pool, as a pagecube worker does, and writes nothing. Timed from
outside it is what a person would write instead of pagecube; it prints one JSON
line with its steady-state rate (from a barrier after every model is loaded).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from common import plain_limit


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pages")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    t = time.perf_counter()
    with open(args.pages) as f:
        n = sum(1 for line in f if line.strip())
    res = plain_limit(args.pages, n, args.workers, model=args.model, batch_size=args.batch_size)
    print(json.dumps({"pages": n, "steady_pages_per_s": res["pages_per_s"], "seconds": time.perf_counter() - t}))


if __name__ == "__main__":
    sys.exit(main())
