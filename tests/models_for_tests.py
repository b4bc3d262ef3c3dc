"""User models reached by ``module:factory`` path in tests (the real plug-in route).

``counting_tiny`` appends the loading process id to ``$PAGECUBE_TEST_LOADLOG``
so a test can count loads per worker process; ``slow_tiny`` sleeps in each
forward so that a build lasts long enough to be watched or killed;
``graded_attention`` gives attention weights spread far apart (for ``show``'s colours);
``breaking_tiny`` sleeps like ``slow_tiny`` and then raises on any batch that holds a page whose id
ends in 7.
"""
from __future__ import annotations

import os
import time

from pipeline.model.tiny import build_tiny


def counting_tiny(**kwargs):
    log = os.environ.get("PAGECUBE_TEST_LOADLOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
    return build_tiny(**kwargs)


class _Slow:
    def __init__(self, inner, delay):
        self.inner, self.delay = inner, delay
        self.info, self.device = inner.info, inner.device
        self.panel_side = inner.panel_side  # decoded as the inner model wants, so outputs equal its own builds

    def prepare(self, page):
        return self.inner.prepare(page)

    def collate(self, prepared):
        return self.inner.collate(prepared)

    def forward(self, batch):
        time.sleep(self.delay)
        return self.inner.forward(batch)


def slow_tiny(**kwargs):
    delay = float(os.environ.get("PAGECUBE_TEST_DELAY", "0.2"))
    inner = counting_tiny(**kwargs)
    return _Slow(inner, delay)


class _Faulty(_Slow):
    """Gives NaN embeddings for pages whose id ends in 3 and huge ones for ids ending in 5."""

    def prepare(self, page):
        return page.page_id, self.inner.prepare(page)

    def collate(self, prepared):
        return [pid for pid, _ in prepared], self.inner.collate([p for _, p in prepared])

    def forward(self, batch):
        ids, inner = batch
        out = self.inner.forward(inner)
        for j, pid in enumerate(ids):
            if pid.endswith("3"):
                out["page_embeddings"][j] = float("nan")
            elif pid.endswith("5"):
                out["panel_embeddings"][j] *= 1e6
        return out


def faulty_tiny(**kwargs):
    return _Faulty(build_tiny(**kwargs), 0.0)


class _Breaking(_Faulty):
    """``slow_tiny`` whose forward raises, after its sleep, for a batch holding a page whose id ends in 7."""

    def forward(self, batch):
        ids, inner = batch
        time.sleep(self.delay)
        if any(pid.endswith("7") for pid in ids):
            raise ValueError("this model cannot take page " + next(p for p in ids if p.endswith("7")))
        return self.inner.forward(inner)


def breaking_tiny(**kwargs):
    return _Breaking(build_tiny(**kwargs), float(os.environ.get("PAGECUBE_TEST_DELAY", "0.2")))


class _Graded(_Slow):
    """Attention far from uniform: over a page's valid panels, weights 1, 1/2, 1/4, ... (normalised),
    handed out in a fixed shuffled order, so the panels span the whole colour scale of ``show``."""

    def forward(self, batch):
        import numpy as np

        out = self.inner.forward(batch)
        att = out["attention_weights"]
        for j in range(att.shape[0]):
            valid = np.flatnonzero(att[j] > 0)
            ranks = np.random.default_rng(len(valid)).permutation(len(valid))
            w = 0.5 ** ranks.astype(np.float64)
            att[j] = 0
            att[j, valid] = w / w.sum()
        return out


def graded_attention(**kwargs):
    return _Graded(build_tiny(**kwargs), 0.0)
