"""``pagecube diagnose STORE [--repair]``: check a store; exit 1 when a fault is found (and not repaired)."""
from __future__ import annotations

import typer

from .app import app


@app.command()
def diagnose(
    store: str = typer.Argument(..., help="The store to check."),
    repair: bool = typer.Option(False, "--repair", help="Mark pages whose data are missing or garbled as pending "
                                "(and drop their finished-chunk entries) so the next build redoes them; "
                                "remove debris; re-consolidate metadata. Takes the writer lock."),
) -> None:
    """Check metadata, shapes, data of done pages, chunk files, zarr/xarray agreement, index, debris and lock."""
    from ..diagnose import diagnose as run_diagnose

    report = run_diagnose(store, repair=repair)
    print("\n".join(report.lines()))
    if not report.ok and not report.repaired:
        raise typer.Exit(1)
