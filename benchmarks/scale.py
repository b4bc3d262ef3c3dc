"""Benchmark 4: scale without pages.

- template for 10^7 pages: < 1 s, and no chunk files (metadata only);
- resume planning for a 10^7-page store with 90% of its chunks done (index
  entries written directly): read the store's config, list the finished-chunk
  index, plan the rest: < 5 s;
- client RSS while planning 10^6 pages (a list file of 10^6 manifest paths that
  need not exist: read the list, digest it, plan, make every task's slice):
  peak < 500 MB, in a fresh process;
- worker RSS after 1,000 and after 20,000 pages within 10%: the task function
  (``pipeline.tasks.run_chunk``, what a worker runs) called in one process over
  a list file that repeats a 50-page sample of small (100x150) images, tiny
  model with 2 panels a page so the 20,000 pages take a couple of minutes;
  RSS is read after the tasks that cross 1,000 and 20,000 pages.
"""
from __future__ import annotations

import subprocess
import sys
import time

from common import (HERE, Workdir, chunk_files, figure, header, note, parser, quiet_logs, rss_mb,
                    synthetic_store)

N_BIG = 10_000_000


def plan_resume(store) -> tuple[float, int]:
    from pipeline.plan import plan_build
    from pipeline.store import index as chunk_index
    from pipeline.store.location import StoreLocation
    from pipeline.store.template import read_config

    t = time.perf_counter()
    loc = StoreLocation.of(str(store))
    config, _ = read_config(loc)
    entries = chunk_index.list_entries(loc)
    plan = plan_build(config.n_pages, config.chunk_pages, set(entries))
    return time.perf_counter() - t, len(plan.tasks)


def _client_rss_child(listing: str, n: int) -> None:
    from common import peak_rss_mb, rss_mb

    import pipeline.build  # noqa: F401 - everything the client imports
    from pipeline.inputs import PageSource
    from pipeline.plan import default_chunk_pages, plan_build

    base = rss_mb()
    t = time.perf_counter()
    source = PageSource(listing)
    assert len(source) == n
    source.digest()
    plan = plan_build(n, default_chunk_pages(n), set())
    slices = 0
    for task in plan.tasks:  # what the window does over the whole build, one task at a time
        source.slice(task.start, task.stop)
        slices += 1
    print(f"{peak_rss_mb():.1f} {base:.1f} {time.perf_counter() - t:.2f} {slices}")


def _worker_rss_child(workdir: str, total: int, marks: str) -> None:
    import torch

    torch.set_num_threads(1)
    from common import Workdir, rss_mb

    from pipeline import build
    from pipeline.build import MODEL_FACTORY
    from pipeline.inputs import PageSource
    from pipeline.plan import plan_build
    from pipeline.tasks import run_chunk
    from pipeline.types import JobSpec

    wd = Workdir(workdir)
    listing = wd.repeated(wd.sample(50, image_size=(100, 150)), total)
    out = wd.fresh("worker-rss.zarr")
    chunk = 250
    build(str(listing), str(out), cluster="sync", init_only=True, chunk_pages=chunk, max_panels=2, progress=False)
    source = PageSource(str(listing))
    plan = plan_build(total, chunk, set())
    job = JobSpec(store_url=str(out), storage_options={}, run_id="bench", n_pages=total, chunk_pages=chunk,
                  max_panels=2, embedding_dim=128, embedding_dtype="float32", model_resident="bench-rss",
                  model_factory=MODEL_FACTORY,
                  model_kwargs={"name": "tiny", "max_panels": 2, "device": "cpu", "seed": 0},
                  batch_size=16)
    wanted = [int(m) for m in marks.split(",")]
    t = time.perf_counter()
    for task in plan.tasks:
        r = run_chunk(task, source.slice(task.start, task.stop), job)
        assert r.done == len(task), r
        while wanted and task.stop >= wanted[0]:
            print(f"{wanted.pop(0)} {rss_mb():.1f} {time.perf_counter() - t:.1f}", flush=True)


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--worker-pages", type=int, default=None)
    args = p.parse_args(argv)
    quiet_logs()
    js = args.json
    header("4. scale without pages")
    with Workdir(args.workdir) as wd:
        big = wd.fresh("synthetic-1e7.zarr")
        made = synthetic_store(big, N_BIG, done_fraction=0.9)
        files = chunk_files(big)
        figure("template for 10^7 pages", made["template_s"], goal="< 1", unit="s", ok=made["template_s"] < 1,
               json_path=js, fmt="{:.3f}")
        figure("chunk files written by the template", files, goal="0", ok=files == 0, json_path=js, fmt="{:.0f}")
        note(f"{made['n_done']} of {made['n_chunks']} index entries written directly in {made['index_s']:.1f} s")
        seconds, n_tasks = plan_resume(big)
        figure("resume planning, 10^7 pages, 90% of chunks done", seconds, goal="< 5", unit="s", ok=seconds < 5,
               json_path=js, fmt="{:.2f}")
        note(f"plan: {n_tasks} tasks left (expected {made['n_chunks'] - made['n_done']})")

        n = 1_000_000
        listing = wd.path / "million.txt"
        if not listing.exists():
            with open(listing, "w") as f:
                for i in range(n):
                    f.write(f"manifests/series_{i // 10000:03d}/page_{i:07d}.json\n")
        cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); import scale; "
               f"scale._client_rss_child({str(listing)!r}, {n})"]
        peak, base, secs, slices = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
        figure("client peak RSS while planning 10^6 pages", float(peak), goal="< 500", unit="MB",
               ok=float(peak) < 500, json_path=js, fmt="{:.0f}")
        note(f"RSS after imports {float(base):.0f} MB; read+digest+plan+{slices} slices in {float(secs):.1f} s")

        total = args.worker_pages or (5000 if args.quick else 20000)
        marks = f"1000,{total}"
        cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); import scale; "
               f"scale._worker_rss_child({str(wd.path)!r}, {total}, {marks!r})"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        rows = [ln.split() for ln in proc.stdout.splitlines() if ln and ln[0].isdigit()]
        if proc.returncode or len(rows) < 2:
            note(f"worker RSS run failed: {proc.stderr.strip().splitlines()[-1:]}")
            return
        (_, r1, _), (_, r2, secs) = rows[0], rows[1]
        r1, r2 = float(r1), float(r2)
        growth = (r2 - r1) / r1
        figure("worker RSS after 1,000 pages", r1, unit="MB", json_path=js, fmt="{:.0f}")
        figure(f"worker RSS after {total:,} pages", r2, unit="MB", json_path=js, fmt="{:.0f}")
        figure(f"worker RSS growth 1,000 -> {total:,} pages", 100 * growth, goal="within 10%", unit="%",
               ok=abs(growth) <= 0.10, json_path=js, fmt="{:+.1f}")
        note(f"{total} pages through run_chunk in one process in {float(secs):.0f} s")


if __name__ == "__main__":
    main()
