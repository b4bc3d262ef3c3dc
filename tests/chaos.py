"""A randomized fault campaign on the test hosts (issue 24, part 2).

A seeded generator of *schedules*: each is one ``pagecube build`` from the
``client`` test host that meets 1-4 faults, each at a moment chosen by the
fraction of pages done.  The faults:

- ``worker_kill``: a worker host's Dask worker process SIGKILLed (its nanny
  starts a new one), or the whole host's processes killed and the worker
  service started again a moment later;
- ``worker_stop``: a worker host's processes paused (SIGSTOP) for 5-60 s;
- ``link_cut``: a worker host's link down for 5-60 s;
- ``client_kill``: the client host's processes killed, the same command rerun
  from the other client host with ``--take-over-lock``;
- ``sched_kill``: the scheduler host killed; once the build has stopped, a new
  ``dask scheduler`` and new workers are started and the command is rerun;
- ``s3_stall``: the S3 host paused (SIGSTOP) for 5-40 s;
- ``disk_full``: the store (then on a small tmpfs every host sees) filled to
  the last byte for 5-40 s, then the tmpfs is enlarged;
- ``images_away``: the image folder renamed away for 5-40 s.

A build that stops (a fault of the world, a lost scheduler) is rerun with the
same command once its fault is over, as an operator would.  After each
schedule the invariants are checked:

1. every command ended within ``bound_s`` (no hang);
2. the final store equals a ``--cluster sync`` build of the same pages
   (values within 1e-5; status, ids, text and reading order equal);
3. no page done before a fault was rewritten (``written_at`` unchanged);
4. no page was marked failed (the pages hold no page fault: any failure came
   from a fault of the world);
5. the finished-chunk index agrees with ``status`` and ``pagecube diagnose``
   finds nothing;
6. no two runs held the lease at once (``PAGECUBE_LEASE_LOG``: the lock appends
   every take, renewal, loss and release with monotonic times around the write;
   a run's successful write that began after another run's take had ended is a
   second holder).

Reproducible: ``python -m tests.chaos --seed S --schedule K`` reruns schedule K
alone (schedule K of seed S is the same whatever else runs);
``python -m tests.chaos --seed S --schedules 50`` runs a campaign and prints a
table.  ``--ci`` shortens every fault to a few seconds and the page set to 160.
Needs root (namespaces); the campaign re-executes itself in a private mount
namespace so that its tmpfs never shows on this machine.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from testhosts import PAGECUBE, Cluster, page_log, set_model_control  # noqa: E402

FAULTS = ("worker_kill", "worker_stop", "link_cut", "client_kill", "sched_kill", "s3_stall", "disk_full",
          "images_away")
#: Seconds a fault lasts, by kind (the issue's ranges); --ci keeps each to CI_SECONDS.
SECONDS = {"worker_stop": (5, 60), "link_cut": (5, 60), "s3_stall": (5, 40), "disk_full": (5, 40),
           "images_away": (5, 40)}
CI_SECONDS = (4, 8)
#: No command may run longer than this (invariant 1).  A build of the campaign's pages takes under
#: a minute alone; a command meets at most 4 faults of at most 60 s, and Dask notices a lost worker
#: within 2 x worker-ttl (10 s) and the tcp timeout (12 s).
BOUND_S = 420.0
CI_BOUND_S = 240.0
RESTART_ENV = "PAGECUBE_CHAOS_IN_MOUNT_NS"
CHUNK = 8
BATCH = 8
LEASE_S = "20"
#: Exits after which the same command is not run again: done, a bad argument, failed pages (a rerun
#: without --retry-failed keeps them failed; the failure itself is what invariant 4 reports).
FINAL_EXITS = (0, 2, 3)


@dataclass
class Fault:
    kind: str
    at: float  # fraction of pages done when it strikes
    seconds: float = 0.0  # how long it lasts (kinds with a duration)
    host: str = ""  # w1 / w2 for worker faults
    whole: bool = False  # worker_kill: every process of the host, not only the worker

    def describe(self) -> str:
        what = self.kind + (f"({self.host}{',host' if self.whole else ''})" if self.host else "")
        return f"{what}@{self.at:.2f}" + (f"/{self.seconds:.0f}s" if self.seconds else "")


@dataclass
class Schedule:
    seed: int
    index: int
    faults: list[Fault]

    @property
    def disk(self) -> bool:
        """Whether the store lives on the campaign's small tmpfs (else on the S3 host)."""
        return any(f.kind == "disk_full" for f in self.faults)

    def describe(self) -> str:
        return " ".join(f.describe() for f in self.faults)


