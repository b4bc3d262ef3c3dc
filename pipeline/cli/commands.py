"""The typer application with every command registered, and ``main``: its exit codes and one-line errors.

Exit codes: 0 all pages done; 3 the build finished but some pages failed;
2 bad arguments; 75 the build stopped for a fault of the world (the store's disk full, read-only or
refusing access, S3 or the image location unreachable, the scheduler lost: one line says which; the
same command finishes the pages once the cause is gone); 130 interrupted; 1 any other error (one
clear line on stderr).
"""
from __future__ import annotations

import sys

import click
import typer

from .app import app
from .usage import one_line, plain_labels
from . import build as _build, inspect as _inspect, sample as _sample  # noqa: F401  (register commands)
from . import show as _show  # noqa: F401,E402  (pagecube show)
from . import similar as _similar  # noqa: F401,E402  (pagecube similar)
from . import diagnose as _diagnose  # noqa: F401,E402  (pagecube diagnose)


def _click(name: str) -> tuple:
    """The click exception class ``name``, and typer's vendored copy of it (typer >= 0.2x bundles click)."""
    mods = [click.exceptions, sys.modules.get("typer._click.exceptions")]
    return tuple({getattr(m, name) for m in mods if m is not None and hasattr(m, name)})


def main(argv: list[str] | None = None) -> int:
    from ..errors import BadArgument, BuildStopped

    command = typer.main.get_command(app)
    plain_labels(command)
    try:
        rc = command.main(args=argv, prog_name="pagecube", standalone_mode=False)
        return rc if isinstance(rc, int) else 0  # click returns typer.Exit's code when not standalone
    except _click("Exit") as exc:
        return exc.exit_code
    except _click("Abort"):
        print("pagecube: interrupted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        return 130
    except _click("NoArgsIsHelpError") as exc:  # plain ``pagecube``: the help
        exc.show()
        return 2
    except _click("UsageError") as exc:
        print(f"pagecube: error: {one_line(exc, argv, command)}", file=sys.stderr)
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
