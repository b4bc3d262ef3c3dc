"""Helpers for the fault, bad-input, lock, diagnose and growth tests.

``quick_model`` is a user model reached by ``faultkit:quick_model`` (the real
``module:factory`` plug-in route): deterministic numpy features, no torch, so
builds are fast and two builds of the same pages give identical bytes.  It is
steered by environment variables (inherited by Dask worker processes):

- ``FAULTKIT_DELAY``: seconds to sleep in each ``forward`` (keeps a build busy
  long enough to kill something in the middle of it);
- ``FAULTKIT_KILL_TEXT``: a page whose panel text contains this string makes
  the process that prepares it die at once (``os._exit``), like a native crash;
- ``FAULTKIT_GATE``: ``forward`` waits until this file exists (a build that is
  held in the middle of its work for as long as a test needs);
- ``FAULTKIT_PIDDIR``: each process that loads the model writes a file named by
  its pid there (how a test finds worker processes to kill).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.model.protocol import ModelInfo

ROOT = Path(__file__).resolve().parent.parent
DIM = 16
PAGECUBE = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"]


def _vec(seed: bytes, dim: int) -> np.ndarray:
    h = hashlib.sha256(seed).digest() * ((dim * 4) // 32 + 1)
    return (np.frombuffer(h[: dim * 4], dtype=np.uint32).astype(np.float64) / 2**32 - 0.5).astype(np.float32)


class QuickModel:
    def __init__(self, max_panels: int, dim: int):
        self.info = ModelInfo(name="faultkit-quick", embedding_dim=dim, max_panels=max_panels,
                              weights_digest="none", weights_source="faultkit")
        self.device = "cpu"
        self.delay = float(os.environ.get("FAULTKIT_DELAY", "0") or 0)
        self.kill = os.environ.get("FAULTKIT_KILL_TEXT") or None
        rng = np.random.default_rng(0)
        self.proj = rng.standard_normal((48, dim)).astype(np.float32) / 7.0

    def prepare(self, page):
        if self.kill and any(self.kill in t for t in page.texts):
            os._exit(17)  # the whole worker process dies, as in a native-library crash
        small = np.asarray(page.image.resize((4, 4)), dtype=np.float32).reshape(-1) / 255.0
        page_vec = small @ self.proj
        n = min(page.n_kept, self.info.max_panels)
        panels = np.stack([_vec(f"{t}|{tuple(b)}".encode(), self.info.embedding_dim)
                           for t, b in zip(page.texts[:n], page.boxes[:n].tolist())]) if n else \
            np.zeros((0, self.info.embedding_dim), np.float32)
        order = np.lexsort((page.boxes[:n, 0], page.boxes[:n, 1])) if n else np.zeros(0, np.int64)
        return page_vec.astype(np.float32), panels, order

    def collate(self, prepared):
        return prepared

    def forward(self, batch):
        gate = os.environ.get("FAULTKIT_GATE")
        while gate and not os.path.exists(gate):
            time.sleep(0.02)
        if self.delay:
            time.sleep(self.delay)
        B, P, D = len(batch), self.info.max_panels, self.info.embedding_dim
        out = {
            "page_embeddings": np.zeros((B, D), np.float32),
            "panel_embeddings": np.zeros((B, P, D), np.float32),
            "attention_weights": np.zeros((B, P), np.float32),
            "reading_order": np.full((B, P), -1, np.int16),
        }
        for i, (page_vec, panels, order) in enumerate(batch):
            n = panels.shape[0]
            out["page_embeddings"][i] = page_vec + (panels.mean(0) if n else 0)
            out["panel_embeddings"][i, :n] = panels
            if n:
                out["attention_weights"][i, :n] = 1.0 / n
                pos = np.empty(n, np.int16)
                pos[order] = np.arange(n)
                out["reading_order"][i, :n] = pos
        return out


def quick_model(*, max_panels=12, embedding_dim=None, checkpoint=None, device="cpu", seed=0, **options):
    piddir = os.environ.get("FAULTKIT_PIDDIR")
    if piddir:
        Path(piddir).mkdir(parents=True, exist_ok=True)
        (Path(piddir) / str(os.getpid())).write_text("")
    return QuickModel(int(max_panels), int(embedding_dim or DIM))


MODEL = "faultkit:quick_model"


def make_pages(out_dir, n: int, seed: int = 0) -> Path:
    """n small synthetic pages (200x300 px: quick to draw and decode); returns pages.txt."""
    from pipeline.sample import make_sample

    return make_sample(out_dir, n, seed, image_size=(200, 300))


def env(extra: dict | None = None) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), e.get("PYTHONPATH", "")])
    e.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    e.update(extra or {})
    return e


def cli(*args, extra_env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``pagecube ARGS`` in a subprocess."""
    return subprocess.run([*PAGECUBE, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env(extra_env), cwd=ROOT)


def popen_build(pages, out, *args, extra_env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([*PAGECUBE, "build", str(pages), "--out", str(out),
                             "--no-progress", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(extra_env), cwd=ROOT, **kw)


def read(store, *names):
    """Arrays straight from zarr (fresh handle each call)."""
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = zarr.open_group(str(store), mode="r", use_consolidated=False)
        out = [g[n][:] for n in names]
    return out[0] if len(out) == 1 else out


def index_entries(store) -> list[str]:
    d = Path(store) / "_pagecube" / "chunks"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, step: float = 0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (exit {proc.returncode}) before {what}\n{out}\n{err}")
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def communicate_or_stacks(proc: subprocess.Popen, timeout: float, piddir: Path | None = None) -> tuple[str, str]:
    """``proc.communicate(timeout)``; a command still running then fails the test with every thread's
    stack of it and of its live workers (``kill -USR1``, see ``cluster.interrupts``), not a bare timeout."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import signal

        pids = [proc.pid] + ([int(p.name) for p in piddir.iterdir()] if piddir and piddir.exists() else [])
        for pid in pids:
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        time.sleep(2)
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the command did not end within {timeout:g} s; its threads' stacks "
                             f"(client and live workers):\n{err[-20000:]}") from None


def run(*args) -> tuple[int, str, str]:
    """``pagecube ARGS`` in this process (fast: no interpreter start); returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()
