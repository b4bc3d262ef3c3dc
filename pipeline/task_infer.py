"""The inference step of a task: prepared pages through the resident model, a batch at a time.

The model runs one batch at a time per worker (a lock), so tasks that overlap
never oversubscribe it; a CUDA out-of-memory halves the batch for the rest of
the worker's life.  A page the model fails on, or whose outputs the store
cannot hold (NaN, inf, values its dtype cannot hold, wrong shapes), fails with
its reason; the other pages of its batch go on.
"""
from __future__ import annotations

import threading
import traceback

import numpy as np

from .store.schema import MODEL_VARS
from .task_phases import phase
from .task_write import Region

_model_lock = threading.Lock()  # one batch at a time through the resident model
_batch_cap: int | None = None  # pages per forward after a CUDA out-of-memory back-off


class Batches:
    """Pages gathered into batches of ``batch_size``, each run as it fills, its outputs into ``region``."""

    def __init__(self, model, region: Region, batch_size: int, seconds: dict):
        self.model, self.region, self.batch_size, self.seconds = model, region, batch_size, seconds
        self.pending: list[tuple[int, object, object]] = []  # (row, page, prepared)

    def add(self, item: tuple[int, object, object]) -> None:
        self.pending.append(item)
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Run what is gathered (the last, partial batch once every page is read)."""
        if self.pending:
            items, self.pending = self.pending, []
            self.run(items)

    def run(self, items: list[tuple[int, object, object]]) -> None:
        try:
            with phase(self.seconds, "inference"):
                outs = _forward(self.model, [prepared for _, _, prepared in items])
        except Exception:
            self._isolate(items)  # outside the phase: the reruns count their own time, once
            return
        self._store(items, outs)

    def _isolate(self, items: list[tuple[int, object, object]]) -> None:
        """The batch raised: a lone page fails with the model's error; a larger batch runs again page by
        page, so that only the page that breaks it fails."""
        if len(items) == 1:
            i, page, _ = items[0]
            self.region.identify(i, page)
            self.region.fail(i, "model failed on this page: " + traceback.format_exc(limit=1).strip().splitlines()[-1])
            return
        for item in items:
            self.run([item])

    def _store(self, items: list[tuple[int, object, object]], outs: dict) -> None:
        stored, problems = _stored_outputs(outs, self.region.arrays, len(items))
        for j, (i, page, _) in enumerate(items):
            if j in problems:
                self.region.identify(i, page)
                self.region.fail(i, problems[j])
            else:
                self.region.fill_page(i, page)
        good = [j for j in range(len(items)) if j not in problems]
        if not good:
            return
        rows = [items[j][0] for j in good]
        if len(good) == len(items) and rows[-1] - rows[0] == len(rows) - 1:
            rows, good = slice(rows[0], rows[-1] + 1), slice(None)  # the usual batch: consecutive pages, all good
        self.region.set_done(rows, {name: stored[name][good] for name in MODEL_VARS})


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except Exception:  # pragma: no cover - torch missing or without cuda module
        pass
    return "out of memory" in str(exc).lower() and "cuda" in str(exc).lower()


def _free_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass


def _forward(model, prepared: list) -> dict[str, np.ndarray]:
    """Collate + forward ``prepared`` pages; on CUDA out-of-memory halve the batch and carry on.

    The halved size is kept for the rest of the worker's life (a batch that ran
    out of memory once will again).  A single page that still runs out of
    memory raises, and the caller marks it failed.
    """
    global _batch_cap
    parts: list[dict[str, np.ndarray]] = []
    i = 0
    while i < len(prepared):
        n = min(_batch_cap or len(prepared), len(prepared) - i)
        try:
            batch = model.collate(prepared[i:i + n])  # outside the lock: overlaps another task's forward
            with _model_lock:
                parts.append(model.forward(batch))
        except Exception as exc:
            if n > 1 and _is_oom(exc):
                _batch_cap = max(1, n // 2)
                _free_cuda_cache()
                continue
            raise
        i += n
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}


def _stored_outputs(outs: dict, region: dict, n: int) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """The model's outputs cast to the store's dtypes, and why pages of the batch cannot be stored, by
    position (a page is never done with NaN, inf, values its dtype cannot hold, or wrong shapes).

    One cast and one finiteness pass per variable, on whole batch arrays: the cast is what the region
    stores anyway, and a float that overflows its store dtype becomes inf in it; a row's own values
    say which of the two it was, for the few rows that fail.
    """
    stored: dict[str, np.ndarray] = {}
    bad: dict[int, str] = {}
    for name in MODEL_VARS:
        if name not in outs:
            return {}, {j: f"model returned no {name!r}" for j in range(n)}
        value = np.asarray(outs[name])
        target = region[name]
        if value.shape[1:] != target.shape[1:] or value.shape[:1] != (n,):
            shape = value.shape[1:] if value.shape[:1] == (n,) else value.shape
            return {}, {j: f"model returned {name} of shape {shape}, expected {target.shape[1:]}" for j in range(n)}
        flat = value.reshape(n, -1)
        with np.errstate(over="ignore", invalid="ignore"):  # what overflows or is not finite is reported below
            out = flat.astype(target.dtype, copy=False)
        if target.dtype.kind == "f":
            for j in np.flatnonzero(~np.isfinite(out).all(axis=1)):
                finite = value.dtype.kind != "f" or bool(np.isfinite(flat[j]).all())
                bad.setdefault(int(j), f"{name} overflows the store's {target.dtype} (use --embedding-dtype float32)"
                               if finite else f"model returned non-finite {name}")
        elif value.dtype.kind == "f":
            for j in np.flatnonzero(~np.isfinite(flat).all(axis=1)):
                bad.setdefault(int(j), f"model returned non-finite {name}")
        stored[name] = out.reshape(value.shape)
    return stored, bad
