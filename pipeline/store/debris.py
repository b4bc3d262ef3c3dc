"""Debris a killed writer leaves behind (zarr's ``*.partial`` temp files).

Only cleaned while this process holds the writer lock, so no live writer can
be renaming one of them at the same moment.
"""
from __future__ import annotations

from .location import StoreLocation


def find_debris(loc: StoreLocation) -> list[str]:
    if not loc.is_local:
        return []  # object stores write whole objects: no temp files
    import os

    found = []
    for dirpath, _, files in os.walk(loc.url):
        found.extend(os.path.join(dirpath, f) for f in files if f.endswith(".partial") or ".partial." in f)
    return found


def clean_debris(loc: StoreLocation) -> int:
    import os

    paths = find_debris(loc)
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
    return len(paths)
