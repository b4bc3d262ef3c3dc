"""Benchmark 7: the whole command, timed from outside as a person at a terminal times it.

- start-up: ``pagecube --version`` and ``pagecube status STORE`` (time, and
  whether they import torch, Dask, distributed, xarray or pandas: goal none);
  ``pagecube build PAGES --out S --workers 2 --init-only`` on a local cluster
  (goal <= 2.5 s);
- the whole command ``pagecube build PAGES --out S --workers 2 --model tiny``
  at 4000 pages against a plain 2-process script doing the same read +
  prepare + forward with no Dask and no store (``plain_script.py``), process
  start and model load included on both sides: ratio plain time / pagecube
  time, goal >= 0.90; the steady state (pagecube's run phase against the
  plain processes after their models are loaded), goal >= 0.95; and the time
  to the first finished chunk.

Runs alternate (plain, pagecube, plain, ...) and ratios are taken pair by pair,
so a burst of someone else's load hits both sides; medians and ranges are
printed. ``--before DIR`` times another checkout of pagecube in the same
rotation (e.g. ``git worktree add DIR <commit>``), for before/after figures;
the two take turns at going first.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time

from common import (HERE, Workdir, cli_command, figure, header, load_average, median, note, parser, spread,
                    timed_command)

HEAVY = ("torch", "dask", "distributed", "xarray", "pandas")
GOAL_INIT = 2.5
GOAL_WHOLE = 0.90
GOAL_STEADY = 0.95


def imports_of(args: list, tree=None) -> list[str]:
    """Heavy modules a command imports (run in process, the way the console script runs it)."""
    argv, env, cwd = cli_command([], tree)
    code = ("import sys\nfrom pipeline.cli import main\nmain(sys.argv[1:])\n"
            f"print('HEAVY', ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    res = timed_command([sys.executable, "-c", code, *map(str, args)], env, cwd, check=False)
    line = next((ln for ln in res["stdout"].splitlines() if ln.startswith("HEAVY")), "HEAVY ?")
    return [m for m in line[6:].split(",") if m]


def first_chunk_watch(store: str):
    """A watch for timed_command: the elapsed time when the first finished-chunk entry appears."""
    seen: dict = {}
    folder = os.path.join(store, "_pagecube", "chunks")

    def watch(elapsed: float) -> None:
        if "first" not in seen:
            try:
                if any(True for _ in os.scandir(folder)):
                    seen["first"] = elapsed
            except OSError:
                pass
    return watch, seen


def pagecube_build(wd: Workdir, listing, name: str, tree=None, init_only=False, workers=2, extra=()) -> dict:
    store = str(wd.fresh(name))
    args = ["build", listing, "--out", store, "--workers", workers, "--model", "tiny", "--no-progress", *extra]
    if init_only:
        args.append("--init-only")
    argv, env, cwd = cli_command(args, tree)
    watch, seen = first_chunk_watch(store)
    res = timed_command(argv, env, cwd, watch=None if init_only else watch)
    m = re.search(r"\(([\d.]+) pages/s (?:this run|over this run)", res["stdout"])
    res["steady"] = float(m.group(1)) if m else float("nan")
    res["first_chunk"] = seen.get("first", float("nan"))
    shutil.rmtree(store, ignore_errors=True)
    return res


def plain_script(listing, workers=2) -> dict:
    res = timed_command([sys.executable, str(HERE / "plain_script.py"), str(listing), "--workers", str(workers)],
                        cwd=str(HERE))
    res["steady"] = json.loads(res["stdout"].strip().splitlines()[-1])["steady_pages_per_s"]
    return res


def turn(trees: list, r: int) -> list:
    """The checkouts in the order of run ``r``: each goes first every other run (in two rotations
    with a fixed order, the checkout timed second came out ahead both times, whichever it was)."""
    return trees if r % 2 == 0 else trees[::-1]


def startup(wd: Workdir, listing, repeats: int, before, js) -> None:
    header("7a. start-up: --version, status, --init-only with 2 local workers")
    trees = [("after", None)] + ([("before", before)] if before else [])
    store = str(wd.fresh("status-store.zarr"))
    argv, env, cwd = cli_command(["build", listing, "--out", store, "--cluster", "sync", "--model", "tiny",
                                  "--init-only", "--no-progress"])
    timed_command(argv, env, cwd)
    for label, tree in trees:
        for what, args in (("--version", ["--version"]), ("status", ["status", store])):
            argv, env, cwd = cli_command(args, tree)
            walls = [timed_command(argv, env, cwd)["wall"] for _ in range(repeats)]
            heavy = imports_of(args, tree)
            figure(f"[{label}] pagecube {what}: seconds, median (range) over {repeats}", median(walls), unit="s",
                   json_path=js)
            note(f"[{label}] pagecube {what}: {spread(walls)} s; heavy modules imported: {', '.join(heavy) or 'none'}")
            if label == "after":
                figure(f"pagecube {what}: heavy modules imported", len(heavy), goal="0 (none of "
                       f"{', '.join(HEAVY)})", ok=not heavy, json_path=js, fmt="{:.0f}")
    walls: dict[str, list] = {label: [] for label, _ in trees}
    for r in range(repeats):
        for label, tree in turn(trees, r):
            walls[label].append(pagecube_build(wd, listing, f"init-{label}.zarr", tree, init_only=True)["wall"])
    for label, _ in trees:
        med = median(walls[label])
        figure(f"[{label}] build --init-only, 2 local workers (s)", med, unit="s",
               goal=f"<= {GOAL_INIT}" if label == "after" else None, ok=(med <= GOAL_INIT) if label == "after" else None,
               json_path=js)
        note(f"[{label}] --init-only: {spread(walls[label])} s over {repeats}")


def whole(wd: Workdir, listing, n: int, repeats: int, before, js) -> None:
    header(f"7b. whole command at {n} pages: plain 2-process script / pagecube build --workers 2")
    trees = [("after", None)] + ([("before", before)] if before else [])
    rows: dict[str, list] = {label: [] for label, _ in trees}
    plains = []
    load0 = load_average()
    for r in range(repeats):
        plain = plain_script(listing)
        plains.append(plain)
        for label, tree in turn(trees, r):
            pc = pagecube_build(wd, listing, f"whole-{label}.zarr", tree)
            rows[label].append({"pc": pc, "plain": plain})
            note(f"run {r + 1} [{label}]: plain {plain['wall']:.1f} s ({plain['steady']:.0f} pages/s steady), "
                 f"pagecube {pc['wall']:.1f} s ({pc['steady']:.0f} pages/s run phase, first chunk at "
                 f"{pc['first_chunk']:.1f} s)")
    for label, _ in trees:
        whole_r = [x["plain"]["wall"] / x["pc"]["wall"] for x in rows[label]]
        steady_r = [x["pc"]["steady"] / x["plain"]["steady"] for x in rows[label]]
        first = [x["pc"]["first_chunk"] for x in rows[label]]
        after = label == "after"
        figure(f"[{label}] whole command ratio plain/pagecube (wall)", median(whole_r),
               goal=f">= {GOAL_WHOLE}" if after else None, ok=median(whole_r) >= GOAL_WHOLE if after else None,
               json_path=js, fmt="{:.3f}")
        figure(f"[{label}] steady state ratio pagecube/plain (pages/s)", median(steady_r),
               goal=f">= {GOAL_STEADY}" if after else None, ok=median(steady_r) >= GOAL_STEADY if after else None,
               json_path=js, fmt="{:.3f}")
        figure(f"[{label}] time to the first finished chunk (s)", median(first), unit="s", json_path=js)
        note(f"[{label}] whole {spread(whole_r, '{:.3f}')}; steady {spread(steady_r, '{:.3f}')}; "
             f"pagecube {spread([x['pc']['wall'] for x in rows[label]], '{:.1f}')} s; first chunk "
             f"{spread(first)} s")
    note(f"plain {spread([p['wall'] for p in plains], '{:.1f}')} s; load average {load0} -> {load_average()}")


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=None, help="pages for the whole-command comparison (default 4000)")
    p.add_argument("--repeats", type=int, default=None, help="runs of each side (default 3; --quick 2)")
    p.add_argument("--before", default=None, help="another pagecube checkout to time side by side")
    p.add_argument("--only", choices=("startup", "whole"), default=None)
    args = p.parse_args(argv)
    n = args.pages or (1000 if args.quick else 4000)
    repeats = args.repeats or (2 if args.quick else 3)
    with Workdir(args.workdir) as wd:
        listing = wd.repeated(wd.sample(200), n)
        t = time.perf_counter()
        if args.only in (None, "startup"):
            startup(wd, listing, repeats, args.before, args.json)
        if args.only in (None, "whole"):
            whole(wd, listing, n, repeats, args.before, args.json)
        note(f"measured in {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
