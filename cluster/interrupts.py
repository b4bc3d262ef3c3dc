"""Local worker processes ignore Ctrl-C (SIGINT): the client that started them stops them.

A terminal sends Ctrl-C's SIGINT to its whole foreground process group: the client, and the local
worker processes and forkserver it started. The client stops cleanly and closes its cluster, whose
nannies stop their workers. A worker that took the signal itself died in the middle of its task and
printed multiprocessing's traceback (``Process Dask Worker process (from Nanny): ... KeyboardInterrupt``,
about 25 lines per worker) under the client's one line.

Workers forked from ``cluster.forkserver`` ignore SIGINT from their first instruction: the server
imports ``cluster.forkserver_sigint`` first and forks them with the handlers it had then. Spawned
workers (GPU workers, or forking turned off) ignore it from their Dask preload (this module's
``dask_setup``) on, a moment after they start.

Every such process, and the ``pagecube`` client, prints the stack of each of its threads to its
stderr on SIGUSR1 (``kill -USR1 PID``): where a build that seems stuck is waiting, asked of the
process itself, without a debugger and without stopping it.
"""
from __future__ import annotations

import faulthandler
import signal
import sys

#: The Dask worker preload that makes a spawned worker ignore SIGINT.
PRELOAD = __name__


def ignore_sigint() -> bool:
    """This process ignores SIGINT from now on; False where that cannot be set (not the main thread)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        return False
    return True


def stacks_on_sigusr1() -> bool:
    """SIGUSR1 prints every thread's stack to stderr (and the process goes on); False where it cannot."""
    if not hasattr(signal, "SIGUSR1"):  # pragma: no cover - not on Windows
        return False
    try:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    except (ValueError, AttributeError, OSError):  # no usable stderr (a daemon), or not the main thread
        return False
    return True


def dask_setup(worker) -> None:
    """Dask worker preload: runs on the worker's event loop, in its main thread."""
    ignore_sigint()
    stacks_on_sigusr1()
