"""``pagecube status`` and ``pagecube summary``: read only the store."""
from __future__ import annotations

from typing import Optional

import typer

from .app import app


@app.command()
def status(
    store: str = typer.Argument(..., help="The store to look at (a path or an fsspec URL such as s3://...)."),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", help="fsspec options for URLs, as a JSON object or @FILE."),
) -> None:
    """Done, failed and pending pages, recent rate, ETA and failures by reason (mid-run too)."""
    from ..readers import store_status

    print("\n".join(store_status(store, _options(storage_options)).lines()))


def _options(text):
    from ..errors import BadArgument
    from ..store.location import parse_storage_options

    try:
        return parse_storage_options(text)
    except ValueError as exc:
        raise BadArgument(str(exc)) from None


@app.command()
def summary(
    store: str = typer.Argument(..., help="The store to look at."),
    max_pages: int = typer.Option(5, "--max-pages", min=0, help="How many finished pages to show."),
    text_len: int = typer.Option(80, "--text-len", min=1, help="Cut panel text at this many characters."),
    compact: bool = typer.Option(False, "--compact", help="One line per page."),
    page_id: Optional[str] = typer.Option(None, "--page-id", help="Show this page only."),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", help="fsspec options for URLs, as a JSON object or @FILE."),
) -> None:
    """Page summaries: id, series, panels, embedding norm and panel text in reading order."""
    from ..readers import page_summaries

    print("\n".join(page_summaries(store, max_pages=max_pages, text_len=text_len, compact=compact, page_id=page_id,
                                  storage_options=_options(storage_options))))
