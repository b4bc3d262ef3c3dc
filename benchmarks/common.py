"""Shared helpers for the benchmarks: sample pages, plain-process limits, counters, reporting.

Benchmarks are scripts, not tests: each prints its figures next to their goals.
Ratios are measured side by side in one run because shared machines are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

RESULTS: list[dict] = []


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smaller run (about a minute)")
    p.add_argument("--workdir", default=None, help="folder for samples and stores (default: a temporary one)")
    p.add_argument("--json", default=None, help="append the figures as JSON lines to this file")
    return p


class Workdir:
    """A scratch folder; samples made in it are reused by later benchmarks of the same run."""

    def __init__(self, path: str | None):
        self.owned = path is None
        self.path = Path(path or tempfile.mkdtemp(prefix="pagecube-bench-"))
        self.path.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "Workdir":
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)

    def fresh(self, name: str) -> Path:
        p = self.path / name
        if p.exists():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return p

    def sample(self, pages: int = 200, image_size: tuple[int, int] = (800, 1200), seed: int = 0) -> Path:
        """A synthetic sample (made once per workdir); returns its pages.txt."""
        from pipeline.sample import make_sample

        folder = self.path / f"sample-{pages}-{image_size[0]}x{image_size[1]}-{seed}"
        listing = folder / "pages.txt"
        if not listing.exists():
            t = time.perf_counter()
            make_sample(folder, pages, seed, image_size=image_size)
            note(f"made a {pages}-page sample ({image_size[0]}x{image_size[1]}) in {time.perf_counter() - t:.1f} s")
        return listing

    def scanned(self, listing: Path, width: int = 1988) -> Path:
        """The pages of ``listing`` at scan size: upscaled to ``width`` px wide on tinted paper, JPEG
        quality 90, boxes and ``page_size`` scaled in the manifests (made once per workdir).

        One picture at two sizes, so outputs at both can be compared page by page."""
        import json

        from PIL import Image

        from pipeline.sample import scan_look

        src = listing.parent
        folder = self.path / f"{src.name}-scan{width}"
        out = folder / "pages.txt"
        if out.exists():
            return out
        t = time.perf_counter()
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "manifests").mkdir(parents=True, exist_ok=True)
        lines = [ln for ln in listing.read_text().splitlines() if ln.strip()]
        for line in lines:
            m = json.loads((src / line).read_text())
            image = Image.open((src / line).parent / m["page_image_path"])
            k = width / image.width
            size = (width, round(image.height * k))
            scan_look(image.convert("RGB").resize(size, Image.LANCZOS)).save(
                folder / "images" / Path(m["page_image_path"]).name, "JPEG", quality=90)
            m["page_size"] = {"width": size[0], "height": size[1]}
            for panel in m["panels"]:
                panel["panel_coords"] = [v * k for v in panel["panel_coords"]]
            (folder / line).write_text(json.dumps(m))
        out.write_text("".join(ln + "\n" for ln in lines))
        note(f"made {len(lines)} scan-size pages ({width} px wide) in {time.perf_counter() - t:.1f} s")
        return out

    def repeated(self, listing: Path, total: int) -> Path:
        """A list file of ``total`` lines cycling through ``listing`` (same pages reused)."""
        lines = [ln for ln in listing.read_text().splitlines() if ln.strip()]
        base = listing.parent
        out = self.path / f"{listing.parent.name}-x{total}.txt"
        if not out.exists():
            with open(out, "w") as f:
                for i in range(total):
                    f.write(str(base / lines[i % len(lines)]) + "\n")
        return out


def note(msg: str) -> None:
    print(f"  . {msg}", flush=True)


def header(title: str) -> None:
    print(f"\n== {title}", flush=True)


def figure(name: str, value: float, goal: str | None = None, unit: str = "", ok: bool | None = None,
           json_path: str | None = None, fmt: str = "{:.3g}") -> dict:
    """Print one figure with its goal and whether it is met."""
    verdict = "" if ok is None else ("  MET" if ok else "  NOT MET")
    goal_txt = f"   (goal {goal})" if goal else ""
    print(f"  {name:<58} {fmt.format(value)}{(' ' + unit) if unit else ''}{goal_txt}{verdict}", flush=True)
    row = {"name": name, "value": value, "unit": unit, "goal": goal, "ok": ok}
    RESULTS.append(row)
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def rss_mb(pid: int | None = None) -> float:
    """Current resident set size (MiB) of a process, from /proc."""
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak RSS (MiB) of this process image (VmHWM: unlike ru_maxrss it does not carry the
    parent's peak over fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def proc_write_bytes(pid: int | None = None) -> int:
    """Bytes this process caused to be sent to the storage layer (/proc/PID/io write_bytes)."""
    try:
        with open(f"/proc/{pid or 'self'}/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def store_bytes(path: Path) -> tuple[int, int]:
    """(sum of file sizes, sum of allocated blocks) under ``path``."""
    size = blocks = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            size += st.st_size
            blocks += st.st_blocks * 512
    return size, blocks


# --- counting the bytes given to the Zarr store ------------------------------------------------

_COUNT = {"bytes": 0, "sets": 0}


def install_store_counter() -> None:
    """Count every byte handed to zarr's LocalStore (``set``), in this process."""
    from zarr.storage import LocalStore

    if getattr(LocalStore, "_pagecube_counted", False):
        return
    original = LocalStore.set

    async def counted_set(self, key, value, *args, **kwargs):
        _COUNT["bytes"] += len(value.to_bytes()) if hasattr(value, "to_bytes") else len(value)
        _COUNT["sets"] += 1
        return await original(self, key, value, *args, **kwargs)

    LocalStore.set = counted_set
    LocalStore._pagecube_counted = True


