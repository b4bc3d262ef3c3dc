"""Benchmark: what the live pagecube page costs a build.

ratio = pages/s of a build with /pagecube open in headless Chromium (polling every 2 s, thumbnails
        drawn) / pages/s of the same build with no page open

on one LocalCluster (W workers x 1 thread, dashboard on 127.0.0.1) kept open for every build, so
both sides pay the same start-up.  Builds alternate (off, on, on, off, ...) over several rounds in
this one run and the medians are compared, because shared machines are noisy.  Goal: >= 0.98
(within 2%).  The browser runs on the same machine, so its own CPU (layout, canvas) is counted.
"""
from __future__ import annotations

import shutil
import statistics
import sys
import time

from common import Workdir, figure, header, load_average, note, parser, quiet_logs

GOAL = 0.98
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


class OpenPage:
    """The build's page open in headless Chromium (Playwright, the system's chromium) while inside."""

    def __init__(self, url: str):
        self.url = url

    def __enter__(self):
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self._browser = self._pw.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
        self.page = self._browser.new_page(viewport={"width": 1280, "height": 900})
        self.requests: list[str] = []
        self.page.on("requestfinished", lambda r: self.requests.append(r.url))
        self.page.goto(self.url)
        return self

    def cpu(self) -> float:
        """CPU seconds so far of the browser and its driver (this process's chromium and node children)."""
        import psutil

        total = 0.0
        for child in psutil.Process().children(recursive=True):
            try:
                if any(k in child.name() for k in ("chrom", "node", "playwright")):
                    t = child.cpu_times()
                    total += t.user + t.system
            except psutil.Error:
                continue
        return total

    def polls(self) -> tuple[int, int]:
        """Status polls and thumbnails the page has fetched so far."""
        self.page.evaluate("0")  # sync Playwright delivers the page's events only while it is called
        return (sum("/api/status" in u for u in self.requests), sum("/thumb?" in u for u in self.requests))

    def __exit__(self, *exc):
        self._browser.close()
        self._pw.stop()


def _own_cpu() -> float:
    import os

    t = os.times()
    return t.user + t.system


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="pairs of builds (default 3, 2 with --quick)")
    args = p.parse_args(argv)
    quiet_logs()
    header("page cost: pages/s with and without /pagecube open in a browser")
    if shutil.which("chromium") is None:
        note("skipped: no chromium on PATH")
        return 0
    from cluster import open_cluster
    from cluster.http import page_link
    from pipeline import build

    n_pages = 1500 if args.quick else 3000
    rounds = args.rounds or (2 if args.quick else 3)
    workers = 2
    with Workdir(args.workdir) as wd:
        listing = wd.repeated(wd.sample(200, image_size=(800, 1200), seed=4), n_pages)
        with open_cluster("local", workers=workers, threads_per_worker=1, device="cpu",
                          dashboard_address="127.0.0.1:0") as handle:
            address = handle.client.scheduler.address
            url = page_link(handle.dashboard_link, "/pagecube")

            rates: dict[str, list[float]] = {"off": [], "on": []}
            own_cpu: dict[str, list[float]] = {"off": [], "on": [], "warm": []}
            browser_share: list[float] = []

            def one(mode: str, pages=listing, n=n_pages) -> float:
                out = wd.fresh(f"page-cost-{mode}.zarr")
                t, c = time.perf_counter(), _own_cpu()
                res = build(str(pages), str(out), cluster=address, device="cpu", progress=False, chunk_pages=64,
                            model="tiny", overwrite=True)
                assert res.done == n, res
                wall, own = time.perf_counter() - t, _own_cpu() - c
                note(f"{mode:>4}: {res.pages_per_s:6.1f} pages/s ({wall:.1f} s; client+scheduler CPU "
                     f"{1000 * own / n:.2f} ms/page; load {load_average()})")
                own_cpu[mode].append(own / n)
                return res.pages_per_s

            one("warm", wd.repeated(listing, 128), 128)  # imports, model load, first forward: paid before anything is timed

            for r in range(rounds):
                for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    if mode == "off":
                        rates["off"].append(one("off"))
                        continue
                    with OpenPage(url) as page:
                        time.sleep(2)  # the page is loaded and polling before the build starts
                        c0, t0, p0 = page.cpu(), time.perf_counter(), page.polls()
                        rates["on"].append(one("on"))
                        used, wall, p1 = page.cpu() - c0, time.perf_counter() - t0, page.polls()
                        browser_share.append(used / wall)
                        note(f"      during the build the page polled {p1[0] - p0[0]} times and drew {p1[1] - p0[1]} "
                             f"thumbnails; the browser used {used:.1f} CPU s in {wall:.0f} s "
                             f"({100 * used / wall:.1f}% of one core)")
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    figure(f"build pages/s, no page open (median of {rounds})", off, unit="pages/s", json_path=args.json)
    figure(f"build pages/s, /pagecube open in Chromium (median of {rounds})", on, unit="pages/s", json_path=args.json)
    figure("client+scheduler CPU per page, no page open", 1000 * statistics.median(own_cpu["off"]), unit="ms",
           json_path=args.json)
    figure("client+scheduler CPU per page, page open", 1000 * statistics.median(own_cpu["on"]), unit="ms",
           json_path=args.json)
    figure("browser CPU while open (share of one core)", 100 * statistics.median(browser_share), unit="%",
           json_path=args.json)
    ratio = on / off
    figure("page open / no page (throughput ratio)", ratio, goal=f">= {GOAL}", ok=ratio >= GOAL, json_path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
