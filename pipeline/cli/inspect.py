"""``pagecube status`` and ``pagecube summary``: read only the store."""
from __future__ import annotations

from typing import Optional

import typer

from .app import app


@app.command()
def status(
    store: str = typer.Argument(..., help="The store to look at (a path or an fsspec URL such as s3://...)."),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", help="fsspec options for URLs, as a JSON object or @FILE."),
    watch: bool = typer.Option(False, "--watch", help="Redraw every few seconds until the build ends (or Ctrl-C)."),
    serve: bool = typer.Option(False, "--serve", help="Serve the live pagecube page for this store (http://HOST:PORT/pagecube) until Ctrl-C."),
    port: int = typer.Option(8788, "--port", min=0, max=65535, help="Port for --serve (0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address --serve binds to (127.0.0.1: this machine only)."),
    image_root: Optional[str] = typer.Option(None, "--image-root", help="For --serve's thumbnails: the build's --image-root."),
    every: float = typer.Option(2.0, "--every", min=0.2, help="Seconds between redraws with --watch."),
) -> None:
    """Done, failed and pending pages, recent rate, ETA and failures by reason (mid-run too)."""
    from ..errors import BadArgument
    from ..store import Store

    options = _options(storage_options)
    if serve and watch:
        raise BadArgument("--serve and --watch do not go together: run them in two terminals")
    opened = Store.open(store, options)
    if serve:
        from ..watch import serve_store

        if not opened.exists():
            raise BadArgument(f"no pagecube store at {store}")
        try:
            serve_store(opened, image_root=image_root, host=host, port=port,
                        announce=lambda url: print(f"pagecube: serving the page for {store} at {url} (Ctrl-C to stop)",
                                                   flush=True))
        except OSError as exc:
            raise BadArgument(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
        return
    if watch:
        from ..watch.terminal import watch_status

        watch_status(opened, every=every)
        return
    from ..watch.terminal import status_lines, status_now

    print("\n".join(status_lines(*status_now(opened))))


def _options(text):
    from ..errors import BadArgument
    from ..store import parse_storage_options

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
