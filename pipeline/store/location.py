"""Where a store lives: a local path or an fsspec URL plus storage options.

Local stores are passed to zarr as plain paths (``file://`` URLs go through a
store that overwrites files in place; torn reads were seen).  The bookkeeping
that is not part of the Zarr hierarchy (chunk index, lock) sits under
``_pagecube/`` inside the store so that copying the store copies it too.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import fsspec

META_DIR = "_pagecube"


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

        return FsspecStore.from_url(self.url, storage_options=self.storage_options or None)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs, _ = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs

    @property
    def root(self) -> str:
        _, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return path.rstrip("/")

    def meta_path(self, *parts: str) -> str:
        return "/".join([self.root, META_DIR, *parts])

    def exists(self) -> bool:
        return self.fs.exists(f"{self.root}/zarr.json")

    def __str__(self) -> str:  # never shows credentials
        return self.url
