"""Benchmark 9: a large build stays flat: pages/s per fifth of the run, client and worker memory.

``pagecube build PAGES --out S --workers 2 --model tiny`` on 20,000 pages (the
sample's 200 pages repeated), run as a person runs it. The run is cut into
fifths by pages finished (from the store's finished-chunk index times); for
each fifth it prints the pages/s (pages finished between its ends over its
seconds) and the peak resident memory of the client process and of the
largest worker process (sampled every 0.25 s from /proc).

Goals: the pages/s of every fifth within 10% of their median; the peak memory of
the client and of the workers in the last fifth within 10% of the second
fifth's (the first holds start-up).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

from common import Workdir, cli_command, figure, header, load_average, note, parser

GOAL_RATE = 0.10
GOAL_MEMORY = 0.10


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def workers_of(client: int) -> list[int]:
    """Worker processes under the client: spawned, or forked from its forkserver (not the server itself
    nor multiprocessing's resource tracker)."""
    kids = _children()
    out, todo = [], list(kids.get(client, []))
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        cmd = _cmdline(pid)
        if "resource_tracker" in cmd:
            continue
        if "forkserver import main" in cmd and pid in kids.get(client, []):
            continue  # the server: its children are the workers
        out.append(pid)
    return out


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=None, help="pages (default 20000; --quick 4000)")
    args = p.parse_args(argv)
    n = args.pages or (4000 if args.quick else 20000)
    header(f"9. large run: {n} pages, pages/s per fifth, client and worker peak memory")
    with Workdir(args.workdir) as wd:
        listing = wd.repeated(wd.sample(200), n)
        store = wd.fresh("large.zarr")
        argv_, env, cwd = cli_command(["build", listing, "--out", store, "--workers", 2, "--model", "tiny",
                                       "--no-progress"])
        load0 = load_average()
        t0 = time.time()
        samples = []  # (time, client MiB, largest worker MiB)
        with open(os.devnull, "w") as null:
            proc = subprocess.Popen(argv_, env=env, cwd=cwd, stdout=null, stderr=subprocess.PIPE, text=True)
            while proc.poll() is None:
                workers = workers_of(proc.pid)
                samples.append((time.time(), _rss_mb(proc.pid), max((_rss_mb(w) for w in workers), default=0.0)))
                time.sleep(0.25)
            err = proc.stderr.read()
        wall = time.time() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"build failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
        chunks = store / "_pagecube" / "chunks"
        entries = []
        for e in os.scandir(chunks):
            parts = e.name.split(".")
            entries.append((e.stat().st_mtime, int(parts[1])))
        entries.sort()
        start = (store / "zarr.json").stat().st_mtime  # template written: the run phase begins
        # a fifth ends at the first chunk entry that reaches k/5 of the pages; its rate is the pages really
        # finished between its ends (a fifth taken as exactly n/5 pages was off by up to a chunk, 6%)
        bounds, done, k = [(start, 0)], 0, 1
        for mtime, pages in entries:
            done += pages
            while k <= 5 and done >= k * n / 5:
                bounds.append((mtime, done))
                k += 1
        rates, client_peak, worker_peak = [], [], []
        for i in range(5):
            (a, pages_a), (b, pages_b) = bounds[i], bounds[i + 1]
            rates.append((pages_b - pages_a) / max(b - a, 1e-9))
            window = [s for s in samples if a <= s[0] <= b] or [min(samples, key=lambda s: abs(s[0] - b))]
            client_peak.append(max(s[1] for s in window))
            worker_peak.append(max(s[2] for s in window))
            note(f"fifth {i + 1}: {pages_b - pages_a} pages in {b - a:.1f} s, {rates[-1]:.0f} pages/s; peak RSS "
                 f"client {client_peak[-1]:.0f} MiB, largest worker {worker_peak[-1]:.0f} MiB")
        med = sorted(rates)[2]
        spread_rate = max(abs(r - med) / med for r in rates)
        figure(f"{n} pages: whole command (s)", wall, unit="s", json_path=args.json, fmt="{:.1f}")
        figure(f"{n} pages: pages/s over the run phase", n / (bounds[-1][0] - bounds[0][0]), unit="pages/s",
               json_path=args.json, fmt="{:.0f}")
        figure("pages/s per fifth: largest deviation from their median", spread_rate, goal=f"<= {GOAL_RATE:.2f}",
               ok=spread_rate <= GOAL_RATE, json_path=args.json, fmt="{:.3f}")
        for who, peaks in (("client", client_peak), ("workers", worker_peak)):
            growth = peaks[4] / peaks[1] - 1
            figure(f"peak RSS of the {who}: last fifth / second fifth - 1", growth, goal=f"<= {GOAL_MEMORY:.2f}",
                   ok=growth <= GOAL_MEMORY, json_path=args.json, fmt="{:+.3f}")
        note(f"{len(samples)} memory samples; load average {load0} -> {load_average()}")
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
