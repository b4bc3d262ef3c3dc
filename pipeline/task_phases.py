"""Where a task's time goes: seconds per phase for its receipt, and Dask's fine performance metrics.

The phases are "read", "inference", "write" and "verify".  Dask's meters nest
(an inner meter's time is subtracted from the outer one's), so "read" is
metered around the whole read-and-infer loop and still counts only the reads.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext


def meter(name: str):
    """Dask's fine performance metric ``name`` for the enclosed block (nothing off a worker)."""
    try:
        from distributed.metrics import context_meter

        return context_meter.meter(name)
    except Exception:  # pragma: no cover - distributed missing
        return nullcontext()


@contextmanager
def phase(seconds: dict, name: str):
    """Time a phase for the receipt (added to ``seconds[name]``) and for Dask's metrics."""
    t0 = time.perf_counter()
    try:
        with meter(name):
            yield
    finally:  # a phase that raised took its time too (a batch the model failed on, then rerun page by page)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
