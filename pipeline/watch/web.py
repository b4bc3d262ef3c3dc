"""The pagecube page's HTTP side: a static page, a JSON endpoint it polls, page thumbnails.

Routes (on the scheduler's dashboard server, or on ``pagecube status --serve``):

- ``/pagecube``                 the page (static HTML + JS, no build step)
- ``/pagecube/static/<file>``   its script and style sheet
- ``/pagecube/api/status?tab=T&shown=1`` the snapshot (``snapshot.py``) plus one row per worker on a
  scheduler, and ``ended`` once the build has ended (``end_build``); ``tab`` names the open page
  that polls, ``shown=1`` says it shows the end
- ``/pagecube/thumb?page=N&w=W`` page N drawn by ``pipeline.show.render_page`` (as ``pagecube show``), W px wide,
  as JPEG, one at a time (drawing costs CPU in the scheduler's process; measured in benchmarks/page_cost.py)

Store reads and drawing run in a thread, off the scheduler's event loop; a snapshot is reused for
``CACHE_S`` so that several open tabs cost one read.  A malformed or unknown query parameter is
answered with 400 and one line of JSON, any other error with one line too, never a traceback.

The end of a build: the build's scheduler goes away with the build, so an open page would only
ever show the last snapshot it happened to fetch ("87% building").  When the build ends it calls
``end_build`` (``pipeline.watch.show_the_end``): the plugin records how it ended and how to open
the page again, drops its cached snapshot, and the build keeps its server up until every page
that polled in the last ``TAB_OPEN_S`` says it shows the end with its thumbnails (``shown=1``),
at most ``END_WAIT_S``.
"""
from __future__ import annotations

import io
import json
import shlex
import threading
import time
from collections import OrderedDict, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from tornado.ioloop import IOLoop
from tornado.web import Finish, RequestHandler

from cluster.http import RoutesPlugin

from ..store import Store
from .snapshot import clean_url, snapshot

