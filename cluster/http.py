"""Extra pages on the scheduler's own HTTP server (the one the dashboard uses), added at run time.

Dask serves extra routes from the modules named in ``distributed.scheduler.http.routes``, but only
when the scheduler was *started* with that setting. ``RoutesPlugin`` adds routes to a scheduler
that is already running - a LocalCluster's or a remote ``dask scheduler`` - when the client
registers it, so the pages bind exactly where the dashboard binds (127.0.0.1 unless told).

The routes are added once per scheduler and plugin name; each request looks the plugin up again
(``scheduler.plugins[name]``), so a later registration under the same name (the next build on a
long-lived scheduler) replaces what the pages show without adding routes twice. ``serve_routes``
serves the same routes from a plain Tornado server when there is no scheduler. Generic: the
pages themselves come from the subclass.
"""

from __future__ import annotations

import socket
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from distributed.diagnostics.plugin import SchedulerPlugin

__all__ = ["RoutesPlugin", "install_routes", "page_link", "serve_routes"]

Route = tuple  # (pattern, RequestHandler subclass, initialize kwargs)
_INSTALLED = "_cluster_http_routes"


class RoutesPlugin(SchedulerPlugin):
    """A scheduler plugin that serves ``routes()`` on the scheduler's HTTP server.

    Handlers receive ``current``: a callable giving the plugin now registered under ``name``
    (None when it was removed), so they always read the latest build's state.
    """

    idempotent = False
    name = "http-routes"

    def routes(self) -> list[Route]:  # pragma: no cover - abstract
        raise NotImplementedError

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        scheduler.plugins.pop(self.name, None)  # replaced without Dask's "overwriting" warning
        app = getattr(scheduler, "http_application", None)
        if app is None:  # a scheduler without an HTTP server
            return
        installed = getattr(app, _INSTALLED, set())
        if self.name in installed:
            return
        name = self.name

        def current(scheduler=scheduler, name=name):
            return scheduler.plugins.get(name)

        app.add_handlers(r".*$", [(p, cls, {**kw, "current": current}) for p, cls, kw in self.routes()])
        setattr(app, _INSTALLED, installed | {name})

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("scheduler", None)  # never pickled back with the plugin
        return state


def install_routes(client, plugin: RoutesPlugin) -> None:
    """Register ``plugin`` on the client's scheduler (the scheduler must import its class)."""
    client.register_plugin(plugin, name=plugin.name)


def page_link(dashboard_link: str | None, path: str) -> str | None:
    """The URL of ``path`` on the same server as the dashboard link (``.../status``)."""
    if not dashboard_link:
        return None
    parts = urlsplit(dashboard_link)
    base = parts.path.rsplit("/", 1)[0] if parts.path.endswith("/status") else parts.path.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, f"{base}/{path.lstrip('/')}", "", ""))


def serve_routes(routes: list[Route], current: Callable[[], Any], host: str = "127.0.0.1", port: int = 0,
                 announce: Callable[[str], None] = print) -> None:
    """Serve ``routes`` from a plain Tornado server on ``host:port`` until Ctrl-C.

    ``announce`` gets the base URL once the socket is bound (``port=0`` picks a free port).
    """
    import asyncio

    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets
    from tornado.web import Application

    app = Application([(p, cls, {**kw, "current": current}) for p, cls, kw in routes])
    sockets = bind_sockets(port, address=host, family=socket.AF_INET if "." in host else socket.AF_UNSPEC)
    bound = sockets[0].getsockname()[1]

    async def main():
        server = HTTPServer(app)
        server.add_sockets(sockets)
        shown = f"[{host}]" if ":" in host else host
        announce(f"http://{shown}:{bound}")
        await asyncio.Event().wait()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