def store_counter(reset: bool = False) -> dict:
    out = {"bytes": _COUNT["bytes"], "sets": _COUNT["sets"], "pid": os.getpid(),
           "write_bytes": proc_write_bytes()}
    if reset:
        _COUNT["bytes"] = _COUNT["sets"] = 0
    return out


# --- CPU time by thread: where a worker's time goes beside the plain processes' ---------------------

#: A thread's role, from its name: the read pools (named alike on both sides), the thread that runs the
#: model (the plain process's main thread, a Dask worker's task thread), and a worker's own threads.
THREAD_ROLES = (("pagecube-read", "read + prepare"), ("Dask-Default-Threads", "model (task thread)"),
                ("zarr_io", "zarr I/O"))


def thread_cpu(main_role: str = "event loop") -> dict[str, float]:
    """CPU seconds so far of this process's threads, summed by role (Linux ``/proc``; {} elsewhere).
    ``main_role``: what the main thread does here (a Dask worker's runs its event loop).

    From each thread's ``schedstat`` (nanoseconds on a CPU), not ``stat``'s clock ticks: a thread that
    wakes for a millisecond at a time on a busy machine is rarely running when the tick lands, and
    ticks showed a client's event loop at 3 ms/s where ``thread_time`` inside it read 18."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    main = threading.main_thread().native_id
    out: dict[str, float] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except OSError:
            continue  # the thread ended meanwhile
        name = names.get(int(tid), "")
        role = main_role if int(tid) == main else next(
            (r for key, r in THREAD_ROLES if key in name), "other threads")
        out[role] = out.get(role, 0.0) + ns / 1e9
    return out


def cpu_delta(after: dict, before: dict) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


def add_up(parts) -> dict[str, float]:
    total: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + v
    return total


# --- the plain-process limit: same preprocessing + forward, no Dask, no writes -------------------

def _plain_worker(args):
    (listing, start, stop, model, batch_size, max_panels, io_threads, barrier, queue) = args
    import torch

    torch.set_num_threads(1)
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.inputs import PageSource
    from pipeline.manifest import PageError, read_page
    from pipeline.model.registry import load_model

    m = load_model(model, max_panels=max_panels, device="cpu")
    refs = PageSource(str(listing)).slice(start, stop).refs()

    def load(ref):
        try:
            return m.prepare(read_page(ref, max_panels=max_panels, panel_side=m.panel_side))
        except PageError:
            return None

    barrier.wait()
    t0 = time.perf_counter()
    c0 = time.process_time()
    threads0 = thread_cpu("model (task thread)")
    done = 0
    pending = []
    pool = ThreadPoolExecutor(io_threads, thread_name_prefix="pagecube-read") if io_threads else None
    pages = pool.map(load, refs) if pool else map(load, refs)
    for prepared in pages:
        if prepared is None:
            continue
        pending.append(prepared)
        if len(pending) >= batch_size:
            m.forward(m.collate(pending))
            done += len(pending)
            pending = []
    if pending:
        m.forward(m.collate(pending))
        done += len(pending)
    queue.put((done, time.perf_counter() - t0, time.process_time() - c0,
               cpu_delta(thread_cpu("model (task thread)"), threads0)))


def plain_limit(listing: Path, n_pages: int, workers: int, model: str = "tiny", batch_size: int = 16,
                max_panels: int = 12, io_threads: int | None = None) -> dict:
    """pages/s of ``workers`` independent spawned processes, each reading+preparing+forwarding its share.

    Each process has torch at 1 thread and (like a pagecube worker) prepares pages
    in a pool of ``io_threads`` threads ahead of the model (0: one page after the other; None: as many as
    a pagecube worker of a local CPU cluster of ``workers`` gets, ``cluster.placement.read_threads``).
    The clock starts at a common barrier after every model is loaded.
    """
    import multiprocessing as mp

    if io_threads is None:
        from dask.system import CPU_COUNT

        from cluster.placement import read_threads

        io_threads = read_threads(CPU_COUNT // workers, gpu=False)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    bounds = [(n_pages * i // workers, n_pages * (i + 1) // workers) for i in range(workers)]
    procs = [ctx.Process(target=_plain_worker, args=((listing, a, b, model, batch_size, max_panels, io_threads,
                                                      barrier, queue),)) for a, b in bounds]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    pages = sum(r[0] for r in results)
    return {"pages_per_s": pages / max(r[1] for r in results), "cpu_per_page": sum(r[2] for r in results) / pages,
            "threads": add_up(r[3] for r in results)}


def _cpu_seconds() -> float:
    return time.process_time()  # every thread, to the nanosecond (os.times() counts clock ticks)


def _worker_cpu(dask_worker=None) -> float:
    return _cpu_seconds()


class LocalDask:
    """A LocalCluster made the way ``pagecube build --cluster local`` makes it (W workers x 1 thread),
    kept open so the benchmark can read the workers' CPU time and counters around a build."""

    def __init__(self, workers: int):
        self.workers = workers

    def __enter__(self) -> "LocalDask":
        from cluster import open_cluster

        self._cm = open_cluster("local", workers=self.workers, threads_per_worker=1, device="cpu",
                                dashboard_address=None)
        self.handle = self._cm.__enter__()
        self.client = self.handle.client
        self.address = self.client.scheduler.address
        return self

    def __exit__(self, *exc) -> None:
        self._cm.__exit__(*exc)

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of (the workers, this process: client and scheduler live here)."""
        return sum(self.client.run(_worker_cpu).values()), _cpu_seconds()

    def warm(self, listing, out, kwargs) -> None:
        """A small untimed build first: imports and first-call costs (client, scheduler, workers,
        torch's first forward) are paid once per process, not per page of a real corpus."""
        from pipeline import build

        kwargs = {"model": "tiny", **kwargs}  # benchmarks measure tiny unless told (the build's default varies)
        key = kwargs["model"]
        if key in getattr(self, "_warmed", set()):
            return
        head = Path(str(out) + ".warm.txt")
        with open(listing) as src, open(head, "w") as dst:
            per = 4 if key == "tiny" else 1  # a large model's page takes seconds: one page a worker
            for _, line in zip(range(2 * per * self.workers), src):
                dst.write(line)
        warm = {k: v for k, v in kwargs.items() if k not in ("chunk_pages", "overwrite")}
        build(str(head), str(out) + ".warm", cluster=self.address, device="cpu", progress=False, overwrite=True,
              chunk_pages=per, **warm)
        shutil.rmtree(str(out) + ".warm", ignore_errors=True)
        head.unlink()
        self._warmed = getattr(self, "_warmed", set()) | {key}

    def build(self, listing, out, n_pages: int, **kwargs) -> dict:
        """Run ``pipeline.build`` on this cluster; pages/s (run phase) and CPU seconds per page."""
        from cluster import install_resident
        from pipeline import build
        from pipeline.build import MODEL_FACTORY

        kwargs = {"model": "tiny", **kwargs}
        # load the model on the workers first (the same plugin build() installs, so it is not
        # reloaded there): its load time is not part of the build's per-page cost
        install_resident(self.client, MODEL_FACTORY, {
            "name": kwargs["model"], "max_panels": kwargs.get("max_panels", 12), "embedding_dim": None,
            "checkpoint": None, "seed": 0, "device": "cpu"})
        self.warm(listing, out, kwargs)
        c0, t0 = self.cpu(), self.client.run(thread_cpu)
        res = build(str(listing), str(out), cluster=self.address, device="cpu", progress=False, **kwargs)
        c1, t1 = self.cpu(), self.client.run(thread_cpu)
        if res.done != res.planned_pages:
            raise RuntimeError(f"build left {res.planned_pages - res.done} pages not done: {res.reasons[:2]}")
        n = max(1, res.planned_pages)
        return {"pages_per_s": res.pages_per_s, "cpu_per_page": (c1[0] - c0[0] + c1[1] - c0[1]) / n,
                "worker_cpu_per_page": (c1[0] - c0[0]) / n, "client_cpu_per_page": (c1[1] - c0[1]) / n,
                "seconds": res.seconds, "threads": add_up(cpu_delta(t1[w], t0.get(w, {})) for w in t1)}


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def model_available(name: str) -> str | None:
    """None if the built-in model's factory imports here, else why not (one line)."""
    try:
        from pipeline.model.registry import resolve_factory

        resolve_factory(name)
        return None
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def quiet_logs() -> None:
    import logging
    import warnings

    logging.getLogger("distributed").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def synthetic_store(path: Path, n_pages: int, chunk_pages: int = 256, done_fraction: float = 0.9,
                    failed_every: int = 1000) -> dict:
    """A store of ``n_pages`` with the template only, and finished-chunk index entries written
    directly for ``done_fraction`` of the chunks (every ``failed_every``-th one with a failed page).
    Returns timings."""
    from pipeline.store.index import INDEX_DIR, ChunkEntry
    from pipeline.store.location import StoreLocation
    from pipeline.store.template import StoreConfig, write_template

    loc = StoreLocation.of(str(path))
    cfg = StoreConfig(n_pages, chunk_pages, 12, 128, "float32", "tiny", "seed:0", f"synthetic:{n_pages}")
    t = time.perf_counter()
    write_template(loc, cfg, {"title": "synthetic"})
    t_template = time.perf_counter() - t
    n_chunks = -(-n_pages // chunk_pages)
    n_done = int(n_chunks * done_fraction)
    folder = Path(loc.meta_path(INDEX_DIR))
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for c in range(n_done):
        length = min(chunk_pages, n_pages - c * chunk_pages)
        failed = 1 if failed_every and c % failed_every == 0 else 0
        open(folder / ChunkEntry(c, length - failed, failed).name, "wb").close()
    return {"template_s": t_template, "index_s": time.perf_counter() - t, "n_chunks": n_chunks, "n_done": n_done}


def chunk_files(path: Path) -> int:
    """Files in a Zarr store that are not metadata (zarr.json) nor pagecube bookkeeping."""
    n = 0
    for dirpath, _, files in os.walk(path):
        if "_pagecube" in Path(dirpath).relative_to(path).parts:
            continue
        n += sum(1 for f in files if f not in ("zarr.json", ".zgroup", ".zattrs", ".zarray", ".zmetadata"))
    return n


# --- whole commands, timed from outside like a person at a terminal ------------------------------

def cli_command(args: list, tree: str | None = None) -> tuple[list[str], dict, str]:
    """argv, environment and working folder that run ``pagecube ARGS`` from ``tree`` (default: this
    checkout; another checkout gives a side-by-side "before")."""
    root = str(Path(tree).resolve()) if tree else str(ROOT)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return [sys.executable, "-m", "pipeline.cli", *map(str, args)], env, root


def timed_command(argv: list, env: dict | None = None, cwd: str | None = None, check: bool = True,
                  watch=None) -> dict:
    """Wall seconds of one command, its output, its own and its children's CPU seconds, and
    ``watch(elapsed)`` called about every 20 ms while it runs (e.g. to spot the first chunk)."""
    import resource
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err)
        while proc.poll() is None:
            if watch is not None:
                watch(time.perf_counter() - t0)
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv[:6]))} ... exited {proc.returncode}: "
                           f"{(stderr.strip().splitlines() or ['?'])[-1]}")
    return {"wall": wall, "cpu": cpu, "stdout": stdout, "stderr": stderr, "rc": proc.returncode}


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """'median (min-max)' of a few repeats."""
    v = sorted(values)
    med = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return f"{fmt.format(med)} ({fmt.format(v[0])}-{fmt.format(v[-1])})"


def median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
