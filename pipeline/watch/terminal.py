"""``pagecube status STORE --watch``: the status, redrawn in place until the build ends.

The build has ended when no live build holds the store's writer lock (released, or its holder is
gone).  Off a terminal (a pipe, a log file) nothing is redrawn: one plain line per interval, flushed,
then the final status.  While a build runs, its rate is the live page's (``snapshot.live_rate``: the
finished-chunk index's times over the last minutes, from the build's start while only one chunk is
done), not the spread of the last chunks' ``written_at`` stamps, which early in a build are a few
milliseconds apart (a first frame once said 2031.7 pages/s, ETA 0.0 min).
"""
from __future__ import annotations

import dataclasses
import time

from ..readers import StoreStatus, store_status
from ..store import Store
from .snapshot import RATE_WINDOW_S, live_rate


def building(store: Store) -> bool:
    return store.live_holder() is not None


def status_now(store: Store) -> tuple[StoreStatus, bool]:
    """The store's status, with the live rate while a build holds it; and whether one does."""
    info = store.live_holder()
    live = info is not None
    entries = store.chunks(with_times=True)
    st = store_status(store, entries=entries)
    if live:
        st = dataclasses.replace(st, pages_per_s=live_rate(entries, time.time(), info.started))
    return st, live


def _eta(st: StoreStatus) -> str:
    return "-" if st.eta_s is None else f"{st.eta_s / 60:.1f} min"


def status_lines(st: StoreStatus, live: bool) -> list[str]:
    """``pagecube status``'s lines; while a build runs, its rate line says how the live rate is counted."""
    lines = st.lines()
    if live:
        rate = (f"rate     {st.pages_per_s:.1f} pages/s over the chunks finished in the last "
                f"{RATE_WINDOW_S / 60:.0f} min; ETA {_eta(st)}" if st.pages_per_s else
                "rate     - (no chunk finished yet); ETA -")
        lines = [ln for ln in lines if not ln.startswith("rate ")]
        lines.insert(3, rate)
    return lines


def plain_line(st: StoreStatus, live: bool) -> str:
    """One line for a log: time, state, counts, rate and ETA."""
    pct = 100.0 * st.done / st.n_pages if st.n_pages else 100.0
    rate = f"{st.pages_per_s:.1f} pages/s" if st.pages_per_s else "-"
    return (f"{time.strftime('%H:%M:%S')}  {'building' if live else 'not building'}  "
            f"done {st.done}/{st.n_pages} ({pct:.1f}%)  failed {st.failed}  pending {st.pending}  "
            f"rate {rate}  ETA {_eta(st) if live else '-'}")


def _bar(done: int, failed: int, total: int, width: int = 40) -> str:
    if not total:
        return ""
    d = round(width * done / total)
    f = min(width - d, round(width * failed / total))
    return f"[green]{'█' * d}[/][red]{'█' * f}[/][dim]{'░' * (width - d - f)}[/]"


def _render(store: Store):
    from rich.markup import escape
    from rich.text import Text

    st, live = status_now(store)
    lines = [escape(line) for line in status_lines(st, live)]
    lines.insert(2, f"         {_bar(st.done, st.failed, st.n_pages)}")
    state = "[bold blue]building[/]" if live else "[bold]not building[/]"
    lines.append(f"[dim]{time.strftime('%H:%M:%S')}  {state}  (Ctrl-C to stop watching)[/]")
    return Text.from_markup("\n".join(lines)), st


def watch_status(store, storage_options: dict | None = None, every: float = 2.0) -> None:
    """Redraw ``store``'s status every ``every`` seconds until no build holds it, or Ctrl-C."""
    from rich.console import Console
    from rich.live import Live

    store = Store.open(store, storage_options)
    console = Console()
    if not console.is_terminal:  # no redrawing into a pipe: a line per interval, then the final status
        try:
            while True:
                st, live = status_now(store)
                if not live:
                    break
                print(plain_line(st, live), flush=True)
                time.sleep(every)
        except KeyboardInterrupt:
            pass
        st, live = status_now(store)
        print("\n".join(status_lines(st, live)), flush=True)
        return
    view, _ = _render(store)
    try:
        with Live(view, console=console, auto_refresh=False, transient=False) as live:
            while True:
                ended = not building(store)
                view, _ = _render(store)
                live.update(view, refresh=True)
                if ended:
                    break
                time.sleep(every)
    except KeyboardInterrupt:
        pass