def make_schedule(seed: int, index: int, ci: bool = False) -> Schedule:
    """Schedule ``index`` of campaign ``seed``: drawn from its own generator, so it never depends on others."""
    rng = random.Random(f"pagecube-chaos:{seed}:{index}")
    n = rng.randint(1, 4)
    ats = sorted(round(rng.uniform(0.05, 0.85), 2) for _ in range(n))
    faults = []
    for at in ats:
        kind = rng.choice(FAULTS)
        lo, hi = (CI_SECONDS if ci else SECONDS[kind]) if kind in SECONDS else (0, 0)
        seconds = float(rng.randint(lo, hi)) if hi else 0.0
        host = rng.choice(("w1", "w2")) if kind in ("worker_kill", "worker_stop", "link_cut") else ""
        whole = kind == "worker_kill" and rng.random() < 0.5
        faults.append(Fault(kind, at, seconds, host, whole))
    return Schedule(seed, index, faults)


@dataclass
class Command:
    host: str
    args: list[str]
    started: float
    ended: float | None = None
    rc: int | None = None
    last_line: str = ""
    killed_by: str = ""


@dataclass
class Result:
    schedule: Schedule
    violations: list[str] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations


class Campaign:
    """The test hosts, one page set with its sync reference, and a small tmpfs for disk faults."""

    def __init__(self, c: Cluster, n_pages: int, ci: bool, log=print):
        self.c, self.n_pages, self.ci, self.log = c, n_pages, ci, log
        self.bound = CI_BOUND_S if ci else BOUND_S
        self.work = c.workdir / "chaos"
        self.pages_local = self.work / "pages"
        self.image_root = self.pages_local / "root"  # manifests say ../images/NAME.jpg
        self.images = self.pages_local / "images"
        self.disk = self.work / "disk"
        self.reference = self.work / "reference.zarr"
        self.pages_url = "s3://pages/chaos/pages.txt"
        self._ref_cache: dict | None = None

    # --- set-up ----------------------------------------------------------------------------------
    def setup(self) -> None:
        from pipeline.sample import make_sample

        self.work.mkdir(parents=True, exist_ok=True)
        make_sample(self.pages_local, self.n_pages, seed=24, image_size=(200, 300))
        self.image_root.mkdir(exist_ok=True)
        fs = self.c.fs()
        fs.put(str(self.pages_local / "manifests") + "/", "pages/chaos/manifests/", recursive=True)
        fs.put(str(self.pages_local / "pages.txt"), "pages/chaos/pages.txt")
        self.c.client.run([*PAGECUBE, "build", self.pages_url, "--out", self.reference, "--image-root",
                           self.image_root, "--cluster", "sync", "--chunk-pages", CHUNK, "--batch-size", BATCH,
                           "--model", "tiny", "--no-progress", "--storage-options", self.c.storage_options_json],
                          check=0, timeout=600)
        self.store_bytes = sum(p.stat().st_size for p in self.reference.rglob("*") if p.is_file())
        self.log(f"chaos: {self.n_pages} pages, reference store {self.store_bytes / 1e6:.1f} MB")

    def reset_disk(self) -> None:
        """The store's tmpfs emptied and sized for the store and a little more.  It was mounted before
        the hosts were made (``mount_disk``): their mount namespaces hold copies of it, and a later
        mount would not reach them, but a remount's new size does (one filesystem)."""
        for p in self.disk.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.disk_mb = max(4, int(self.store_bytes * 3 / 1e6) + 2)
        subprocess.run(["mount", "-o", f"remount,size={self.disk_mb}m", str(self.disk)], check=True)

    def grow_disk(self) -> None:
        self.disk_mb += max(4, int(self.store_bytes * 3 / 1e6) + 2)
        subprocess.run(["mount", "-o", f"remount,size={self.disk_mb}m", str(self.disk)], check=True)

    def reference_arrays(self) -> dict:
        if self._ref_cache is None:
            from pipeline.store.schema import MODEL_VARS

            names = ("status", "page_id", "text_content", "reading_order", *MODEL_VARS)
            self._ref_cache = dict(zip(names, read_store(self.c, str(self.reference), *names)))
        return self._ref_cache

    # --- one schedule ----------------------------------------------------------------------------
    def store_for(self, s: Schedule) -> str:
        name = f"chaos-{s.seed}-{s.index}.zarr"
        return str(self.disk / name) if s.disk else f"s3://cubes/{name}"

    def build_args(self, out: str, take_over: bool = False) -> list[str]:
        return [*map(str, [*PAGECUBE, "build", self.pages_url, "--out", out, "--image-root", self.image_root,
                           "--cluster", self.c.scheduler, "--chunk-pages", CHUNK, "--batch-size", BATCH,
                           "--model", "testhosts:logged_tiny", "--no-progress",
                           "--storage-options", self.c.storage_options_json])] + \
            (["--take-over-lock"] if take_over else [])

    def run(self, s: Schedule) -> Result:
        return Run(self, s).go()


