"""Watching a build: a live page next to the Dask dashboard, the same page from the store alone,
and a redrawing terminal view.

Dask's own pages show tasks and bytes; this page shows pages: done, failed and pending, pages/s
and the ETA, one cell per chunk, failures by reason, one row per worker, the model and thumbnails
of the latest pages.  It is a static page polling a JSON endpoint (``web.py``), served

- by the build's scheduler (``install_page``: a scheduler plugin, so it works for a LocalCluster
  and for a remote ``dask scheduler`` alike), at ``<dashboard>/pagecube``;
- by ``pagecube status STORE --serve`` (``serve_store``), reading only the store.

The build's scheduler goes away with the build: ``show_the_end`` keeps it up until every open page
has been sent the final snapshot (a few seconds at most), so the page's last word is the build's.
"""
from __future__ import annotations

from ..store import Store

__all__ = ["install_page", "serve_store", "show_the_end"]

#: the most a build waits at its end for open pages to show it (they poll every 2 s, then load thumbnails)
END_WAIT_S = 8.0


def install_page(client, store: Store, image_root: str | None, dashboard_link: str | None
                 ) -> str | None:
    """Serve the page for ``store`` on the client's scheduler; its URL (None without a dashboard)."""
    from cluster.http import install_routes, page_link

    from .web import PAGE_PATH, WatchPlugin

    install_routes(client, WatchPlugin(store, image_root=image_root))
    return page_link(dashboard_link, PAGE_PATH)


def show_the_end(client, store: Store, state: str, reason: str = "",
                 wait_s: float = END_WAIT_S) -> int:
    """Tell the page on the client's scheduler that the build ended (``finished`` or ``stopped``, and why),
    then wait until every open page has been sent a snapshot taken after that, at most ``wait_s``.

    Returns how many open pages were still waiting when it gave up (0: all of them have the end).
    """
    import time

    from .web import end_on_scheduler, waiting_on_scheduler

    url = store.url
    deadline = time.monotonic() + wait_s
    left = lambda: max(0.5, deadline - time.monotonic())  # noqa: E731 - a scheduler that went away costs no more
    waiting = client.run_on_scheduler(end_on_scheduler, url=url, state=state, reason=reason,
                                      callback_timeout=left())
    while waiting and time.monotonic() < deadline:
        time.sleep(0.1)
        waiting = client.run_on_scheduler(waiting_on_scheduler, url=url, callback_timeout=left())
    return waiting


def serve_store(store, storage_options: dict | None = None, image_root: str | None = None,
                host: str = "127.0.0.1", port: int = 8788, announce=print) -> None:
    """Serve the page for ``store`` from this process until Ctrl-C (no scheduler: no worker rows)."""
    from cluster.http import serve_routes

    from .web import PAGE_PATH, ROUTES, WatchPlugin

    plugin = WatchPlugin(store, storage_options, image_root)
    serve_routes(ROUTES, lambda: plugin, host, port, lambda base: announce(f"{base}{PAGE_PATH}"))
