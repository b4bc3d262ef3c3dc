"""``pagecube sample``: synthetic comic pages for demos and tests."""
from __future__ import annotations

from pathlib import Path

import typer

from .app import app


@app.command()
def sample(
    out_dir: Path = typer.Argument(..., help="Folder to write images/, manifests/ and pages.txt into."),
    pages: int = typer.Option(..., "--pages", min=1, help="How many pages to make."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    twins: int = typer.Option(0, "--twins", min=0, help="Make the last N pages share all text with the first N."),
    size: str = typer.Option(None, "--size", metavar="WxH",
                             help="Page size in pixels, drawn like a scan (tinted paper, JPEG quality 90), "
                                  "e.g. 1988x3056 as real comic scans. Default: 800x1200 clean pages."),
) -> None:
    """Write deterministic synthetic comic pages (JPEG + DataSpec manifests + pages.txt)."""
    from ..sample import make_sample

    extra = {}
    if size is not None:
        w, _, h = size.lower().partition("x")
        if not (w.isdigit() and h.isdigit()) or int(w) < 100 or int(h) < 100:
            raise typer.BadParameter(f"expected WIDTHxHEIGHT of at least 100x100 pixels, like 1988x3056; got {size!r}",
                                     param_hint="--size")
        extra = {"image_size": (int(w), int(h)), "scan": True}
    listing = make_sample(out_dir, pages, seed, twins=twins, **extra)
    print(f"wrote {pages} pages; build them with: pagecube build {listing} --out STORE.zarr")
