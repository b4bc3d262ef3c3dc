"""How a model's reading order and attention compare with what the manifests know.

Why: a default model has to be measured, not assumed (an untrained one orders
panels at random).  Pages carry ``true_order`` (the manifests' ``order_index``
of the kept panels); this runs a model on pages in batches, as a build does,
and counts pages whose whole predicted order is right.  Used by the model
quality benchmark and by the test that guards the default model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..pages import Page


@dataclass(frozen=True)
class Quality:
    pages: int  # pages with two or more panels (a single panel has only one order)
    order_exact: int  # of those, pages whose predicted reading order is exactly right
    panels: int  # panels on those pages
    panels_placed: int  # panels given their true position
    attention_entropy: float  # mean entropy / log(n): 1.0 is uniform attention
    attention_peak: float  # mean of (largest weight x n): 1.0 is uniform, n is all on one panel

    @property
    def order_accuracy(self) -> float:
        return self.order_exact / self.pages if self.pages else float("nan")

    def line(self) -> str:
        return (f"reading order exact on {self.order_exact}/{self.pages} pages ({self.order_accuracy:.0%}), "
                f"{self.panels_placed}/{self.panels} panels placed; attention entropy "
                f"{self.attention_entropy:.2f} of uniform, peak {self.attention_peak:.2f}x uniform")


def true_positions(order: np.ndarray) -> np.ndarray:
    """Each panel's position in reading order (0..n-1) from ``order_index`` values (gaps allowed)."""
    return np.argsort(np.argsort(np.asarray(order), kind="stable"), kind="stable")


def measure(model, pages: list[Page], batch_size: int = 16) -> Quality:
    """Run ``model`` on ``pages`` (prepare, collate, forward) and compare with their ``true_order``."""
    exact = n_pages = panels = placed = 0
    entropy: list[float] = []
    peak: list[float] = []
    for b in range(0, len(pages), batch_size):
        batch = pages[b:b + batch_size]
        out = model.forward(model.collate([model.prepare(p) for p in batch]))
        for i, page in enumerate(batch):
            n = page.n_kept
            if n < 2 or page.true_order is None:
                continue
            got = np.asarray(out["reading_order"][i, :n])
            want = true_positions(page.true_order)
            n_pages += 1
            exact += bool((got == want).all())
            panels += n
            placed += int((got == want).sum())
            a = np.clip(np.asarray(out["attention_weights"][i, :n], dtype=np.float64), 1e-12, None)
            a = a / a.sum()
            entropy.append(float(-(a * np.log(a)).sum() / math.log(n)))
            peak.append(float(a.max() * n))
    return Quality(n_pages, exact, panels, placed, float(np.mean(entropy)) if entropy else float("nan"),
                   float(np.mean(peak)) if peak else float("nan"))


def sample_pages(folder, n: int, seed: int = 0, max_panels: int = 12, *, scan: bool = False,
                 panel_side: int | None = None) -> list[Page]:
    """``n`` synthetic pages (:mod:`pipeline.sample`) made in ``folder`` and read as a build reads them.

    ``scan``: at scan size (:data:`pipeline.sample.SCAN_SIZE`); ``panel_side``: the model's, so pages are
    decoded as that model's build decodes them."""
    from ..inputs import PageSource
    from ..manifest import read_page
    from ..sample import SCAN_SIZE, make_sample

    extra = {"image_size": SCAN_SIZE, "scan": True} if scan else {}
    listing = make_sample(folder, n, seed=seed, **extra)
    return [read_page(ref, max_panels=max_panels, panel_side=panel_side)
            for ref in PageSource(str(listing)).slice(0, n).refs()]
