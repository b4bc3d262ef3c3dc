"""Debris a killed writer leaves behind (zarr's ``*.partial`` temp files).

zarr's local store writes ``path.with_suffix(f".{uuid4().hex}.partial")`` and
renames it over the chunk or metadata file; a writer killed in between leaves
``<name>.<32 hex>.partial`` next to an intact file.  Only those names are
removed (and the lock's own ``lock.json.<run>.tmp``), never anything else.

Cleaned only while this process holds the writer lock, so no live writer can
be renaming one of them at the same moment.  The walk is cheap: metadata
levels are listed, and inside each array's ``c/`` folder only the chunks that
the finished-chunk index does not mark complete (with no failed pages) are
entered; a writer only ever writes those, so debris can sit nowhere else.
``full=True`` walks everything (``pagecube diagnose``).
"""
from __future__ import annotations

import os
import re

from .location import META_DIR, StoreLocation

PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")
LOCK_TMP = re.compile(r"^lock\.json\.[0-9a-f]+\.tmp$")


def _is_debris(name: str) -> bool:
    return bool(PARTIAL.search(name) or LOCK_TMP.match(name))


def _walk_all(top: str, found: list[str]) -> None:
    try:
        entries = list(os.scandir(top))
    except (FileNotFoundError, NotADirectoryError):
        return
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            _walk_all(e.path, found)
        elif _is_debris(e.name):
            found.append(e.path)


def _files(top: str) -> list[os.DirEntry]:
    try:
        return list(os.scandir(top))
    except (FileNotFoundError, NotADirectoryError):
        return []


def find_debris(loc: StoreLocation, full: bool = False) -> list[str]:
    if not loc.is_local:
        return []  # object stores write whole objects: no temp files
    root = loc.url
    found: list[str] = []
    if full:
        _walk_all(root, found)
        return sorted(found)
    from .index import list_entries

    settled = {c for c, e in list_entries(loc).items() if e.failed == 0}
    for e in _files(root):
        if e.is_dir(follow_symlinks=False):
            if e.name == META_DIR:
                found.extend(f.path for f in _files(e.path) if _is_debris(f.name))
                continue
            for f in _files(e.path):  # an array folder: zarr.json (+ temp files), c/
                if f.name == "c" and f.is_dir(follow_symlinks=False):
                    for chunk in _files(f.path):
                        stem = chunk.name.split(".", 1)[0]
                        if stem.isdigit() and int(stem) in settled:
                            continue
                        if chunk.is_dir(follow_symlinks=False):
                            _walk_all(chunk.path, found)
                        elif _is_debris(chunk.name):
                            found.append(chunk.path)
                elif _is_debris(f.name):
                    found.append(f.path)
        elif _is_debris(e.name):
            found.append(e.path)
    return sorted(found)


def clean_debris(loc: StoreLocation, full: bool = False) -> int:
    paths = find_debris(loc, full=full)
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
    return len(paths)
