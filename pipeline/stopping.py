"""How a build ends, around the time it holds the store: a fault of the world stops it with one line
(recorded in the store), and the live page is told how it ended."""
from __future__ import annotations

import contextlib

from .errors import BuildError, BuildStopped
from .faults import WorldStop, advice, bounded, classify
from .store.store import Store


@contextlib.contextmanager
def stops_for_the_world(store: Store, n_pages: int):
    """A fault of the world (a task that gave up, or the store failing the client) stops the build with
    one line and exit code 75 (``BuildStopped``), recorded in the store for ``status`` to show."""
    try:
        yield
    except WorldStop as stop:
        raise _stopped(store, stop, n_pages) from None
    except BuildError:
        raise
    except Exception as exc:
        fault = classify(exc)
        if fault is None:
            raise
        raise _stopped(store, WorldStop("store", store.url, fault.kind, fault.cause), n_pages) from None


def _stopped(store: Store, stop: WorldStop, n_pages: int) -> BuildStopped:
    """The stop line (what, where, the pages kept, what to do), recorded in the store where it still takes it."""
    lines = [f"{stop}; the pages done before are kept; {advice(stop.kind)}"]

    def count_and_record() -> None:
        done, _ = store.counts()
        lines.append(f"{stop}; {done} of {n_pages} pages are done and kept; {advice(stop.kind)}")
        for step in (store.clear_running,  # the marks of tasks that gave up: not deaths to count
                     lambda: store.record_stop(stop.kind, lines[-1])):
            try:
                step()
            except Exception:  # noqa: BLE001 - a read-only store keeps them; status then shows the lock left
                pass

    if not (stop.where == "store" and stop.kind in ("timeout", "unreachable")):  # else nothing answers there
        try:  # bounded: a store that does not answer must not hold the stop line back
            bounded(count_and_record)
        except Exception:  # noqa: BLE001 - a store that refuses reads: the line says less
            pass
    return BuildStopped(lines[-1], stop.kind)


@contextlib.contextmanager
def page_shows_the_end(client, store: Store):
    """Once the lock is released, the live page is told how the build ended and open pages are given a few
    seconds to fetch it (the scheduler, and so the page's server, may go with the build).  Ctrl-C exits
    at once; a build never fails for its page."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        _end_page(client, store, "stopped", (str(exc).strip().splitlines() or [type(exc).__name__])[0])
        raise
    else:
        _end_page(client, store, "finished")


def _end_page(client, store: Store, state: str, reason: str = "") -> None:
    if client is None or client.status != "running":  # no scheduler to tell (it may be why the build stopped)
        return
    from .watch import show_the_end

    try:
        show_the_end(client, store, state, reason)
    except Exception:  # noqa: BLE001 - the scheduler may be gone already (the reason the build stopped)
        pass
