"""A build's first phase: inputs read and checked against the store, then the store made ready.

``read_inputs`` runs before any cluster starts, so a wrong page list, store or setting is refused in
a second; ``get_ready`` checks the workers can see the pages and the store, loads the model and
checks its description against the store's; ``take_store`` (under the lock) creates or grows it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import __version__
from .errors import BadArgument
from .inputs import InputError, PageSource
from .model.registry import BUILTIN, UNTRAINED_NOTICE, ModelNotFound, check_model, default_model, resolve_factory
from .options import BuildOptions
from .plan import default_chunk_pages
from .resume_check import refuse_other_settings
from .startup import start_workers_early
from .store.location import META_DIR
from .store.store import Store
from .store.template import StoreConfig
from .submit import say
from .workers import LoadedModel, Workers, load_model, show_on_dashboard

if TYPE_CHECKING:
    from .store.lock import WriterLock


@dataclass(frozen=True)
class Inputs:
    """The page list and the store, read and checked before any cluster starts."""

    pages: str  # the page list as given (the store's ``inputs`` attribute; the resume line names it)
    out: str  # the store as given (the resume line names it)
    source: PageSource
    store: Store
    model: str  # the model to load: as asked, else the store's own built-in one, else the default
    existing: StoreConfig | None  # the settings the store was made with; None for a new store
    grow_from: int  # the store's page count where pages were appended to its list, else 0
    chunk_pages: int | None  # the store's, else as asked (None: sized to the cluster)

    @property
    def n_pages(self) -> int:
        return len(self.source)


@dataclass(frozen=True)
class Ready:
    """What the workers' checks and the loaded model settled: the store's chunking and config."""

    chunk_pages: int
    model: LoadedModel
    config: StoreConfig


def read_inputs(pages: str, out: str, opts: BuildOptions) -> Inputs:
    """The page list and the store, refused with one line where they do not fit these options."""
    model = opts.model
    if model is None:  # a checkpoint is for a trainable model: tiny's
        model = "tiny" if opts.checkpoint is not None else default_model()
    fallback = opts.model is None and opts.checkpoint is None and model == "tiny"  # pretrained is not installed
    start_workers_early(opts.cluster, opts.device, model)  # the workers' imports run while this process reads inputs
    try:
        # in process the model is imported here anyway; for workers, a check that does not import torch
        resolve_factory(model) if opts.cluster == "sync" else check_model(model)
    except ModelNotFound as exc:
        raise BadArgument(str(exc)) from None
    try:
        source = PageSource(pages, opts.storage_options)
    except InputError as exc:
        raise BadArgument(str(exc)) from None
    store = _open_store(out, opts)
    existing = _existing_config(store, opts) if store.exists() and not opts.overwrite else None
    grow_from = _growth(store, existing, source) if existing else 0
    if existing is not None:
        if opts.model is None and existing.model in BUILTIN:
            model = existing.model  # rerunning the same command resumes, whatever is installed now
        refuse_other_settings(store, existing, model=model, checkpoint=opts.checkpoint, seed=opts.seed,
                              embedding_dim=opts.embedding_dim, embedding_dtype=opts.embedding_dtype)
    if fallback and model == "tiny":
        say(UNTRAINED_NOTICE)
    return Inputs(pages, out, source, store, model, existing, grow_from,
                  existing.chunk_pages if existing else opts.chunk_pages)


def _open_store(out: str, opts: BuildOptions) -> Store:
    """The store at ``out``, refused where it is a file, a folder of other files, or locked."""
    store = Store.open(out, opts.storage_options)
    if store.is_local and os.path.exists(store.root) and not os.path.isdir(store.root):
        raise BadArgument(f"--out {out} is an existing file, not a store folder; give a new path "
                          "(--overwrite replaces only stores)")
    _refuse_foreign_folder(store, out)
    store.refuse_if_locked(opts.take_over_lock)  # before starting a cluster for nothing
    return store


def _refuse_foreign_folder(store: Store, out) -> None:
    """A new store empties its folder first: never one that holds other files (``--out my-pages`` by mistake).

    Judged on one listing: a build creating a store writes its ``_pagecube/`` lock before anything else,
    so a listing that shows its files shows that too.  (Asking "a store? bookkeeping? other files?" one
    after another let a build racing another for a new store see the winner's first files and call them
    foreign, where it must be refused as locked.)"""
    fs = store.fs
    fs.invalidate_cache(store.root)
    try:
        names = {name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(store.root, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        return
    if names and not names & {"zarr.json", META_DIR} and fs.isdir(store.root):
        raise BadArgument(f"--out {out} is a folder that holds other files, not a pagecube store; give a new path "
                          "(pagecube would empty it; --overwrite replaces only stores)")


def _existing_config(store: Store, opts: BuildOptions) -> StoreConfig:
    """The settings an existing store was made with, refused where the chunking or panel cap differ."""
    try:
        existing, _ = store.config()
    except Exception as exc:
        store.refuse_if_locked(opts.take_over_lock)  # a template being written right now
        raise BadArgument(f"{store} exists but is not a pagecube store ({exc}); use --overwrite to replace it") \
            from None
    if opts.chunk_pages is not None and opts.chunk_pages != existing.chunk_pages:
        raise BadArgument(f"store {store} was made with --chunk-pages {existing.chunk_pages}, not {opts.chunk_pages}; "
                          "use --overwrite to start afresh")
    if existing.max_panels != opts.max_panels:
        raise BadArgument(f"store {store} was made with --max-panels {existing.max_panels}, not {opts.max_panels}; "
                          "use --overwrite to start afresh")
    return existing


def _growth(store: Store, existing: StoreConfig, source: PageSource) -> int:
    """Old page count when the store may grow to ``source`` (its list is a prefix of the new one), else 0.

    A list that changed in any other way is refused here with one line.
    """
    n_old, n_new = existing.n_pages, len(source)
    full = source.digest()
    if n_new == n_old:
        if existing.input_digest != full:
            raise BadArgument(f"the page list changed since store {store} was made (same length, different "
                              "entries); only appending pages at the end is supported: use --overwrite or a new --out")
        return 0
    # the second form: a growth interrupted after the new digest was written but before re-consolidation
    if n_new > n_old and existing.input_digest in (source.digest(n_old), full):
        return n_old
    what = "is shorter than" if n_new < n_old else "does not start with"
    raise BadArgument(f"the page list ({n_new} pages) {what} the {n_old} pages store {store} was built from; "
                      "only appending pages at the end is supported: use --overwrite or a new --out")


def get_ready(inputs: Inputs, workers: Workers, opts: BuildOptions) -> Ready:
    """Workers that see the store and the pages, the model loaded on them, and the store's config from it."""
    from .preflight import check_pages, check_store

    store = inputs.store
    chunk_pages = inputs.chunk_pages or default_chunk_pages(inputs.n_pages, workers.task_slots)
    check_store(workers.handle, store)  # before the model loads: a store only here is refused in seconds
    check_pages(workers.handle, inputs.source, opts.image_root, opts.max_panels)
    model = load_model(workers, inputs.model, opts)
    show_on_dashboard(workers, store, opts.image_root)
    info = model.info
    config = StoreConfig(
        n_pages=inputs.n_pages, chunk_pages=chunk_pages, max_panels=opts.max_panels,
        embedding_dim=int(info["embedding_dim"]), embedding_dtype=opts.embedding_dtype,
        model=info["name"], weights_digest=info["weights_digest"], input_digest=inputs.source.digest(),
    )
    if inputs.existing is not None:
        # the page list (n_pages, input_digest) was checked by _growth: same list, or appended to
        diffs = config.differences(inputs.existing, ignore=("n_pages", "input_digest"))
        if diffs:
            raise BadArgument(f"store {store} was made with different settings: {'; '.join(diffs)}; "
                              "use --overwrite to start afresh (or a new --out)")
    if not store.supports_conditional_writes():
        say(f"pagecube: warning: store {store} does not support conditional writes (If-None-Match, If-Match): "
            "two builds that start at the same instant are not kept apart")
    return Ready(chunk_pages, model, config)


def take_store(inputs: Inputs, ready: Ready, lock: WriterLock, codec: str) -> None:
    """Under the lock: clear what an earlier build left, then grow or create the store."""
    store, n_pages, chunk_pages = inputs.store, inputs.n_pages, ready.chunk_pages
    if lock.took_over_from:
        say(f"pagecube: took over the store lock from {lock.took_over_from}")
    store.clear_stop()  # this build holds the store now: an earlier stop is no longer what it is
    store.clean_debris()
    store.clear_running()  # marks of an earlier build's dead processes do not count now
    if inputs.grow_from:
        store.grow(n_pages, ready.config.input_digest, chunk_pages, inputs.grow_from)
        say(f"pagecube: grew store {store} from {inputs.grow_from} to {n_pages} pages")
    if inputs.existing is None:
        store.create(ready.config, {
            "model_weights_source": ready.model.info["weights_source"],
            "pagecube_version": __version__,
            "inputs": os.fspath(inputs.pages),
            "title": "pagecube embedding store",
        }, codec=codec)
        say(f"pagecube: created store {store} for {n_pages} pages "
            f"({ready.config.n_pages // chunk_pages + bool(n_pages % chunk_pages)} chunks of {chunk_pages})")
