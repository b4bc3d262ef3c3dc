"""``pagecube status STORE --watch``: the status lines, redrawn in place until the build ends.

The build has ended when no live build holds the store's writer lock (released, or its holder is
gone).  Off a terminal (a pipe, a log file) nothing is redrawn: one status is printed at the end.
"""
from __future__ import annotations

import time

from ..readers import store_status
from ..store.location import StoreLocation
from ..store.lock import holder_is_gone, read_lock


def building(loc: StoreLocation) -> bool:
    info = read_lock(loc)
    return info is not None and holder_is_gone(info) is None


def _bar(done: int, failed: int, total: int, width: int = 40) -> str:
    if not total:
        return ""
    d = round(width * done / total)
    f = min(width - d, round(width * failed / total))
    return f"[green]{'█' * d}[/][red]{'█' * f}[/][dim]{'░' * (width - d - f)}[/]"


def _render(loc: StoreLocation, options):
    from rich.markup import escape
    from rich.text import Text

    st = store_status(loc, options)
    lines = [escape(line) for line in st.lines()]
    lines.insert(2, f"         {_bar(st.done, st.failed, st.n_pages)}")
    state = "[bold blue]building[/]" if building(loc) else "[bold]not building[/]"
    lines.append(f"[dim]{time.strftime('%H:%M:%S')}  {state}  (Ctrl-C to stop watching)[/]")
    return Text.from_markup("\n".join(lines)), st


def watch_status(store, storage_options: dict | None = None, every: float = 2.0) -> None:
    """Redraw ``store``'s status every ``every`` seconds until no build holds it, or Ctrl-C."""
    from rich.console import Console
    from rich.live import Live

    loc = StoreLocation.of(store, storage_options)
    console = Console()
    if not console.is_terminal:  # no redrawing into a pipe: wait, then print the final status once
        try:
            while building(loc):
                time.sleep(every)
        except KeyboardInterrupt:
            pass
        print("\n".join(store_status(loc, storage_options).lines()), flush=True)
        return
    view, _ = _render(loc, storage_options)
    try:
        with Live(view, console=console, auto_refresh=False, transient=False) as live:
            while True:
                ended = not building(loc)
                view, _ = _render(loc, storage_options)
                live.update(view, refresh=True)
                if ended:
                    break
                time.sleep(every)
    except KeyboardInterrupt:
        pass
