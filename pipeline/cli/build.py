"""``pagecube build``: build or resume a store."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing
from typing import Optional

import typer

from ..options import BuildOptions
from .app import app


def says_interrupted(command):
    """Ctrl-C at any moment of ``pagecube build`` ends with the one line: the build says it once its tasks
    run (with the command to resume), this says it for a Ctrl-C before (imports, the cluster's start)."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt as stop:
            if not getattr(stop, "said", False):
                print("pagecube: interrupted; finished chunks are kept. Resume with the same command",
                      file=sys.stderr, flush=True)
            raise

    return run


#: Options of the command line's own, as text it turns into the ``BuildOptions`` field they are listed
#: under (see ``_options``); every other field with a flag is an option as it is.
OWN_OPTIONS = {
    "model_options": {
        "reading_direction": (Optional[str], typer.Option(
            None, "--reading-direction", help="ltr | rtl (manga), for models that order panels by geometry.")),
    },
    "progress": {
        "no_progress": (bool, typer.Option(False, "--no-progress", help="No progress bar or progress lines.")),
    },
    "security": {
        "tls_ca_file": (Optional[str], typer.Option(
            None, "--tls-ca-file", help="CA certificate (PEM) for a tls:// scheduler; default: Dask config "
            "distributed.comm.tls.ca-file.")),
        "tls_cert": (Optional[str], typer.Option(
            None, "--tls-cert", help="Client certificate (PEM) for a tls:// scheduler.")),
        "tls_key": (Optional[str], typer.Option(
            None, "--tls-key", help="Client private key (PEM), if not inside --tls-cert.")),
    },
    "storage_options": {
        "storage_options": (Optional[str], typer.Option(
            None, "--storage-options", help="fsspec options for s3:// and other URLs, as a JSON object or @FILE "
            "(credentials: prefer the AWS_* environment).")),
    },
}


def with_build_options(command):
    """Give ``command`` (which takes ``**given``) one typer option per ``BuildOptions`` field, in the fields'
    order: its flag, default and help from the field, or the command line's own options for it."""
    types = typing.get_type_hints(BuildOptions)
    params = []
    for f in dataclasses.fields(BuildOptions):
        if f.metadata["flag"]:
            option = typer.Option(f.default, f.metadata["flag"], help=f.metadata["help"])
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=types[f.name]))
        for name, (annotation, option) in OWN_OPTIONS.get(f.name, {}).items():
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=annotation))
    signature = inspect.signature(command)
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = signature.replace(parameters=fixed + params)
    return command


@app.command()
@says_interrupted
@with_build_options
def build(
    pages: str = typer.Argument(..., help="A list file (one manifest per line), a glob, or a .jsonl catalog."),
    out: str = typer.Option(..., "--out", "-o", help="The store (a local path or an fsspec URL such as s3://...)."),
    **given,
) -> None:
    """Build the embedding store for PAGES into --out; resumes by default."""
    # the local workers' forkserver was started by pipeline.cli.main, before typer was imported
    from ..build import build as run_build

    options = _options(given)
    result = run_build(pages, out, options)
    if options.init_only:
        print(f"initialised {result.store}: {result.n_pages} pages pending")
        return
    print(f"{result.store}: {result.done} done, {result.failed} failed, {result.pending} pending "
          f"of {result.n_pages} pages ({result.pages_per_s:.1f} pages/s over this run, "
          "first task to last, warm-up included)")
    if result.phases:
        print("  task time by phase, summed over tasks: " + phase_line(result.phases))
    for r in result.reasons[:5]:
        print(f"  failed: {r}", file=sys.stderr)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def _options(given: dict) -> BuildOptions:
    """The command line's options as ``BuildOptions``: its own text turned into the fields it sets."""
    from cluster import make_security

    from ..errors import BadArgument
    from ..store.location import parse_storage_options

    reading_direction, no_progress = given.pop("reading_direction"), given.pop("no_progress")
    tls = given.pop("tls_ca_file"), given.pop("tls_cert"), given.pop("tls_key")
    try:
        storage_options = parse_storage_options(given.pop("storage_options"))
        security = make_security(*tls)
    except ValueError as exc:
        raise BadArgument(str(exc)) from None
    model_options = {} if reading_direction is None else {"reading_direction": reading_direction}
    return BuildOptions(**given, model_options=model_options, progress=not no_progress,
                        storage_options=storage_options, security=security)


PHASE_NAMES = {"inference": "model", "read": "waiting for pages (read + prepare)", "write": "writing",
               "verify": "verifying"}


def phase_line(phases: dict[str, float]) -> str:
    """Where the tasks' time went: the model, or waiting for pages to be read and prepared, or the store."""
    order = [k for k in PHASE_NAMES if k in phases] + sorted(k for k in phases if k not in PHASE_NAMES)
    return ", ".join(f"{PHASE_NAMES.get(k, k)} {phases[k]:.1f} s" for k in order)
