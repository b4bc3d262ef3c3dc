"""Which pages, in which order: list files, globs and JSONL catalogs.

The page axis is the order of the list.  The client never opens a manifest: a
list file or catalog is scanned once for line offsets (16 bytes a page), and
each task reads only its own byte range back on the worker.  A glob is listed
once and each task carries its slice of paths.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np


class InputError(ValueError):
    """The PAGES argument cannot be used (one clear line)."""


@dataclass(frozen=True)
class PageRef:
    """Where one page's manifest is: a path, or the manifest itself (JSONL)."""

    label: str  # stored as manifest_path
    path: str | None = None
    inline: bytes | None = None
    base_dir: str = ""  # folder that relative image paths resolve against (without an image root)


def _is_url(p: str) -> bool:
    return "://" in p


def over_network(path: str | None) -> bool:
    """Whether reading ``path`` (a page list, an image root) goes over the network: a URL other than
    ``file://`` (object storage, HTTP)."""
    return bool(path) and _is_url(str(path)) and not str(path).startswith("file://")


def join_path(base: str, rel: str) -> str:
    """Resolve ``rel`` against folder ``base`` (local paths or URLs)."""
    if not rel or _is_url(rel) or rel.startswith("/") or not base:
        return rel
    if _is_url(base):
        scheme, _, rest = base.partition("://")
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, rel))}"
    return os.path.normpath(os.path.join(base, rel))


def parent(path: str) -> str:
    if _is_url(path):
        scheme, _, rest = path.partition("://")
        return f"{scheme}://{posixpath.dirname(rest)}"
    return os.path.dirname(path)


def _entries(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start/end byte offsets of the lines that name a page (not blank, not ``#``), vectorised."""
    buf = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [len(buf)]]).astype(np.int64)
    keep = ends > starts
    if len(buf):
        first = buf[np.minimum(starts, len(buf) - 1)]
        keep &= first != ord("#")
        # a line that starts with white space may be blank: check those few one by one
        for i in np.flatnonzero(keep & np.isin(first, (9, 13, 32))):
            line = data[starts[i]:ends[i]].strip()
            keep[i] = bool(line) and not line.startswith(b"#")
    return starts[keep], ends[keep]


@dataclass(frozen=True)
class SliceSpec:
    """What a task needs to find its pages: small and picklable."""

    kind: str  # "lines" | "jsonl" | "paths"
    url: str = ""
    byte_range: tuple[int, int] = (0, 0)
    first_index: int = 0
    paths: tuple[str, ...] = ()
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold keys: never printed

    def refs(self) -> list[PageRef]:
        if self.kind == "paths":
            return [PageRef(label=p, path=p, base_dir=parent(p)) for p in self.paths]
        start, end = self.byte_range
        with fsspec.open(self.url, "rb", **self.storage_options) as f:
            f.seek(start)
            data = f.read(end - start)
        lines = [ln.strip() for ln in data.split(b"\n")]
        lines = [ln for ln in lines if ln and not ln.startswith(b"#")]
        if self.kind == "jsonl":
            return [PageRef(label=f"{self.url}#{self.first_index + i}", inline=ln, base_dir=parent(self.url))
                    for i, ln in enumerate(lines)]
        base = parent(self.url)
        out = []
        for ln in lines:
            path = join_path(base, ln.decode("utf-8", errors="replace"))
            out.append(PageRef(label=path, path=path, base_dir=parent(path)))
        return out


#: Names of a folder's own page list that ``pagecube sample`` and most corpora use.
LIST_NAMES = ("pages.txt", "pages.jsonl", "manifests.txt", "catalog.jsonl")


