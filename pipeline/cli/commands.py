"""The typer application with every command registered, and ``main``: its exit codes and one-line errors.

Exit codes: 0 all pages done; 3 the build finished but some pages failed;
2 bad arguments; 75 the build stopped for a fault of the world (the store's disk full, read-only or
refusing access, S3 or the image location unreachable, the scheduler lost: one line says which; the
same command finishes the pages once the cause is gone); 130 interrupted; 1 any other error (one
clear line on stderr).
"""
from __future__ import annotations

import re
import sys

import click
import typer

from .app import app
from . import build as _build, inspect as _inspect, sample as _sample  # noqa: F401  (register commands)
from . import show as _show  # noqa: F401,E402  (pagecube show)
from . import similar as _similar  # noqa: F401,E402  (pagecube similar)
from . import diagnose as _diagnose  # noqa: F401,E402  (pagecube diagnose)


def _click(name: str) -> tuple:
    """The click exception class ``name``, and typer's vendored copy of it (typer >= 0.2x bundles click)."""
    mods = [click.exceptions, sys.modules.get("typer._click.exceptions")]
    return tuple({getattr(m, name) for m in mods if m is not None and hasattr(m, name)})


def _expanded_glob(exc) -> str | None:
    """One line for the usual cause of many extra arguments: a glob the shell expanded (it was not quoted)."""
    msg = getattr(exc, "message", "") or ""
    found = re.fullmatch(r"Got unexpected extra arguments?(?:\(s\))? \((.*)\)", msg.strip(), re.S)
    if found is None:
        return None
    extra = found.group(1).split()
    if len(extra) < 2:
        return None
    cmd = exc.ctx.info_name if getattr(exc, "ctx", None) is not None else "pagecube"
    return (f"{cmd} got {len(extra) + 1} paths where it takes one: the shell expanded a glob; quote it so "
            "that pagecube expands it, e.g. 'manifests/*.json'")


def main(argv: list[str] | None = None) -> int:
    from ..errors import BadArgument, BuildStopped

    try:
        rc = app(args=argv, prog_name="pagecube", standalone_mode=False)
        return rc if isinstance(rc, int) else 0  # click returns typer.Exit's code when not standalone
    except _click("Exit") as exc:
        return exc.exit_code
    except _click("Abort"):
        print("pagecube: interrupted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        return 130
    except _click("UsageError") as exc:
        glob = _expanded_glob(exc)
        if glob is None:
            exc.show()
        else:
            print(f"pagecube: error: {glob}", file=sys.stderr)
        return 2
    except _click("ClickException") as exc:
        exc.show()
        return 2
    except BadArgument as exc:
        print(f"pagecube: error: {exc}", file=sys.stderr)
        return 2
    except BuildStopped as exc:  # a fault of the world, not of the pages: its own line and exit code
        print(f"pagecube: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # one clear line, not a traceback
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"pagecube: error: {msg}", file=sys.stderr)
        return 1
