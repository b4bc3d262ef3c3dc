"""Benchmark 8: pagecube against a peer, Ray Data, on the same pages and model.

The same N pages (default 4000) and the ``tiny`` model, batch 16, 2 processes:

- ``pagecube build PAGES --out S --workers 2 --model tiny`` (the whole command);
- a Ray Data script (the whole command too, ``ray.init`` included):
  ``ray.data.from_items`` of the page list, ``map_batches`` over an actor
  pool of 2 (1 CPU each, torch at 1 thread) whose actors load the model once
  and read + prepare + forward each batch of 16 with pagecube's own reader and
  model, then ``write_parquet``.

Goal: pagecube >= 1.6x faster (Ray time / pagecube time, pair by pair, runs
alternating). The Ray run then checks its Parquet against pagecube's store:
every output (page and panel embeddings, attention, reading order) equal.

Ray is NOT a dependency of pagecube or its tests. Install it for this
benchmark only, e.g. in a separate virtual environment that can also import
pagecube's dependencies, and point ``--ray-python`` at its interpreter::

    python -m venv /some/where/rayenv
    /some/where/rayenv/bin/pip install "ray[data]" torch numpy pillow simplejpeg safetensors pydantic fsspec zarr
    python benchmarks/peer_ray.py --ray-python /some/where/rayenv/bin/python

Without Ray the benchmark says so and measures pagecube alone.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from common import (HERE, ROOT, Workdir, cli_command, figure, header, load_average, median, note, parser, spread,
                    timed_command)

GOAL = 1.6
OUTPUTS = ("page_embeddings", "panel_embeddings", "attention_weights", "reading_order")


# --- the Ray side (runs in the Ray interpreter) ---------------------------------------------------

class _Embedder:
    """One Ray actor: the model loaded once; a batch of page positions in, pagecube's outputs out."""

    def __init__(self, listing: str, model: str, max_panels: int):
        import torch

        torch.set_num_threads(1)
        from pipeline.inputs import PageSource
        from pipeline.model.registry import load_model

        self.refs = PageSource(listing).slice(0, len(PageSource(listing))).refs()
        self.model = load_model(model, max_panels=max_panels, device="cpu")
        self.max_panels = max_panels

    def __call__(self, batch: dict) -> dict:
        from pipeline.manifest import read_page

        idx = batch["index"]
        prepared = [self.model.prepare(read_page(self.refs[int(i)], max_panels=self.max_panels,
                                                 panel_side=self.model.panel_side)) for i in idx]
        out = self.model.forward(self.model.collate(prepared))
        return {"index": idx, **{k: out[k] for k in OUTPUTS}}


def ray_child(listing: str, out: str, model: str, batch_size: int, workers: int) -> None:
    """The whole Ray Data command; prints one JSON line of timings."""
    t0 = time.perf_counter()
    import numpy as np
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    with open(listing) as f:
        n = sum(1 for line in f if line.strip())
    t_init = time.perf_counter() - t0
    ds = ray.data.from_items([{"index": i} for i in range(n)])
    ds = ds.map_batches(_Embedder, fn_constructor_kwargs={"listing": listing, "model": model, "max_panels": 12},
                        batch_size=batch_size, concurrency=workers, num_cpus=1, batch_format="numpy")
    ds.write_parquet(out)
    t_done = time.perf_counter() - t0
    ray.shutdown()
    result = {"pages": n, "init_s": t_init, "done_s": t_done}
    print("RAY " + json.dumps(result), flush=True)


def ray_compare(out: str, store: str) -> None:
    """Ray's Parquet against pagecube's store, output by output; prints one JSON line."""
    import numpy as np
    import ray
    import zarr

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_parquet(out)
    got = ds.sort("index").take_batch(ds.count(), batch_format="numpy")
    ray.shutdown()
    group = zarr.open_group(store, mode="r")
    same, worst = True, 0.0
    for name in OUTPUTS:
        ref = np.asarray(group[name][:])
        mine = np.asarray(got[name]).reshape(ref.shape)
        if not np.array_equal(mine.astype(ref.dtype), ref):
            same = False
            worst = max(worst, float(np.nanmax(np.abs(mine.astype(np.float64) - ref.astype(np.float64)))))
    print("CMP " + json.dumps({"identical": same, "max_abs_diff": worst,
                               "pages": int(len(got["index"])), "in_order": bool((got["index"] ==
                                                                               np.arange(len(got["index"]))).all())}))


# --- the driver ------------------------------------------------------------------------------------

