"""The write step of a task: the region it assembles, then the region's write, ``status`` last.

A task assembles its whole page range in memory (``Region``): pages done earlier
are copied from the store unchanged, the others are filled in as they are read
and run.  The write puts every data variable first; between the data and
``status`` come the fence (this build still holds the store's lease) and
``--verify``; ``status``/``written_at`` follow, then the index entries of the
chunks it finished.  Safe to run twice: the same pages give the same bytes, and
a range another task finished meanwhile is left as that task wrote it.
"""
from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .store.index import ChunkEntry
from .store.schema import STATUS_DONE, STATUS_FAILED, empty_region, region_counts
from .task_phases import phase
from .types import ChunkTask, JobSpec

if TYPE_CHECKING:
    from .store import RegionWriter, Store

logger = logging.getLogger("pagecube.tasks")
MAX_REASONS = 5  # failure reasons a receipt carries


@dataclass
class Region:
    """A task's page range as the store will hold it, and the first few reasons its pages failed."""

    start: int
    stop: int
    arrays: dict[str, np.ndarray]  # every store variable, one row per page of the range
    before: np.ndarray  # ``status`` as the task found it
    keep: np.ndarray  # pages done earlier (grown store, --retry-failed): kept byte for byte
    reasons: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, task: ChunkTask, job: JobSpec, before: np.ndarray) -> "Region":
        arrays = empty_region(len(task), job.max_panels, job.embedding_dim, job.embedding_dtype)
        return cls(task.start, task.stop, arrays, before, before == STATUS_DONE)

    def keep_done(self, writer: RegionWriter) -> None:
        """Copy the stored rows of pages already done, so rewriting the chunk keeps them unchanged (data and
        ``written_at``) while the chunk's other pages are (re)computed."""
        for name, arr in self.arrays.items():
            arr[self.keep] = writer.read(name, self.start, self.stop)[self.keep]

    def fail(self, i: int, reason: str) -> None:
        self.arrays["status"][i] = STATUS_FAILED
        self.arrays["error"][i] = reason
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)

    def identify(self, i: int, page) -> None:
        """Page identity from the manifest: written for done pages and for pages the model failed on."""
        arrays = self.arrays
        arrays["page_id"][i] = page.page_id
        for key in ("source", "series", "volume", "issue"):
            arrays[key][i] = page.meta[key]
        arrays["page_num"][i] = page.meta["page_num"]
        arrays["n_panels"][i] = min(page.n_panels, np.iinfo(np.int16).max)

    def fill_page(self, i: int, page) -> None:
        """What the manifest says of a page the model ran on: its identity and its kept panels."""
        k = page.n_kept
        self.identify(i, page)
        self.arrays["panel_coordinates"][i, :k] = page.boxes
        self.arrays["text_content"][i, :k] = page.texts
        self.arrays["panel_mask"][i, :k] = True

    def set_done(self, rows, outputs: dict[str, np.ndarray]) -> None:
        """The model's ``outputs`` (already in the store's dtypes) into ``rows``, and those pages done."""
        for name, value in outputs.items():
            self.arrays[name][rows] = value
        self.arrays["status"][rows] = STATUS_DONE

    def stamp(self) -> None:
        """``written_at`` of the pages this task (re)computed: now, to the millisecond."""
        now = np.datetime64(_dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None), "ms").astype(np.int64)
        self.arrays["written_at"][~self.keep] = now

    def counts(self) -> tuple[int, int]:
        return region_counts(self.arrays["status"])


def is_finished(before: np.ndarray, retry_failed: bool) -> bool:
    """Every page of the range done or failed (and no failed page to try again): only re-indexed."""
    done, failed = region_counts(before)
    return done + failed == len(before) and not (retry_failed and failed)


def reindex(store: Store, job: JobSpec, task: ChunkTask, status: np.ndarray) -> None:
    """The index entries of a finished range (a task that ran twice; an index entry lost)."""
    store.fence(job.run_id)  # even an index entry is written only while this build holds the store
    record_chunks(store, status, status, task, job.chunk_pages)


def write(writer: RegionWriter, region: Region, task: ChunkTask, job: JobSpec, seconds: dict) -> np.ndarray | None:
    """The region, ``status`` last, then the index entries; safe to repeat after a fault of the world.

    None once written; else the ``status`` another task finished these pages with meanwhile (this one
    ran on a worker that was cut off and given up on): that write stands, and this one changes nothing.
    """
    writer.store.fence(job.run_id)  # this build still holds the store (raises LeaseLost if not)
    current = writer.read("status", region.start, region.stop)
    if not np.array_equal(current, region.before):
        logger.warning("pagecube: pages [%d, %d) were finished by another task meanwhile; "
                       "this task's duplicate write is dropped", region.start, region.stop)
        return current
    writer.write(region.arrays, region.start, region.stop, job.chunk_pages,
                 before_completion=lambda: _before_completion(writer, region, job, seconds))
    record_chunks(writer.store, region.before, region.arrays["status"], task, job.chunk_pages)
    return None


def _before_completion(writer: RegionWriter, region: Region, job: JobSpec, seconds: dict) -> None:
    """Between the data and ``status``: the lease is still ours, and (``--verify``) the data read back the
    same; else raise, and no page of the range is marked done (a retry, then the failure policy)."""
    writer.store.fence(job.run_id)
    if job.verify:
        with phase(seconds, "verify"):
            bad = writer.verify(region.arrays, region.start, region.stop)
        if bad:
            raise RuntimeError(f"verify: pages [{region.start}, {region.stop}) read back different {', '.join(bad)}")


def record_chunks(store: Store, before: np.ndarray, after: np.ndarray, task: ChunkTask, chunk_pages: int) -> None:
    """An index entry for each chunk of the range that ``after`` finishes, replacing the one ``before`` had."""
    for (chunk, d0, f0, n), (_, d1, f1, _) in zip(_chunk_counts(before, task, chunk_pages),
                                                    _chunk_counts(after, task, chunk_pages)):
        if d1 + f1 == n:
            previous = ChunkEntry(chunk, d0, f0) if d0 + f0 == n else None
            store.record_chunk(ChunkEntry(chunk, d1, f1), previous)


def _chunk_counts(status: np.ndarray, task: ChunkTask, chunk_pages: int) -> list[tuple[int, int, int, int]]:
    """(chunk, done, failed, length) for each chunk of the task's range."""
    out = []
    for offset in range(0, len(task), chunk_pages):
        part = status[offset: offset + chunk_pages]
        done, failed = region_counts(part)
        out.append((task.chunk + offset // chunk_pages, done, failed, len(part)))
    return out
