"""``pagecube diagnose STORE [--repair] [--storage-options JSON]``: check a store; exit 1 when a fault is found (and not repaired)."""
from __future__ import annotations

from typing import Optional

import typer

from .app import app


@app.command()
def diagnose(
    store: str = typer.Argument(..., help="The store to check."),
    repair: bool = typer.Option(False, "--repair", help="Mark pages whose data are missing or garbled as pending "
                                "(and drop their finished-chunk entries) so the next build redoes them; "
                                "remove debris; re-consolidate metadata. Takes the writer lock."),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", help="fsspec options for URLs, as a JSON object or @FILE."),
) -> None:
    """Check metadata, shapes, data of done pages, chunk files, zarr/xarray agreement, index, debris and lock."""
    from ..diagnose import diagnose as run_diagnose
    from .inspect import _options

    report = run_diagnose(store, repair=repair, storage_options=_options(storage_options))
    print("\n".join(report.lines()))
    if not report.ok and not report.repaired:
        raise typer.Exit(1)
