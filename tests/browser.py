"""Headless Chromium for the page tests: Playwright driving the system's Chromium (never a download).

Debian's ``chromium`` package (``.ci/run`` installs it when missing).  The flags keep it off the
network it would otherwise try to reach (updates, sync, field trials) and out of any sandbox a
container cannot offer; Playwright gives it a fresh profile (user data dir) on each launch.
"""
from __future__ import annotations

import contextlib
import os
import shutil

import pytest

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    return os.environ.get("PAGECUBE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def browser():
    """A headless Chromium (Playwright ``Browser``); skips the test when Playwright or Chromium is missing."""
    sync_api = pytest.importorskip("playwright.sync_api")
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=FLAGS)
        try:
            yield b
        finally:
            b.close()


class Watched:
    """A page plus the console errors and uncaught exceptions it produced."""

    def __init__(self, b, url: str, width: int = 1280, height: int = 900):
        self.page = b.new_page(viewport={"width": width, "height": height})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(url)

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector)

    def counts(self) -> dict:
        """Refresh the page now and return the counts it shows (done, failed, pending), read from the DOM."""
        self.page.evaluate("window.pagecube.refresh()")
        num = lambda sel: int(self.text(sel).replace(",", ""))  # noqa: E731
        return {"done": num("#n-done"), "failed": num("#n-failed"), "pending": num("#n-pending")}

    def map_colours(self) -> set[str]:
        """Which of the chunk map's colours are drawn on its canvas."""
        return set(self.page.evaluate("""() => {
            const c = document.getElementById('map'), ctx = c.getContext('2d');
            const d = ctx.getImageData(0, 0, c.width, c.height).data, seen = new Set();
            const names = {'47,163,107': 'done', '226,230,235': 'pending', '76,139,245': 'running', '224,82,77': 'failed'};
            for (let i = 0; i < d.length; i += 4) { const k = `${d[i]},${d[i+1]},${d[i+2]}`; if (names[k]) seen.add(names[k]); }
            return [...seen];
        }"""))

    def thumbs_loaded(self) -> int:
        return self.page.evaluate("() => [...document.querySelectorAll('#thumbs img')]"
                                  ".filter(i => i.complete && i.naturalWidth > 0).length")
