"""The ``pagecube`` command: one module per command, all calling the Python API.

This package's own module stays cheap on purpose. The console script imports it, and so does every
local worker process, which re-imports the script's main module when it starts. ``pagecube build``
starts the local workers' forkserver here, before typer and the commands are imported: the workers
import torch for about two seconds, and that import, not the client's, is what a build waits for.
The typer application, with every command registered, is ``pipeline.cli.commands.app``.
"""
from __future__ import annotations

import sys

#: ``pagecube build`` options that decide whether local workers are forked, and what they import.
EARLY_OPTIONS = ("--cluster", "--device", "--model", "--checkpoint")


def main(argv: list[str] | None = None) -> int:
    """Run one ``pagecube`` command; returns its exit code (see :mod:`pipeline.cli.commands`)."""
    args = sys.argv[1:] if argv is None else list(argv)
    from cluster.interrupts import stacks_on_sigusr1

    stacks_on_sigusr1()  # kill -USR1 PID: where a command that seems stuck is waiting, thread by thread
    try:
        start_build_workers_early(args)
        from .commands import main as run_command
    except KeyboardInterrupt:  # Ctrl-C while the command was still importing
        print("pagecube: interrupted", file=sys.stderr, flush=True)
        return 130
    return run_command(args)


def start_build_workers_early(args: list[str]) -> bool:
    """For ``pagecube build`` on a local cluster, start the workers' forkserver now, from the options
    read off the command line. False when it did not start; the build command itself starts it
    then, with options click has checked (a second call is a no-op)."""
    if not args or args[0] != "build" or "--help" in args or "-h" in args:
        return False
    given: dict[str, str] = {}
    for i, arg in enumerate(args[1:], start=1):
        name, eq, value = arg.partition("=")
        if name in EARLY_OPTIONS:
            if eq:
                given[name] = value
            elif i + 1 < len(args):
                given[name] = args[i + 1]
    from ..startup import start_workers_early

    model = given.get("--model") or ("tiny" if given.get("--checkpoint") else None)
    try:
        return start_workers_early(given.get("--cluster", "local"), given.get("--device", "auto"), model)
    except Exception:  # noqa: BLE001 - the build command reports bad options, and starts the workers itself
        return False


def run() -> None:
    """The console script."""
    _exit_now(main())


def _exit_now(code: int) -> None:
    """End the process without tearing the interpreter down object by object.

    Measured on a 2-core machine: once the work was done, Python's own finalisation (every module of
    distributed, xarray, pandas and zarr freed one object at a time) took 0.8-1.3 s, a third of a
    ``build --init-only``.  What matters at exit still happens, in the interpreter's order: other
    threads are joined, atexit handlers run (logging, multiprocessing, temporary folders), then stdout
    and stderr are flushed.
    """
    import atexit
    import os
    import threading

    try:
        threading._shutdown()  # what the interpreter runs first at exit: joins the non-daemon threads
        atexit._run_exitfuncs()
    except AttributeError:  # pragma: no cover - an interpreter without these: the normal exit
        sys.exit(code)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe must not change the exit code
                pass
    os._exit(code)
