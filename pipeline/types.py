"""Frozen plans and receipts passed between the client and the workers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChunkTask:
    """One task: whole store chunks ``[start, stop)`` along ``page``."""

    chunk: int  # index of the first chunk
    start: int
    stop: int

    @property
    def key(self) -> str:
        return f"pagecube-pages-{self.start:09d}-{self.stop:09d}"

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class BuildPlan:
    n_pages: int
    chunk_pages: int
    tasks: tuple[ChunkTask, ...]
    complete_chunks: int  # chunks skipped because the index says they are complete

    @property
    def n_chunks(self) -> int:
        return -(-self.n_pages // self.chunk_pages)

    @property
    def pages_planned(self) -> int:
        return sum(len(t) for t in self.tasks)


@dataclass(frozen=True)
class JobSpec:
    """Everything a task needs besides its page range; small, pickled once per task."""

    store_url: str
    storage_options: dict[str, Any]
    run_id: str
    n_pages: int
    chunk_pages: int
    max_panels: int
    embedding_dim: int
    embedding_dtype: str
    model_resident: str  # plugin name on workers
    model_factory: str  # "module:factory" for the in-process fallback
    model_kwargs: dict[str, Any]
    image_root: str | None = None
    batch_size: int = 16
    retry_failed: bool = False
    verify: bool = False
    worker_cores: int | None = None  # a local worker's share of this machine's cores; None: the worker's own
    pages_over_network: bool = False  # the page list or image root is a URL: readers wait on the network

    @property
    def store(self):
        """The job's ``Store`` (``pipeline.store.Store``), opened on the worker that runs the task."""
        from .store import Store

        return Store.open(self.store_url, self.storage_options)


@dataclass(frozen=True)
class Receipt:
    """What a task returns: a few numbers, never arrays."""

    start: int
    stop: int
    done: int
    failed: int
    skipped: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    worker: str = ""
    device: str = ""
    reasons: tuple[str, ...] = ()  # first few failure reasons
    #: (where, location, kind, cause) when the task gave up on a fault of the world (``pipeline.faults``):
    #: no ``status`` was written for its pages, and the build stops
    stopped: tuple[str, str, str, str] | None = None
