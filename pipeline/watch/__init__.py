"""Watching a build: a live page next to the Dask dashboard, the same page from the store alone,
and a redrawing terminal view.

Dask's own pages show tasks and bytes; this page shows pages: done, failed and pending, pages/s
and the ETA, one cell per chunk, failures by reason, one row per worker, the model and thumbnails
of the latest pages.  It is a static page polling a JSON endpoint (``web.py``), served

- by the build's scheduler (``install_page``: a scheduler plugin, so it works for a LocalCluster
  and for a remote ``dask scheduler`` alike), at ``<dashboard>/pagecube``;
- by ``pagecube status STORE --serve`` (``serve_store``), reading only the store.
"""
from __future__ import annotations

from ..store.location import StoreLocation

__all__ = ["install_page", "serve_store"]


def install_page(client, loc: StoreLocation, image_root: str | None, dashboard_link: str | None) -> str | None:
    """Serve the page for ``loc`` on the client's scheduler; its URL (None without a dashboard)."""
    from cluster.http import install_routes, page_link

    from .web import PAGE_PATH, WatchPlugin

    install_routes(client, WatchPlugin(loc.url, loc.storage_options, image_root))
    return page_link(dashboard_link, PAGE_PATH)


def serve_store(store: str, storage_options: dict | None = None, image_root: str | None = None,
                host: str = "127.0.0.1", port: int = 8788, announce=print) -> None:
    """Serve the page for ``store`` from this process until Ctrl-C (no scheduler: no worker rows)."""
    from cluster.http import serve_routes

    from .web import PAGE_PATH, ROUTES, WatchPlugin

    plugin = WatchPlugin(StoreLocation.of(store, storage_options).url, storage_options, image_root)
    serve_routes(ROUTES, lambda: plugin, host, port, lambda base: announce(f"{base}{PAGE_PATH}"))
