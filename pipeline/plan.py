"""Pure arithmetic on page ranges: chunk sizes, alignment, what is left to do.

No I/O here, so that planning 10^7 pages is a few array operations and can be
tested without a store.
"""
from __future__ import annotations

import math

from .types import BuildPlan, ChunkTask

MAX_CHUNK_PAGES = 256
MIN_CHUNK_PAGES = 8


class PlanError(ValueError):
    """A plan that would lose data (misaligned) or makes no sense."""


def default_chunk_pages(n_pages: int, slots: int = 1) -> int:
    """Up to 256 pages for large corpora; smaller for small ones so a sample still spreads over workers.

    About 8 chunks per corpus below 2,048 pages: each task costs a fixed ~40 ms
    of CPU (Dask, 18 zarr writes, status read, index entry), which at 8-page
    chunks was 20% of the tiny model's per-page cost (benchmarks/overhead.py).
    From 2,048 pages on, equal chunks of at most 256 whose count is a multiple of
    ``slots`` (the tasks the cluster runs at once), so that the last round of
    tasks keeps every slot busy: 4,000 pages on 2 workers in chunks of 256 gave
    one worker 8 chunks and the other 7.6, 2.4% of the run; in chunks of 250, 8 each.
    """
    if n_pages <= 0:
        return MIN_CHUNK_PAGES
    target = n_pages / 8
    size = 2 ** max(0, int(math.floor(math.log2(max(target, 1)))))
    size = int(min(MAX_CHUNK_PAGES, max(MIN_CHUNK_PAGES, size)))
    if size < MAX_CHUNK_PAGES:
        return size
    slots = max(1, int(slots))
    rounds = math.ceil(n_pages / (slots * MAX_CHUNK_PAGES))
    return math.ceil(n_pages / (rounds * slots))


def check_aligned(start: int, stop: int, chunk_pages: int, n_pages: int) -> None:
    """Refuse a region that does not cover whole chunks: misaligned region writes lose data silently."""
    if not (0 <= start < stop <= n_pages):
        raise PlanError(f"page range [{start}, {stop}) is outside the store's {n_pages} pages")
    if start % chunk_pages or (stop % chunk_pages and stop != n_pages):
        raise PlanError(f"page range [{start}, {stop}) is not aligned to {chunk_pages}-page chunks")


def chunk_range(chunk: int, chunk_pages: int, n_pages: int) -> tuple[int, int]:
    start = chunk * chunk_pages
    return start, min(start + chunk_pages, n_pages)


def plan_build(n_pages: int, chunk_pages: int, complete: set[int] | frozenset[int],
               chunks_per_task: int = 1) -> BuildPlan:
    """Tasks for every chunk not in ``complete``; each task owns ``chunks_per_task`` whole chunks."""
    if chunk_pages <= 0:
        raise PlanError(f"chunk size must be a positive number of pages, got {chunk_pages}")
    n_chunks = -(-n_pages // chunk_pages)
    todo = [c for c in range(n_chunks) if c not in complete]
    tasks = []
    i = 0
    while i < len(todo):
        first = todo[i]
        last = first
        j = i + 1
        while j < len(todo) and todo[j] == last + 1 and last - first + 1 < chunks_per_task:
            last = todo[j]
            j += 1
        start, _ = chunk_range(first, chunk_pages, n_pages)
        _, stop = chunk_range(last, chunk_pages, n_pages)
        check_aligned(start, stop, chunk_pages, n_pages)
        tasks.append(ChunkTask(first, start, stop))
        i = j
    return BuildPlan(n_pages, chunk_pages, tuple(tasks), n_chunks - len(todo))
