"""The typer application that every command module registers on."""
from __future__ import annotations

import typer

from .. import __version__


def _version(value: bool) -> None:
    if value:
        print(f"pagecube {__version__}")
        raise typer.Exit(0)


app = typer.Typer(
    name="pagecube",
    help="Turn comic pages into an xarray/Zarr embedding store, built in parallel on Dask.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """pagecube: comic pages -> embedding cube."""