class Run:
    """One schedule driven from start to checks."""

    def __init__(self, camp: Campaign, s: Schedule):
        self.camp, self.c, self.s = camp, camp.c, s
        self.res = Result(s)
        self.out = camp.store_for(s)
        self.lease_log = camp.work / f"lease-{s.seed}-{s.index}.log"
        self.client = "client"
        self.proc: subprocess.Popen | None = None
        self.cmd: Command | None = None
        self.snapshots: list[tuple[str, dict]] = []
        self.stderr_path = camp.work / f"build-{s.seed}-{s.index}.err"

    # --- commands ------------------------------------------------------------------------------
    def start(self, take_over: bool = False) -> None:
        args = self.camp.build_args(self.out, take_over)
        h = self.c[self.client]
        with open(self.stderr_path, "a") as err:
            err.write(f"\n=== {self.client}: {' '.join(args[3:])}\n")
        err = open(self.stderr_path, "a")
        self.proc = h.popen(args, env={"PAGECUBE_LOCK_LEASE_S": LEASE_S, "PAGECUBE_LEASE_LOG": str(self.lease_log)},
                            stdout=subprocess.DEVNULL, stderr=err)
        err.close()
        self.cmd = Command(self.client, args, time.monotonic())
        self.res.commands.append(self.cmd)

    def _finish_cmd(self, killed_by: str = "") -> None:
        if self.cmd is None or self.cmd.ended is not None:
            return
        self.cmd.ended = time.monotonic()
        self.cmd.rc = self.proc.returncode if self.proc is not None else None
        self.cmd.killed_by = killed_by
        try:
            tail = [ln for ln in self.stderr_path.read_text(errors="replace").splitlines() if ln.strip()]
            self.cmd.last_line = tail[-1][:300] if tail else ""
        except OSError:
            pass
        took = self.cmd.ended - self.cmd.started
        if took > self.camp.bound and not killed_by:
            self.violate(1, f"a command ran {took:.0f} s, over the bound of {self.camp.bound:.0f} s")

    def running(self) -> bool:
        if self.proc is None:
            return False
        if self.proc.poll() is None:
            if time.monotonic() - self.cmd.started > self.camp.bound:
                self.violate(1, f"the build on {self.client} still ran after {self.camp.bound:.0f} s (a hang); "
                                f"killed. Its last line: {self._last_line()}")
                self.dump_stacks()
                self.c[self.client].kill()
                self.proc.wait(30)
                self._finish_cmd(killed_by="the bound")
                return False
            return True
        self._finish_cmd()
        return False

    def _last_line(self) -> str:
        try:
            lines = [ln for ln in self.stderr_path.read_text(errors="replace").splitlines() if ln.strip()]
            return lines[-1][:300] if lines else ""
        except OSError:
            return ""

    def dump_stacks(self) -> None:
        """Every Python stack of the hung client (py-spy, where installed): why it hangs."""
        spy = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
        if spy is None:
            return
        path = self.camp.work / f"hang-{self.s.seed}-{self.s.index}.txt"
        with open(path, "a") as fh:
            for pid in self.c[self.client].pids():
                fh.write(f"=== pid {pid}\n")
                fh.flush()
                subprocess.run([spy, "dump", "--pid", str(pid)], stdout=fh, stderr=subprocess.STDOUT, timeout=60)
        self.note(f"stacks of the hung client in {path}")

    def wait_end(self, timeout: float | None = None) -> None:
        """Until the command ends (or its bound passes)."""
        deadline = time.monotonic() + (timeout if timeout is not None else 10 * self.camp.bound)
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.5)

    def violate(self, n: int, what: str) -> None:
        self.res.violations.append(f"[{n}] {what}")

    def note(self, what: str) -> None:
        self.res.notes.append(what)

    # --- progress ------------------------------------------------------------------------------
    def fraction(self) -> float:
        return len({pid for _, _, _, pid in page_log(self.c)}) / self.camp.n_pages

    def snapshot(self, label: str) -> None:
        """``written_at`` of the done pages now (invariant 3)."""
        try:
            status, written = read_store(self.c, self.out, "status", "written_at")
        except Exception as exc:  # noqa: BLE001 - not made yet, or S3 busy: nothing to protect then
            self.note(f"no snapshot before {label}: {type(exc).__name__}")
            return
        done = status == 1
        self.snapshots.append((label, {"done": done, "written": written}))

    # --- the faults ------------------------------------------------------------------------------
    def strike(self, f: Fault) -> None:
        c = self.c
        if f.kind == "worker_kill":
            h = c[f.host]
            if f.whole:
                h.kill()
                time.sleep(2)
                h.start_service()
            else:
                kill_children(h.service.pid if h.service is not None else None)
        elif f.kind == "worker_stop":
            with paused(c[f.host].pids()):
                self.sleep(f.seconds)
        elif f.kind == "link_cut":
            c[f.host].cut()
            try:
                self.sleep(f.seconds)
            finally:
                c[f.host].restore()
        elif f.kind == "client_kill":
            c[self.client].kill()
            self.proc.wait(30)
            self._finish_cmd(killed_by="the fault")
            self.client = "client2" if self.client == "client" else "client"
            self.start(take_over=True)
        elif f.kind == "sched_kill":
            c.sched.kill()
            self.wait_end()  # the build must stop by itself, within the bound
            c.heal()  # a new scheduler, new workers
            if self.proc is not None and self.proc.returncode not in (None, *FINAL_EXITS):
                self.start()
        elif f.kind == "s3_stall":
            with paused(c.storage.pids()):
                self.sleep(f.seconds)
        elif f.kind == "disk_full":
            filler = fill(self.camp.disk)
            self.note(f"disk filled with {filler / 1e6:.1f} MB")
            self.sleep(f.seconds)
            self.camp.grow_disk()
        elif f.kind == "images_away":
            away = self.camp.images.with_name("images.away")
            self.camp.images.rename(away)
            try:
                self.sleep(f.seconds)
            finally:
                away.rename(self.camp.images)
        self.revive()

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.running()
            time.sleep(0.2)

    def revive(self) -> None:
        """As a service manager would: a worker service that exited is started again."""
        for w in ("w1", "w2"):
            h = self.c[w]
            if h.service is None or h.service.poll() is not None:
                h.kill()
                h.start_service()
                self.note(f"{w}'s worker service had exited: started again")

    # --- the whole schedule -----------------------------------------------------------------
    def go(self) -> Result:
        t0 = time.monotonic()
        self.prepare()
        self.start()
        reruns = 0
        for i, f in enumerate(self.s.faults):
            while self.running() and self.fraction() < f.at:
                time.sleep(0.3)
            if not self.running():
                if self.proc.returncode in FINAL_EXITS:
                    self.note(f"the build ended (exit {self.proc.returncode}) before {f.describe()}" +
                              (" and the faults after it" if i < len(self.s.faults) - 1 else ""))
                    break
                reruns += 1
                self.note(f"the build stopped ({self.cmd.rc}: {self.cmd.last_line}); rerun")
                self.start()
            self.snapshot(f.describe())
            self.strike(f)
            if not self.running() and self.proc.returncode not in FINAL_EXITS:
                self.note(f"after {f.describe()} the build had stopped (exit {self.cmd.rc}: {self.cmd.last_line})")
                self.start()
        while True:
            self.wait_end()
            if self.proc.returncode in FINAL_EXITS or reruns >= 3:
                break
            reruns += 1
            self.note(f"the build stopped after the faults (exit {self.cmd.rc}: {self.cmd.last_line}); rerun")
            time.sleep(2)
            self.start()
        if self.proc.returncode != 0:
            self.violate(2, f"the build never finished: the last command exited {self.proc.returncode}: "
                            f"{self.cmd.last_line}")
        self.check()
        self.res.seconds = time.monotonic() - t0
        return self.res

    def prepare(self) -> None:
        c = self.c
        c.heal()
        from testhosts import clear_page_log

        clear_page_log(c)
        # ~1.5 s a chunk of 8 pages on each of the 2 workers: a build of a few hundred pages takes a minute
        set_model_control(c, delay=0.6 if self.camp.ci else 1.2)
        self.lease_log.unlink(missing_ok=True)
        self.stderr_path.unlink(missing_ok=True)
        if self.s.disk:
            self.camp.reset_disk()
        else:
            fs = c.fs()
            root = self.out.removeprefix("s3://")
            if fs.exists(root):
                fs.rm(root, recursive=True)

    # --- invariants ----------------------------------------------------------------------------
    def check(self) -> None:
        from pipeline.store.schema import MODEL_VARS, STATUS_DONE, STATUS_FAILED

        try:
            names = ("status", "written_at", "page_id", "text_content", "error", *MODEL_VARS)
            got = dict(zip(names, read_store(self.c, self.out, *names)))
        except Exception as exc:  # noqa: BLE001
            self.violate(2, f"the store cannot be read: {type(exc).__name__}: {exc}")
            return
        ref = self.camp.reference_arrays()
        failed = np.flatnonzero(got["status"] == STATUS_FAILED)
        if failed.size:
            reasons = sorted({str(r) for r in got["error"][failed]})
            self.violate(4, f"{failed.size} pages failed, pages {failed[:5].tolist()}..., reasons: {reasons[:3]}")
        pending = int((got["status"] == 0).sum())
        if pending and self.proc.returncode == 0:
            self.violate(2, f"{pending} pages still pending after a build that exited 0")
        for name in ("status", "page_id", "text_content", "reading_order"):
            same = got["status"] == STATUS_DONE
            if not np.array_equal(got[name][same], ref[name][same]):
                self.violate(2, f"{name} differs from the sync build on done pages")
        for name in MODEL_VARS:
            same = got["status"] == STATUS_DONE
            a, b = got[name][same].astype(np.float64), ref[name][same].astype(np.float64)
            if a.shape != b.shape or not np.allclose(a, b, atol=1e-5, rtol=0, equal_nan=True):
                self.violate(2, f"{name} differs from the sync build by more than 1e-5")
        for label, snap in self.snapshots:
            was = snap["done"]
            changed = np.flatnonzero(was & (got["written_at"] != snap["written"]))
            if changed.size:
                self.violate(3, f"{changed.size} pages done before {label} were rewritten "
                                f"(pages {changed[:5].tolist()})")
        self.check_index(got["status"])
        self.check_diagnose()
        self.check_lease()

    def check_index(self, status) -> None:
        from pipeline.store.index import list_entries

        entries = list_entries(self.location())
        for chunk, e in entries.items():
            part = status[chunk * CHUNK:(chunk + 1) * CHUNK]
            if (e.done, e.failed) != (int((part == 1).sum()), int((part == 2).sum())):
                self.violate(5, f"index entry of chunk {chunk} says {e.done} done {e.failed} failed; status disagrees")
        n_chunks = -(-self.camp.n_pages // CHUNK)
        if self.proc.returncode == 0 and sorted(entries) != list(range(n_chunks)):
            self.violate(5, f"the index names {len(entries)} of {n_chunks} chunks after a finished build")

    def location(self):
        from pipeline.store.location import StoreLocation
        from testhosts import ACCESS_KEY, SECRET_KEY

        opts = {} if self.s.disk else {"key": ACCESS_KEY, "secret": SECRET_KEY, **self.c.storage_options}
        return StoreLocation.of(self.out, opts)

    def check_diagnose(self) -> None:
        p = self.c.client.run([*PAGECUBE, "diagnose", self.out, "--storage-options", self.c.storage_options_json],
                              timeout=300)
        if p.returncode != 0:
            lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
            self.violate(5, f"pagecube diagnose exited {p.returncode}: {' | '.join(lines[-4:])}")

    def check_lease(self) -> None:
        events = read_lease_log(self.lease_log)
        for what in lease_overlaps(events):
            self.violate(6, what)


def read_lease_log(path: Path) -> list[dict]:
    try:
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return []


def lease_overlaps(events: list[dict]) -> list[str]:
    """Two holders at once: a run's successful take/renew/release that began after another run's
    take had ended (the other run then held the lease: the first could not have, with compare-and-swap)."""
    out = []
    takes = [e for e in events if e["event"] == "take"]
    for e in events:
        if e["event"] not in ("take", "renew", "release"):
            continue
        later = [t for t in takes if t["run"] != e["run"] and t["t1"] < e["t0"]
                 and t["t1"] > max((x["t0"] for x in takes if x["run"] == e["run"]), default=-1)]
        if later:
            t = later[0]
            out.append(f"run {e['run']} ({e['host']}) {e['event']} the lease at {e['t0']:.2f} after run "
                       f"{t['run']} ({t['host']}) had taken it at {t['t1']:.2f}")
    return out


def read_store(c: Cluster, out: str, *names):
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if out.startswith("s3://"):
            from zarr.storage import FsspecStore

            import s3fs

            fs = s3fs.S3FileSystem(key="testing", secret="testing", use_listings_cache=False, asynchronous=True,
                                   client_kwargs={"endpoint_url": c.endpoint}, config_kwargs={"proxies": {}})
            store = FsspecStore(fs, path=out.removeprefix("s3://"), read_only=True)
            g = zarr.open_group(store, mode="r", use_consolidated=False)
        else:
            g = zarr.open_group(out, mode="r", use_consolidated=False)
        return [g[n][:] for n in names]


def kill_children(pid: int | None) -> None:
    """SIGKILL every descendant of ``pid`` (a nanny's worker process): the nanny starts a new one."""
    if pid is None:
        return
    kids = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for ch in map(int, children):
            kids.append(ch)
            todo.append(ch)
    for k in kids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(k, signal.SIGKILL)


@contextlib.contextmanager
def paused(pids: list[int]):
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
    try:
        yield
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)


