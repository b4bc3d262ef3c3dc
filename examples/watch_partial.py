"""Open a store with xarray while a build is writing it.

    python examples/watch_partial.py STORE [--interval S] [--timeout S]
    python examples/watch_partial.py --demo DIR      # makes a sample and starts a build itself

Each look opens the store afresh (``xr.open_zarr``): an open Dataset is a
snapshot and keeps returning old values.  Pages with ``status == 1`` are
complete; every other page reads as fill values (NaN embeddings, empty text,
``reading_order == -1``) until its chunk is written, which is why a filter on
``status`` (or ``pipeline.open_pages``) comes first.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import xarray as xr


def look(store: str, storage_options=None) -> tuple[int, int, int, int]:
    """(done, failed, pending, total) plus a check that done pages hold data."""
    ds = xr.open_zarr(store, consolidated=True, storage_options=storage_options)  # fresh open, every time
    status = ds["status"].values
    done = np.flatnonzero(status == 1)
    if len(done):
        emb = ds["page_embeddings"].isel(page=done).values
        assert np.isfinite(emb).all(), "a page marked done has no embedding"
    pending = int((status == 0).sum())
    return len(done), int((status == 2).sum()), pending, len(status)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", nargs="?", help="the store to watch")
    ap.add_argument("--demo", metavar="DIR", help="make a sample in DIR and watch a build of it")
    ap.add_argument("--pages", type=int, default=48, help="pages for --demo")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between looks")
    ap.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    args = ap.parse_args(argv)
    if not args.store and not args.demo:
        ap.error("give a STORE or --demo DIR")

    build = None
    store = args.store
    if args.demo:
        from pipeline.sample import make_sample

        listing = make_sample(os.path.join(args.demo, "pages"), args.pages, seed=1)
        store = os.path.join(args.demo, "cube.zarr")
        pagecube = [sys.executable, "-c", "from pipeline.cli import run; run()"]  # = the pagecube command
        cmd = pagecube + ["build", str(listing), "--out", store, "--cluster", "sync", "--chunk-pages", "4",
                          "--batch-size", "4", "--model", "tiny", "--no-progress", "--overwrite"]
        build = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        print(f"started: pagecube build ... --out {store} (pid {build.pid})")

    t0 = time.monotonic()
    seen_partial = False
    last = None
    while time.monotonic() - t0 < args.timeout:
        if not os.path.exists(os.path.join(store, "zarr.json")) and "://" not in store:
            time.sleep(args.interval)  # the build has not written the template yet
            continue
        done, failed, pending, total = look(store)
        if (done, failed) != last:
            print(f"t={time.monotonic() - t0:5.1f}s  done {done:>5}  failed {failed:>4}  pending {pending:>5}  "
                  f"of {total}")
            last = (done, failed)
        seen_partial |= 0 < done < total
        if pending == 0:
            break
        if build is not None and build.poll() is not None:
            done, failed, pending, total = look(store)
            break
        time.sleep(args.interval)
    if build is not None:
        err = build.communicate()[1]
        if build.returncode not in (0, 3):
            print(err, file=sys.stderr)
            return build.returncode
    print(f"finished: {done} done, {failed} failed, {pending} pending; saw partial results: {seen_partial}")
    return 0 if pending == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