def folder_hint(spec: str, storage_options: dict | None = None) -> str | None:
    """What to pass instead of a folder given as the page list (``pagecube build my-pages``): its list
    file where it has one, or a quoted glob of its manifests; None when ``spec`` is not a folder."""
    try:
        fs, path = fsspec.core.url_to_fs(spec, **(storage_options or {}))
        if not fs.isdir(path):
            return None
        names = {posixpath.basename(p.rstrip("/")): fs.isdir(p) for p in fs.ls(path, detail=False)}
    except Exception:  # noqa: BLE001 - no hint then, the plain "not found"
        return None
    here = spec.rstrip("/\\")
    listed = next((n for n in LIST_NAMES if names.get(n) is False), None)
    manifests = None
    if any(n.endswith(".json") and not d for n, d in names.items()):
        manifests = f"'{here}/*.json'"
    else:
        for sub in sorted(n for n, d in names.items() if d):
            try:
                if fs.glob(f"{path.rstrip('/')}/{sub}/*.json"):
                    manifests = f"'{here}/{sub}/*.json'"
                    break
            except Exception:  # noqa: BLE001
                continue
    what = f"{spec} is a folder, not a page list"
    if listed and manifests:
        return f"{what}: pass its page list {here}/{listed}, or a quoted glob of its manifests, {manifests}"
    if listed:
        return f"{what}: pass its page list {here}/{listed}"
    if manifests:
        return f"{what}: pass a quoted glob of its manifests, {manifests} (or a list file of them, one per line)"
    return (f"{what}, and it holds no JSON manifests: pass a list file (one manifest path per line), "
            f"a quoted glob such as '{here}/*.json', or a .jsonl catalog")


class PageSource:
    """The page list: its length, a digest of any prefix, and slices for tasks."""

    def __init__(self, spec: str, storage_options: dict | None = None):
        self.spec = os.fspath(spec)
        self.storage_options = dict(storage_options or {})
        self._paths: np.ndarray | None = None
        if any(c in self.spec for c in "*?["):
            self.kind = "paths"
            fs, _ = fsspec.core.url_to_fs(self.spec, **self.storage_options)
            found = sorted(fs.glob(self.spec))
            if not found:
                raise InputError(f"no manifests match {self.spec!r}")
            protocol = self.spec.split("://", 1)[0] if "://" in self.spec else None
            found = [f"{protocol}://{p}" if protocol else p for p in found]
            self._paths = np.array(found, dtype=np.dtypes.StringDType())
            self.starts = self.ends = None
            self._data = None
            return
        url = self.spec if _is_url(self.spec) else os.path.abspath(self.spec)
        self.url = url
        self.kind = "jsonl" if url.endswith((".jsonl", ".ndjson")) else "lines"
        try:
            with fsspec.open(url, "rb", **self.storage_options) as f:
                data = f.read()
        except (FileNotFoundError, IsADirectoryError):
            raise InputError(folder_hint(self.spec, self.storage_options)
                             or f"page list not found: {self.spec}") from None
        except OSError as exc:
            raise InputError(f"cannot read page list {self.spec}: {exc}") from None
        self.starts, self.ends = _entries(data)
        self._data = data  # kept only for digests; dropped by release()
        if len(self.starts) == 0:
            raise InputError(f"page list {self.spec} names no pages")

    def __len__(self) -> int:
        return len(self._paths) if self._paths is not None else len(self.starts)

    def digest(self, n: int | None = None) -> str:
        """Digest of the first ``n`` entries (all by default): the store's input fingerprint."""
        n = len(self) if n is None else n
        h = hashlib.sha256()
        if self._paths is not None:
            for p in self._paths[:n]:
                h.update(str(p).encode() + b"\n")
        else:
            h.update(self._data[: int(self.ends[n - 1])] if n else b"")
        return f"{h.hexdigest()[:24]}:{n}"

    def slice(self, start: int, stop: int) -> SliceSpec:
        if self._paths is not None:
            return SliceSpec("paths", paths=tuple(str(p) for p in self._paths[start:stop]),
                             storage_options=self.storage_options)
        return SliceSpec(self.kind, url=self.url, byte_range=(int(self.starts[start]), int(self.ends[stop - 1])),
                         first_index=start, storage_options=self.storage_options)