def fill(folder: Path) -> int:
    """Write a file into ``folder`` until its filesystem is full; returns the bytes written."""
    path = folder / ".filler"
    written = 0
    with open(path, "ab", buffering=0) as fh:
        for block in (1 << 20, 1 << 12):
            data = b"\0" * block
            while True:
                try:
                    fh.write(data)
                    written += block
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return written


# --- the command line ------------------------------------------------------------------------------
def table(results: list[Result]) -> str:
    rows = ["| schedule | faults | commands | result | violations |", "|---|---|---|---|---|"]
    for r in results:
        cmds = ", ".join(str(c.rc) for c in r.commands)
        rows.append(f"| {r.schedule.index} | {r.schedule.describe()} | {cmds} | "
                    f"{'ok' if r.ok else 'VIOLATION'} ({r.seconds:.0f} s) | {'; '.join(r.violations) or '-'} |")
    ok = sum(r.ok for r in results)
    rows.append(f"\n{ok} of {len(results)} schedules with 0 violations")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=24)
    ap.add_argument("--schedule", type=int, action="append", help="run only this schedule (repeatable)")
    ap.add_argument("--schedules", type=int, default=50, help="run schedules 0..N-1")
    ap.add_argument("--pages", type=int, default=None, help="pages in the page set (240; 160 with --ci)")
    ap.add_argument("--ci", action="store_true", help="faults of a few seconds, 160 pages")
    ap.add_argument("--list", action="store_true", help="print the schedules and exit")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args(argv)
    indices = a.schedule if a.schedule else list(range(a.schedules))
    schedules = [make_schedule(a.seed, k, a.ci) for k in indices]
    if a.list:
        for s in schedules:
            print(f"seed {s.seed} schedule {s.index}: {s.describe()}")
        return 0
    if os.environ.get(RESTART_ENV) != "1":  # a private mount namespace: the tmpfs stays ours
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            print("chaos: needs root and unshare (test hosts)", file=sys.stderr)
            return 2
        env = {**os.environ, RESTART_ENV: "1"}
        cmd = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "tests.chaos",
               *(argv if argv is not None else sys.argv[1:])]
        return subprocess.call(cmd, env=env, cwd=TESTS.parent)
    n_pages = a.pages or (160 if a.ci else 240)
    results: list[Result] = []
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="pagecube-chaos-"))
    disk = workdir / "chaos" / "disk"
    disk.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=1777", "chaos-disk", str(disk)], check=True)
    try:
        return _campaign(a, schedules, n_pages, workdir, results)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _campaign(a, schedules, n_pages, workdir, results) -> int:
    with Cluster.up(workdir) as c:
        camp = Campaign(c, n_pages, a.ci, log=lambda m: print(m, flush=True))
        camp.setup()
        for s in schedules:
            print(f"chaos: seed {s.seed} schedule {s.index}: {s.describe()}", flush=True)
            try:
                r = camp.run(s)
            except Exception as exc:  # noqa: BLE001 - the harness itself: reported as a violation to look at
                import traceback

                r = Result(s, violations=[f"[harness] {type(exc).__name__}: {exc}"],
                           notes=[traceback.format_exc()])
            results.append(r)
            status = "ok" if r.ok else "VIOLATION"
            print(f"chaos: seed {s.seed} schedule {s.index}: {status} in {r.seconds:.0f} s; commands exited "
                  f"{[cm.rc for cm in r.commands]}", flush=True)
            for v in r.violations:
                print(f"chaos:   violation (seed {s.seed} schedule {s.index}: {s.describe()}): {v}", flush=True)
            for n in r.notes:
                print(f"chaos:   note: {n}", flush=True)
            if a.json:
                a.json.write_text(json.dumps([{"schedule": asdict(x.schedule), "violations": x.violations,
                                               "notes": x.notes, "seconds": x.seconds,
                                               "commands": [asdict(cm) for cm in x.commands]}
                                              for x in results], indent=1))
    print(table(results), flush=True)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
