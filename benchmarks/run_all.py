"""Run every pagecube benchmark in one go and print each figure next to its goal.

    python benchmarks/run_all.py            # a few minutes on 2 cores
    python benchmarks/run_all.py --quick    # about half that, smaller runs, no large model

Options are passed on to each benchmark (--workdir DIR keeps the samples and
stores; --json FILE appends every figure as a JSON line).  Figures that are
ratios are measured side by side within one run, because shared machines are
noisy.
"""
from __future__ import annotations

import sys
import time

from common import RESULTS, Workdir, parser

import compression
import model_quality
import overhead
import scale
import seed_loop
import status_scale


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    t = time.perf_counter()
    common = (["--quick"] if args.quick else []) + (["--json", args.json] if args.json else [])
    with Workdir(args.workdir) as wd:
        shared = common + ["--workdir", str(wd.path)]
        for bench in (overhead, seed_loop, scale, status_scale, compression, model_quality):
            try:
                bench.main(shared)
            except Exception as exc:  # noqa: BLE001 - one failing benchmark does not hide the others
                print(f"  ! {bench.__name__} failed: {type(exc).__name__}: {exc}", flush=True)
    print(f"\n== summary ({time.perf_counter() - t:.0f} s)")
    missed = [r for r in RESULTS if r["ok"] is False]
    met = [r for r in RESULTS if r["ok"]]
    print(f"  {len(met)} goals met, {len(missed)} not met")
    for r in missed:
        print(f"  NOT MET: {r['name']} = {r['value']:.3g} {r['unit']} (goal {r['goal']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
