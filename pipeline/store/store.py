"""``Store``: one object for a store and everything it knows about itself.

A caller opens a ``Store`` once from a location (a path, or an fsspec URL plus
storage options) and asks it, instead of handing ``(url, storage_options)``
from function to function and knowing which module keeps which piece of the
bookkeeping.  What it owns, each kept in its own small module beside this one:

- what it is: the template and its config (``template``), growth (``grow``),
  debris of interrupted writes (``debris``), conditional writes (``conditional``);
- the finished-chunk index (``index``);
- the lease: take, renew, fence, release, and the running marks (``lock``);
- why the last build stopped (``stopped``);
- reading and writing a page range, ``status`` last (``writer``).

Importing this module stays cheap (``pagecube status`` reads a store without
xarray): the modules that need zarr or xarray are imported where they are used.
A ``Store`` is small and picklable: a build sends its location to the tasks
inside the job, and each task opens the same ``Store`` on its worker.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from . import conditional, debris, index, lock, stopped
from .location import StoreLocation, quiet_zarr_warnings


@dataclass(frozen=True)
class Store:
    location: StoreLocation

    @classmethod
    def open(cls, store: "str | os.PathLike | StoreLocation | Store", storage_options: dict | None = None
             ) -> "Store":
        """The store at ``store`` (which need not exist yet: ``create`` makes it)."""
        if isinstance(store, Store):
            return store
        return cls(StoreLocation.of(store, storage_options))

    # --- where it is --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.location.url

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.location.storage_options

    @property
    def is_local(self) -> bool:
        return self.location.is_local

    @property
    def fs(self):
        return self.location.fs

    @property
    def root(self) -> str:
        return self.location.root

    @property
    def zarr_store(self):
        return self.location.zarr_store

    def __str__(self) -> str:  # never shows credentials
        return self.location.url

    def __repr__(self) -> str:
        return f"Store({self.location.url!r})"

    # --- what it is ---------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether a store's root metadata is there (not only our bookkeeping)."""
        return self.location.exists()

    def has_bookkeeping(self) -> bool:
        """Whether pagecube's ``_pagecube/`` folder is there (even where the root metadata is not)."""
        return self.fs.exists(self.location.meta_path())

    def require(self, damaged_ok: bool = False) -> None:
        """Raise ``NotAStore`` with one line unless a store is here, rather than zarr's 'No group found'
        (``damaged_ok``: or the bookkeeping of one whose root metadata is gone, for diagnose to look at)."""
        from ..errors import NotAStore

        if self.exists():
            return
        if self.has_bookkeeping():
            if damaged_ok:
                return
            raise NotAStore(f"{self} is a damaged pagecube store (its root zarr.json is missing): "
                            f"see `pagecube diagnose {self}`")
        where = "" if self.fs.exists(self.root) else " (nothing is there)"
        raise NotAStore(f"{self} is not a pagecube store{where}")

    def config(self) -> "tuple[template.StoreConfig, dict]":
        """The settings it was made with, and its root attributes."""
        from . import template

        return template.read_config(self.location)

    def create(self, config: "template.StoreConfig", attrs: dict, codec: str = "zstd") -> None:
        """Write the template: every array at its full size, consolidated, ``status`` all pending."""
        from . import template

        template.write_template(self.location, config, attrs, codec=codec)

    def grow(self, new_n: int, new_digest: str, chunk_pages: int, old_n: int) -> None:
        """Append pages to the page axis (the page list was appended to)."""
        from . import grow

        grow.grow_store(self.location, new_n, new_digest, chunk_pages, old_n)

    def debris(self, full: bool = False) -> list[str]:
        """Leftovers of interrupted writes (temp files)."""
        return debris.find_debris(self.location, full=full)

    def clean_debris(self, full: bool = False) -> int:
        return debris.clean_debris(self.location, full=full)

    def supports_conditional_writes(self) -> bool:
        return conditional.supports_conditional_writes(self.location)

    def dataset(self) -> "xr.Dataset":  # noqa: F821 - xarray is imported here only
        """The whole store as xarray sees it (consolidated metadata; every page, pending ones too)."""
        import xarray as xr

        with quiet_zarr_warnings():
            return xr.open_zarr(self.zarr_store, consolidated=True)

    def group(self, mode: str = "r", consolidated: bool = True):
        """The Zarr group, opened afresh (a reader's look; a task writes through ``writer``).

        ``consolidated=False`` reads each array's own metadata (diagnose compares both views)."""
        import zarr

        with quiet_zarr_warnings():
            return zarr.open_group(self.zarr_store, mode=mode, use_consolidated=consolidated)

    # --- the finished-chunk index -------------------------------------------------------------
    def chunks(self, with_times: bool = False) -> "dict[int, index.ChunkEntry]":
        """Finished chunks (every page done or failed), by chunk number."""
        return index.list_entries(self.location, with_times=with_times)

    def counts(self) -> tuple[int, int]:
        """(done, failed) pages over the finished chunks."""
        entries = self.chunks().values()
        return sum(e.done for e in entries), sum(e.failed for e in entries)

    def record_chunk(self, entry: "index.ChunkEntry", previous: "index.ChunkEntry | None" = None) -> None:
        index.write_entry(self.location, entry, previous)

    def forget_chunk(self, entry: "index.ChunkEntry") -> None:
        index.remove_entry(self.location, entry)

    # --- the lease ----------------------------------------------------------------------------
    def lock(self, *, take_over: bool = False, lease_s: float | None = None) -> "lock.WriterLock":
        """The writer lock, to hold with ``with``: one build at a time writes the store."""
        return lock.WriterLock(self.location, take_over=take_over, lease_s=lease_s)

    def holder(self) -> "lock.LockInfo | None":
        """Who holds the lock now, if anyone."""
        return lock.read_lock(self.location)

    def live_holder(self) -> "lock.LockInfo | None":
        """Who holds the lock while that build lives; None when nobody does, or the holder is gone."""
        info = lock.read_lock(self.location)
        return info if info is not None and lock.holder_is_gone(info) is None else None

    def lock_state(self) -> str:
        return lock.lock_state(self.location)

    def refuse_if_locked(self, take_over: bool = False) -> None:
        lock.refuse_if_locked(self.location, take_over)

    def fence(self, run_id: str) -> None:
        """Raise ``LeaseLost`` unless build ``run_id`` still holds the lease (checked before every write)."""
        lock.fence(self.location, run_id)

    def running(self, chunk: int):
        """A mark, held with ``with``, that a task is working on ``chunk``."""
        return lock.running_mark(self.location, chunk)

    def deaths_running(self, chunk: int) -> int:
        return lock.deaths_running(self.location, chunk)

    def clear_running(self, chunk: int | None = None) -> None:
        lock.clear_running(self.location, chunk)

    def running_chunks(self) -> set[int]:
        return lock.running_chunks(self.location)

    # --- why the last build stopped -----------------------------------------------------------
    def record_stop(self, kind: str, line: str, run_id: str = "") -> bool:
        return stopped.record_stop(self.location, kind, line, run_id)

    def stop_record(self) -> "stopped.StopRecord | None":
        return stopped.read_stop(self.location)

    def clear_stop(self) -> None:
        stopped.clear_stop(self.location)

    # --- page ranges --------------------------------------------------------------------------
    def writer(self, run_id: str) -> "RegionWriter":
        """Reads and writes of page ranges for build ``run_id`` (the group is opened once per worker)."""
        from . import writer

        return RegionWriter(self, writer.open_store_group(self.location, run_id), run_id)


@dataclass(frozen=True)
class RegionWriter:
    """Page ranges of one store, for one build's tasks: the data first, ``status`` last."""

    store: Store
    group: Any  # zarr.Group, opened r+ with consolidated metadata
    run_id: str

    def read(self, name: str, start: int, stop: int):
        from . import writer

        return writer.read_region(self.group, name, start, stop)

    def write(self, arrays: dict, start: int, stop: int, chunk_pages: int, before_completion=None) -> None:
        """Every data variable of ``[start, stop)``, then ``before_completion()``, then ``status``."""
        from . import writer

        writer.write_region(self.group, arrays, start, stop, chunk_pages, before_completion=before_completion)

    def verify(self, arrays: dict, start: int, stop: int) -> list[str]:
        """Names of the variables that read back different from ``arrays``."""
        from . import writer

        return writer.verify_region(self.group, arrays, start, stop)
