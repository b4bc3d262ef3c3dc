"""Where a store lives: a local path or an fsspec URL plus storage options.

Local stores are passed to zarr as plain paths (``file://`` URLs go through a
store that overwrites files in place; torn reads were seen).  The bookkeeping
that is not part of the Zarr hierarchy (chunk index, lock) sits under
``_pagecube/`` inside the store so that copying the store copies it too.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import fsspec

META_DIR = "_pagecube"

# Object stores whose fsspec filesystems cache directory listings: a build's
# client lists the chunk index that workers (other processes) keep writing, so
# a cached listing would be stale.  Turned off unless the user sets it.
_LISTING_CACHE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def parse_storage_options(text: "str | None") -> dict[str, Any]:
    """``--storage-options``: a JSON object, or ``@FILE`` holding one (fsspec keyword arguments).

    Credentials are better left to the standard environment (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``), which s3fs reads
    on every process: options given here travel to the workers inside the task graph.
    """
    if not text:
        return {}
    raw = text
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                raw = f.read()
        except OSError as exc:
            raise ValueError(f"--storage-options: cannot read {text[1:]}: {exc.strerror}") from None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--storage-options must be a JSON object (or @FILE): {exc.msg}") from None
    if not isinstance(value, dict):
        raise ValueError("--storage-options must be a JSON object, for example "
                         "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}'")
    return value


def fs_options(url: str, storage_options: "dict[str, Any] | None") -> dict[str, Any]:
    """Storage options as given, plus no listing cache on object stores (see above)."""
    opts = dict(storage_options or {})
    protocol = url.split("://", 1)[0] if "://" in url else ""
    if protocol in _LISTING_CACHE_PROTOCOLS:
        opts.setdefault("use_listings_cache", False)
    return opts


@contextlib.contextmanager
def quiet_zarr_warnings():
    """Silence zarr's notes about consolidated metadata and our non-zarr folder."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component")
        yield


@dataclass(frozen=True)
class StoreLocation:
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def of(cls, store: "str | os.PathLike | StoreLocation", storage_options: dict | None = None) -> "StoreLocation":
        if isinstance(store, StoreLocation):
            return store
        url = os.fspath(store)
        if url.startswith("file://"):
            url = url[len("file://"):]
        if "://" not in url:
            url = os.path.abspath(url)
        return cls(url.rstrip("/"), dict(storage_options or {}))

    @property
    def is_local(self) -> bool:
        return "://" not in self.url

    @property
    def zarr_store(self):
        """What to hand to xarray/zarr as ``store``."""
        if self.is_local:
            return self.url
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url, storage_options=fs_options(self.url, self.storage_options) or None)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs, _ = fsspec.core.url_to_fs(self.url, **fs_options(self.url, self.storage_options))
        return fs

    @property
    def root(self) -> str:
        _, path = fsspec.core.url_to_fs(self.url, **fs_options(self.url, self.storage_options))
        return path.rstrip("/")

    def meta_path(self, *parts: str) -> str:
        return "/".join([self.root, META_DIR, *parts])

    def exists(self) -> bool:
        return self.fs.exists(f"{self.root}/zarr.json")

    def __str__(self) -> str:  # never shows credentials
        return self.url

    def __repr__(self) -> str:  # nor here: storage options may hold keys
        return f"StoreLocation({self.url!r}, storage_options=<{len(self.storage_options)} keys>)"