def ray_python_ok(python: str) -> str | None:
    """None when ``python`` imports ray.data and pagecube's model, else why not."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([python, "-c", "import ray, ray.data, pyarrow, torch, pipeline.model.tiny; print(ray.__version__)"],
                          capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
    note(f"Ray {proc.stdout.strip()} from {python}")
    return None


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=None, help="pages (default 4000; --quick 1000)")
    p.add_argument("--repeats", type=int, default=None, help="runs of each side (default 2)")
    p.add_argument("--scan", action="store_true", help="scan-size pages (the sample upscaled to 1988 px wide)")
    p.add_argument("--ray-python", default=sys.executable, help="an interpreter that imports ray[data]")
    p.add_argument("--ray-child", nargs=3, metavar=("LISTING", "OUT", "WORKERS"), help=argparse_hidden())
    p.add_argument("--ray-compare", nargs=2, metavar=("OUT", "STORE"), help=argparse_hidden())
    args = p.parse_args(argv)
    if args.ray_child:
        listing, out, workers = args.ray_child
        ray_child(listing, out, "tiny", 16, int(workers))
        return
    if args.ray_compare:
        ray_compare(*args.ray_compare)
        return
    header("8. peer: Ray Data (actor pool of 2, batch 16, Parquet) against pagecube build --workers 2")
    n = args.pages or (1000 if args.quick else 4000)
    repeats = args.repeats or 2
    why = ray_python_ok(args.ray_python)
    with Workdir(args.workdir) as wd:
        listing = wd.repeated(wd.scanned(wd.sample(200)) if args.scan else wd.sample(200), n)
        rows = []
        load0 = load_average()
        for r in range(repeats):
            store = str(wd.fresh("peer-pagecube.zarr"))
            argv_, env, cwd = cli_command(["build", listing, "--out", store, "--workers", 2, "--model", "tiny",
                                           "--batch-size", 16, "--no-progress"])
            pc = timed_command(argv_, env, cwd)
            row = {"pagecube": pc["wall"], "pagecube_cpu": pc["cpu"]}
            if why is None:
                out = str(wd.fresh("peer-ray.parquet"))
                env = dict(os.environ, PYTHONPATH=str(ROOT))
                ray = timed_command([args.ray_python, str(HERE / "peer_ray.py"), "--ray-child", str(listing), out,
                                     "2"], env, str(HERE))
                line = next(ln for ln in ray["stdout"].splitlines() if ln.startswith("RAY "))
                row.update(ray=ray["wall"], ray_cpu=ray["cpu"], **json.loads(line[4:]))
                if r == 0:  # untimed: the outputs, compared
                    cmp_ = timed_command([args.ray_python, str(HERE / "peer_ray.py"), "--ray-compare", out, store],
                                         env, str(HERE))
                    row.update(json.loads(next(ln for ln in cmp_["stdout"].splitlines() if ln.startswith("CMP "))[4:]))
                shutil.rmtree(out, ignore_errors=True)
                note(f"run {r + 1}: pagecube {pc['wall']:.1f} s, Ray Data {ray['wall']:.1f} s "
                     f"(ray.init {row['init_s']:.1f} s)"
                     + (f"; outputs identical: {row['identical']} (max |diff| {row['max_abs_diff']:.3g})"
                        if "identical" in row else ""))
            else:
                note(f"run {r + 1}: pagecube {pc['wall']:.1f} s")
            rows.append(row)
            shutil.rmtree(store, ignore_errors=True)
        if why is not None:
            note(f"Ray Data not measured: {why} (install it for this benchmark only; see --help)")
            figure(f"pagecube build, {n} pages, 2 workers (s)", median([r["pagecube"] for r in rows]), unit="s",
                   json_path=args.json)
            return
        ratios = [r["ray"] / r["pagecube"] for r in rows]
        figure(f"Ray Data time / pagecube time at {n} pages", median(ratios), goal=f">= {GOAL}",
               ok=median(ratios) >= GOAL, json_path=args.json, fmt="{:.2f}")
        figure("outputs equal to pagecube's (1 = all equal)", float(rows[0].get("identical", False)), goal="1",
               ok=bool(rows[0].get("identical")), json_path=args.json, fmt="{:.0f}")
        note(f"pagecube {spread([r['pagecube'] for r in rows], '{:.1f}')} s, Ray {spread([r['ray'] for r in rows], '{:.1f}')}"
             f" s; ratio {spread(ratios)}; load average {load0} -> {load_average()}")


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
