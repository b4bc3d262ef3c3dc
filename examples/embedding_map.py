"""A 2-D map (PCA) of the finished page embeddings, coloured by series, as a PNG.

    python examples/embedding_map.py STORE -o map.png [--storage-options JSON]

Works mid-run: only pages with ``status == 1`` are used (``pipeline.open_pages``),
every other page of a store being built still reads as fill values (NaN).
Needs matplotlib (``pip install pagecube[plot]``).
"""
from __future__ import annotations

import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import pipeline  # noqa: E402


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows of ``x`` on their first two principal components; returns (points, explained ratio)."""
    x = x.astype(np.float64)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, vt.shape[0])
    pts = x @ vt[:k].T
    if k < 2:
        pts = np.column_stack([pts, np.zeros(len(pts))])
    var = s**2
    ratio = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    return pts, np.pad(ratio, (0, 2 - len(ratio)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="the store: a path or an fsspec URL")
    ap.add_argument("-o", "--out", default="map.png", help="PNG to write (default map.png)")
    ap.add_argument("--storage-options", default=None, help="fsspec options as JSON, for s3:// stores")
    args = ap.parse_args(argv)
    so = json.loads(args.storage_options) if args.storage_options else None

    ds = pipeline.open_pages(args.store, storage_options=so)  # finished pages only
    n_total = pipeline.open_store(args.store, storage_options=so).sizes["page"]
    emb = ds["page_embeddings"].values
    series = np.asarray(ds["series"].values, dtype=object)
    ok = np.isfinite(emb).all(axis=1)
    emb, series, ids = emb[ok], series[ok], np.asarray(ds["page_id"].values, dtype=object)[ok]

    fig, ax = plt.subplots(figsize=(8, 6), dpi=100)
    if len(emb) < 2:
        ax.text(0.5, 0.5, f"{len(emb)} of {n_total} pages finished:\nnot enough for a map yet",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        pts, ratio = pca_2d(emb)
        names = sorted({str(s) or "(no series)" for s in series})
        cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
        for k, name in enumerate(names):
            sel = np.array([(str(s) or "(no series)") == name for s in series])
            ax.scatter(pts[sel, 0], pts[sel, 1], s=18, color=cmap(k % cmap.N), label=f"{name} ({sel.sum()})",
                       alpha=0.8, edgecolors="none")
        ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.0f}% of variance)")
        ax.legend(title="series", fontsize=8, loc="best", markerscale=1.5)
        ax.grid(alpha=0.3)
    ax.set_title(f"page embeddings: {len(emb)} of {n_total} pages finished")
    fig.tight_layout()
    fig.savefig(args.out, format="png")
    plt.close(fig)
    print(f"wrote {args.out}: {len(emb)} of {n_total} pages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
