"""``pagecube show``: draw one page with its panels, reading order and attention."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app


@app.command()
def show(
    store: str = typer.Argument(..., help="The store (a path or an fsspec URL such as s3://...)."),
    page_id: str = typer.Argument(..., help="A page id from the store (or its manifest's file name, e.g. page_00003), or @N for the page at position N (works for pending pages too)."),
    out: Path = typer.Option(..., "--out", "-o", help="The PNG to write."),
    image_root: Optional[str] = typer.Option(None, "--image-root", help="Folder that relative image paths resolve against (the build's --image-root; default: each manifest's folder)."),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", help="fsspec options for URLs, as a JSON object or @FILE."),
) -> None:
    """Draw a page: panel boxes coloured by attention, labelled '#order a=weight'; failed and pending pages get a banner."""
    from ..errors import BadArgument
    from ..show import ShowError, render_page
    from ..store.location import parse_storage_options

    try:
        so = parse_storage_options(storage_options)
        _, shown = render_page(store, page_id, out, image_root=image_root, storage_options=so)
    except (ShowError, ValueError) as exc:
        raise BadArgument(str(exc)) from None
    extra = f"; {shown.note}" if shown.note else ""
    print(f"wrote {out}: page @{shown.index} {shown.page_id} ({shown.state}), {shown.size[0]}x{shown.size[1]}, "
          f"{shown.panels} panels{extra}")
