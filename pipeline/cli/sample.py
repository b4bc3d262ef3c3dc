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
) -> None:
    """Write deterministic synthetic comic pages (JPEG + DataSpec manifests + pages.txt)."""
    from ..sample import make_sample

    listing = make_sample(out_dir, pages, seed, twins=twins)
    print(f"wrote {pages} pages; build them with: pagecube build {listing} --out STORE.zarr")
