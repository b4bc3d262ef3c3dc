"""The read step of a task: its pages read and prepared in a thread pool, faults of the world retried.

A page that cannot be read fails with its reason and never fails its chunk.  A
read that met the world (``pipeline.faults``: a location gone, refused, timing
out) is retried within the task's budget, then stops the task (``WorldStop``).
"Not found" is the page's own fault unless the folder (or bucket) it names is
gone; so is a refused file while the task's other pages read.
"""
from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from .faults import Budget, Fault, WorldStop, classify, describe
from .inputs import parent
from .manifest import PageError, read_page
from .store.location import fs_options
from .task_write import Region
from .types import JobSpec

logger = logging.getLogger("pagecube.tasks")
_io_pools: dict[int, ThreadPoolExecutor] = {}  # by thread count: builds on a long-lived worker may differ
_NOT_FOUND = re.compile(r"^(?:image|manifest) not found: (.+)$")


class PageReader:
    """One task's reads: yields the pages it read and prepared, and fails in ``region`` those it could not."""

    def __init__(self, refs: list, model, job: JobSpec, region: Region, budget: Budget, threads: int):
        self.refs, self.model, self.job, self.region, self.budget = refs, model, job, region, budget
        self.pool = _pool(threads)
        self.side = getattr(model, "panel_side", None)  # decode pages just large enough for the model's crops
        self.world: dict[int, tuple[Fault, str]] = {}  # row -> (Fault, location): reads that met the world
        self.why: dict[int, str] = {}  # row -> the reason of its last read, for a refused one that becomes the page's
        self.missing: dict[int, str] = {}  # row -> "not found" reason: page faults, unless their location is gone
        self.read_from: set[str] = set()  # image folders this task has read pages from (they existed then)
        self.n_read = 0

    def pages(self, todo) -> Iterator[tuple[int, object, object]]:
        """(row, page, prepared) for each page of ``todo`` as it is read; reads that met the world are
        retried until none is left, or the budget is spent (``WorldStop``)."""
        yield from self._read(todo)
        while True:
            self._find_gone(len(todo))
            self._fail_refused_alone()
            if not self.world:
                break
            self._wait_for_the_world()
            yield from self._read(sorted(self.world))
        for i, reason in self.missing.items():  # pages that are missing while others of the location are there
            self.region.fail(i, reason)

    def _read(self, rows) -> Iterator[tuple[int, object, object]]:
        for i, result in zip(rows, self.pool.map(self._load, [self.refs[i] for i in rows])):
            item = self._take(int(i), *result)
            if item is not None:
                yield item

    def _load(self, ref):
        """(page, prepared, reason, fault): ``fault`` is (Fault, location) when the read met the world."""
        try:
            page = read_page(ref, max_panels=self.job.max_panels, image_root=self.job.image_root,
                             storage_options=self.job.storage_options, panel_side=self.side)
            prepared = self.model.prepare(page)
            page.image = page.pixels = None  # the decoded page is not needed past prepare: free it now
            return page, prepared, None, None
        except Exception as exc:  # a bad page must never fail its chunk
            reason = str(exc) if isinstance(exc, PageError) else f"{type(exc).__name__}: {exc}"
            fault = classify(exc)
            if fault is None:
                return None, None, reason, None
            return None, None, reason, (fault, parent(_failed_path(exc, ref)))

    def _take(self, i: int, page, prepared, reason, fault) -> tuple[int, object, object] | None:
        """A page's read: (row, page, prepared) when it was read; else None, and why is kept where it belongs."""
        if fault is not None:
            self.world[i], self.why[i] = fault, reason
            return None
        self.world.pop(i, None)
        if reason is not None:
            if _NOT_FOUND.match(reason):
                self.missing[i] = reason
            else:
                self.region.fail(i, reason)
            return None
        self.n_read += 1
        if page.image_path:
            self.read_from.add(parent(page.image_path))
        return i, page, prepared

    def _find_gone(self, n_todo: int) -> None:
        """Pages "not found" whose folder (or bucket) is gone met the world: they join the retries."""
        if not self.missing:
            return
        folders: dict[str, list[int]] = {}
        for i, reason in self.missing.items():
            folders.setdefault(parent(_NOT_FOUND.match(reason).group(1)), []).append(i)
        whole = self.n_read == 0 and len(self.missing) + len(self.world) == n_todo
        for folder, rows in folders.items():
            if _location_gone(folder, self.job.storage_options, whole or folder in self.read_from):
                for i in rows:
                    self.world[i] = (Fault("gone", self.missing.pop(i)), folder)

    def _fail_refused_alone(self) -> None:
        """One file refused while others of the task read: the page's own fault."""
        for i in [i for i, (fault, _) in self.world.items() if fault.kind == "denied" and self.n_read]:
            self.world.pop(i)
            self.region.fail(i, self.why[i])

    def _wait_for_the_world(self) -> None:
        fault, where = next(iter(self.world.values()))
        logger.info("pagecube: pages [%d, %d): %s; retrying", self.region.start, self.region.stop,
                    describe("images", where, fault.kind, fault.cause))
        if not self.budget.wait():
            raise WorldStop("images", where, fault.kind, fault.cause)


def _pool(threads: int) -> ThreadPoolExecutor:
    pool = _io_pools.get(threads)
    if pool is None:
        pool = _io_pools.setdefault(threads, ThreadPoolExecutor(threads, thread_name_prefix="pagecube-read"))
    return pool


def _failed_path(exc: BaseException, ref) -> str:
    """The file whose read met the world: the image's path when ``read_image_bytes`` was reading it (from
    its frame: errors such as botocore's name only an endpoint URL), else the manifest's."""
    tb = exc.__traceback__
    path = None
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("read_image_bytes", "load_image"):
            path = tb.tb_frame.f_locals.get("path")
        tb = tb.tb_next
    return str(path) if path else (ref.path or ref.label)


def _location_gone(folder: str, storage_options: dict, whole_task: bool) -> bool:
    """Whether ``folder`` is gone (or cannot be asked): then its pages that are "not found" met a fault
    of the world (a bucket or a mount taken away), not pages that are missing.

    A URL's bucket that is gone always is; the folder itself only when every page of the task is
    missing, or when this task read other pages from it before (``whole_task``): a folder that only
    some pages' typos name is not a location that went away.  A single
    missing image in a location that is there stays a page fault.
    """
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(folder, **fs_options(folder, storage_options))
        if "://" in folder and not fs.exists(path.split("/", 1)[0]):
            return True
        return whole_task and not fs.exists(path)
    except Exception as exc:  # noqa: BLE001 - asking failed: gone only if the asking met the world
        return classify(exc) is not None