PAGE_PATH = "/pagecube"
CACHE_S = 1.0
WORKER_RATE_WINDOW_S = 60.0
THUMB_WIDTH = 220
THUMB_LIMITS = (48, 800)
THUMB_CACHE = 64
#: a page that polled this recently is open (it polls every 2 s; a browser may slow a tab hidden for
#: minutes to one poll a minute: such a tab is not waited for, and says how to reopen the page)
TAB_OPEN_S = 6.0
TAB_LIMIT = 256
#: thumbnails are drawn one at a time, so that an open page never takes more than one thread's CPU
_DRAWING = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagecube-thumb")
STATIC = {"page.js": "application/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


class WatchPlugin(RoutesPlugin):
    """Serves the page for one store; on a scheduler it also counts each worker's pages (Dask events).

    Used without a scheduler too (``pagecube status --serve``): then there are no worker rows.
    """

    name = "pagecube-page"
    topic = "pagecube"

    def __init__(self, store, storage_options: dict | None = None, image_root: str | None = None):
        self.store = Store.open(store, storage_options)
        self.image_root = image_root
        self._reset()

    def _reset(self) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self._cached: tuple[float, dict] | None = None
        self._thumbs: OrderedDict = OrderedDict()
        self._events: dict[str, deque] = defaultdict(lambda: deque(maxlen=4096))
        self._totals: dict[str, int] = defaultdict(int)
        self._devices: dict[str, str] = {}
        self.ended: dict | None = None
        self._generation = 0
        self._tabs_lock = threading.Lock()
        self._tabs: OrderedDict = OrderedDict()  # tab -> [last poll (monotonic), it shows the end]

    def __getstate__(self):
        state = super().__getstate__()
        for key in ("_lock", "_cached", "_thumbs", "_events", "_totals", "_devices", "ended", "_tabs",
                    "_tabs_lock", "_generation"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def routes(self):
        return ROUTES

    # --- scheduler hooks -------------------------------------------------------------------------

    def log_event(self, topic, msg) -> None:
        if topic != self.topic or not isinstance(msg, dict) or not msg.get("worker"):
            return
        pages = sum(int(msg.get(k) or 0) for k in ("done", "failed"))
        worker = str(msg["worker"])
        self._events[worker].append((time.time(), pages))
        self._totals[worker] += pages
        if msg.get("device"):
            self._devices[worker] = str(msg["device"])

    # --- what the handlers ask for ---------------------------------------------------------------

    def snapshot(self) -> dict:
        """The store's snapshot, read at most once per ``CACHE_S`` and afresh after the end (thread-safe)."""
        with self._lock:
            generation = self._generation
            if self._cached is None or self._cached[1] != generation or time.monotonic() - self._cached[0] > CACHE_S:
                self._cached = (time.monotonic(), generation, snapshot(self.store))
            return self._cached[2]

    def end_build(self, state: str, reason: str = "") -> None:
        """The build ended (``finished`` or ``stopped``, and why): later snapshots are read afresh and say so."""
        reopen = f"pagecube status {shlex.quote(clean_url(self.store.url))} --serve"
        if self.image_root:
            reopen += f" --image-root {shlex.quote(clean_url(self.image_root))}"
        with self._tabs_lock:  # not self._lock: that one is held while a snapshot is read, off the event loop
            self._generation += 1  # a snapshot read before this line is not reused
            self.ended = {"state": state, "reason": reason, "reopen": reopen}
            for seen in self._tabs.values():
                seen[1] = False

    def polled(self, tab: str | None, shown_end: bool) -> None:
        """Tab ``tab`` polled; ``shown_end``: it shows the end it was sent, thumbnails loaded."""
        if not tab:
            return
        with self._tabs_lock:
            seen = self._tabs.pop(tab, [0.0, False])
            self._tabs[tab] = [time.monotonic(), seen[1] or (shown_end and self.ended is not None)]
            while len(self._tabs) > TAB_LIMIT:
                self._tabs.popitem(last=False)

    def pages_waiting(self) -> int:
        """How many open pages (polled in the last ``TAB_OPEN_S``) do not show the end yet."""
        now = time.monotonic()
        with self._tabs_lock:
            return sum(1 for last, sent in self._tabs.values() if now - last < TAB_OPEN_S and not sent)

    def workers(self) -> list[dict] | None:
        """One row per worker (on the scheduler's event loop: reads scheduler state); None off a scheduler."""
        scheduler = getattr(self, "scheduler", None)
        if scheduler is None:
            return None
        now = time.time()
        window = max(1.0, min(WORKER_RATE_WINDOW_S, now - self.started))
        rows = []
        for address, ws in list(scheduler.workers.items()):
            metrics = ws.metrics or {}
            gpu = metrics.get("gpu") or {}
            recent = sum(p for t, p in self._events.get(address, ()) if t >= now - window)
            rows.append({
                "name": str(ws.name), "address": address, "threads": ws.nthreads,
                "tasks": len(ws.processing), "pages": self._totals.get(address, 0),
                "pages_per_s": recent / window, "device": self._devices.get(address, ""),
                "rss": metrics.get("memory"), "memory_limit": ws.memory_limit, "cpu": metrics.get("cpu"),
                "gpu_util": gpu.get("utilization"), "gpu_memory": gpu.get("memory-used"),
            })
        rows.sort(key=lambda r: r["name"])
        return rows

    def thumbnail(self, page: int, width: int) -> bytes:
        """Page ``page`` drawn as ``pagecube show`` draws it, ``width`` px wide, as JPEG."""
        key = (page, width)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        png = _draw_thumbnail(self.store, self.image_root, page, width)
        with self._lock:
            self._thumbs[key] = png
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return png


def _draw_thumbnail(store: Store, image_root, page: int, width: int) -> bytes:
    from PIL import Image, ImageDraw

    from ..show import render_page

    try:
        canvas, _ = render_page(store, f"@{page}", image_root=image_root, storage_options=store.storage_options)
        height = max(1, round(canvas.height * width / canvas.width))
        canvas = canvas.resize((width, height), Image.LANCZOS)
    except Exception as exc:  # noqa: BLE001 - the picture says why, the page goes on
        canvas = Image.new("RGB", (width, round(width * 1.4)), (236, 236, 236))
        draw = ImageDraw.Draw(canvas)
        msg = (str(exc).splitlines() or [type(exc).__name__])[0]
        words, line, lines = msg.split(), "", []
        for w in words:
            if len(line) + len(w) > width // 7:
                lines.append(line)
                line = ""
            line += w + " "
        lines.append(line)
        draw.multiline_text((8, 8), "cannot draw this page:\n" + "\n".join(lines[:8]), fill=(120, 30, 30))
    buf = io.BytesIO()
    canvas.convert("RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# --- handlers --------------------------------------------------------------------------------------


class _Handler(RequestHandler):
    """Query parameters are checked against ``PARAMS``; errors are one line of JSON."""

    PARAMS: dict = {}

    def initialize(self, current=None, dask_server=None):
        self.current = current

    def set_default_headers(self):
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")

    def fail(self, status: int, message: str):
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": message}))
        raise Finish()

    def prepare(self):
        for key, values in self.request.query_arguments.items():
            if key not in self.PARAMS:
                self.fail(400, f"unknown query parameter {key!r}; this endpoint takes "
                               f"{', '.join(self.PARAMS) or 'none'}")
            if len(values) != 1:
                self.fail(400, f"query parameter {key!r} given {len(values)} times")

    def int_arg(self, name: str, default: int | None, low: int, high: int) -> int:
        raw = self.request.query_arguments.get(name)
        if raw is None:
            if default is None:
                self.fail(400, f"query parameter {name!r} is required")
            return default
        try:
            value = int(raw[0].decode("ascii"), 10)
        except (UnicodeDecodeError, ValueError):
            self.fail(400, f"query parameter {name!r} must be a whole number")
        if not low <= value <= high:
            self.fail(400, f"query parameter {name!r} must be between {low} and {high}")
        return value

    def plugin(self) -> WatchPlugin:
        plugin = self.current() if self.current is not None else None
        if plugin is None:
            self.fail(503, "no pagecube build is registered on this scheduler")
        return plugin

    def write_error(self, status_code, **kwargs):
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": self._reason}))

    async def in_thread(self, fn, *args, executor=None):
        try:
            return await IOLoop.current().run_in_executor(executor, fn, *args)
        except Exception as exc:  # noqa: BLE001 - one line, never a traceback
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self.fail(500, f"{type(exc).__name__}: {msg}"[:300])


class PageHandler(_Handler):
    def get(self):
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(_static("page.html"))


class SlashHandler(_Handler):
    """``/pagecube/`` -> ``/pagecube``: the page's links are relative to ``/pagecube``."""

    def get(self):
        self.redirect(self.request.path.rstrip("/"))


class StaticHandler(_Handler):
    def get(self, name):
        if name not in STATIC:
            self.fail(404, "no such file")
        self.set_header("Content-Type", STATIC[name])
        self.finish(_static(name))


class StatusHandler(_Handler):
    PARAMS = {"tab": "a name the open page gives itself", "shown": "1 once the page shows the build's end"}

    async def get(self):
        plugin = self.plugin()
        tab = (self.request.query_arguments.get("tab") or [b""])[0].decode("ascii", "replace")[:64]
        plugin.polled(tab, self.int_arg("shown", 0, 0, 1) == 1)
        ended = plugin.ended  # read before the snapshot: the snapshot is then one taken after the end
        data = dict(await self.in_thread(plugin.snapshot))
        data["workers"] = plugin.workers()
        data["on_scheduler"] = data["workers"] is not None
        data["ended"] = ended
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(data, allow_nan=False, default=str))


class ThumbHandler(_Handler):
    PARAMS = {"page": "page position", "w": "width in px"}

    async def get(self):
        plugin = self.plugin()
        width = self.int_arg("w", THUMB_WIDTH, *THUMB_LIMITS)
        page = self.int_arg("page", None, 0, 2**62)
        snap = await self.in_thread(plugin.snapshot)
        total = snap.get("pages", {}).get("total", 0)
        if page >= total:
            self.fail(400, f"page {page} is out of range: the store has {total} pages")
        png = await self.in_thread(plugin.thumbnail, page, width, executor=_DRAWING)
        self.set_header("Content-Type", "image/jpeg")
        self.set_header("Cache-Control", "max-age=60")
        self.finish(png)


ROUTES = [
    (rf"{PAGE_PATH}", PageHandler, {}),
    (rf"{PAGE_PATH}/", SlashHandler, {}),
    (rf"{PAGE_PATH}/static/([a-z.]+)", StaticHandler, {}),
    (rf"{PAGE_PATH}/api/status", StatusHandler, {}),
    (rf"{PAGE_PATH}/thumb", ThumbHandler, {}),
]


# --- the end of a build (run on the scheduler by ``pipeline.watch.show_the_end``) -------------------


def end_on_scheduler(dask_scheduler, url: str, state: str, reason: str) -> int:
    """Mark the build of the store at ``url`` ended on this scheduler's page; how many open pages wait for it."""
    plugin = dask_scheduler.plugins.get(WatchPlugin.name)
    if not isinstance(plugin, WatchPlugin) or plugin.store.url != url:
        return 0
    plugin.end_build(state, reason)
    return plugin.pages_waiting()


def waiting_on_scheduler(dask_scheduler, url: str) -> int:
    """How many open pages of the store at ``url`` have not yet been sent the end."""
    plugin = dask_scheduler.plugins.get(WatchPlugin.name)
    if not isinstance(plugin, WatchPlugin) or plugin.store.url != url:
        return 0
    return plugin.pages_waiting()
