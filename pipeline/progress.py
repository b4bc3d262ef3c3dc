"""Client-side progress: a rich bar on a terminal, plain log lines elsewhere."""
from __future__ import annotations

import sys
import time


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Pages done and failed, pages/s and ETA over the pages this run planned."""

    def __init__(self, total: int, *, already_done: int = 0, enabled: bool = True, stream=None,
                 log_every_s: float = 5.0):
        self.total = total
        self.done = 0
        self.failed = 0
        self.already = already_done
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.log_every_s = log_every_s
        self._last_log = 0.0
        self._bar = None
        self.enabled = enabled
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("[bold]pages"), BarColumn(), MofNCompleteColumn(),
                TextColumn("failed {task.fields[failed]}"), TextColumn("{task.fields[rate]:.1f} pages/s"),
                TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=False,
            )
            self._task = self._bar.add_task("build", total=total, failed=0, rate=0.0)
            self._bar.start()

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.t0
        return (self.done + self.failed) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        finished = self.done + self.failed
        rate = self.rate
        eta = (self.total - finished) / rate if rate > 0 else None
        return (f"pages {finished}/{self.total} (done {self.done}, failed {self.failed}) "
                f"{rate:.1f} pages/s ETA {_fmt_eta(eta)}")

    def update(self, done: int, failed: int) -> None:
        self.done += done
        self.failed += failed
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done + self.failed, failed=self.failed, rate=self.rate)
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s or self.done + self.failed >= self.total:
            self._last_log = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
