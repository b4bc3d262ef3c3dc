"""The store lock as a lease: its length, which host may call a holder dead, and fencing of writes.

The multi-host side (test hosts with their own names and networks, racing
clients, cut links) is in test_multihost.py; these run on one host.
"""
from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from faultkit import MODEL, make_pages, read, run
from pipeline.inputs import PageSource
from pipeline.store.location import StoreLocation
from pipeline.store.lock import LOCK_NAME, LeaseLost, StoreLocked, WriterLock, fence, host_identity, read_lock
from test_s3 import _race


def _write_lock(store, **info) -> None:
    d = store / "_pagecube"
    d.mkdir(parents=True, exist_ok=True)
    now = time.time()
    base = {"run_id": "abcdef123456", "host": socket.gethostname(), "pid": 1, "started": now, "heartbeat": now}
    (d / LOCK_NAME).write_text(json.dumps({**base, **info}))


def test_lease_length_comes_from_the_environment_and_is_recorded(tmp_path, monkeypatch):
    loc = StoreLocation.of(tmp_path / "a.zarr")
    monkeypatch.setenv("PAGECUBE_LOCK_LEASE_S", "2")
    with WriterLock(loc) as lock:
        assert read_lock(loc).lease_s == 2 and lock.heartbeat_s <= 0.5
    # a holder on another host whose lease (its own length, 1 s) ran out is taken over without asking
    _write_lock(tmp_path / "b.zarr", host="w1-elsewhere", pid=4242, heartbeat=time.time() - 1.5, lease_s=1)
    with WriterLock(StoreLocation.of(tmp_path / "b.zarr")) as lock:
        assert "lease expired" in lock.took_over_from and "w1-elsewhere" in lock.took_over_from
    monkeypatch.setenv("PAGECUBE_LOCK_LEASE_S", "soon")
    code, out, err = run("build", "x.txt", "--out", tmp_path / "c.zarr", "--cluster", "sync")
    assert code == 2 and "PAGECUBE_LOCK_LEASE_S must be a positive number" in err


def test_a_dead_pid_counts_only_on_the_same_host_identity(tmp_path):
    """Same hostname is not enough (two machines may share one): boot and pid namespace must match too."""
    dead = 2**22 + 17  # above pid_max's default: no such process here
    store = tmp_path / "s.zarr"
    _write_lock(store, pid=dead, host_id=socket.gethostname() + "|another-boot|pid:[4026531836]", lease_s=600)
    with pytest.raises(StoreLocked, match=f"pid {dead}"):
        WriterLock(StoreLocation.of(store)).acquire()
    _write_lock(store, pid=dead, host_id=host_identity(), lease_s=600)  # really this host: the holder is gone
    with WriterLock(StoreLocation.of(store)) as lock:
        assert f"process {dead} on this host is no longer running" in lock.took_over_from


def test_local_lock_has_exactly_one_winner_every_time(tmp_path):
    for round_ in range(20):
        loc = StoreLocation.of(tmp_path / f"r{round_}.zarr")
        got = _race(lambda: WriterLock(loc, heartbeat_s=60).acquire())
        winners = [g for g in got if isinstance(g, WriterLock)]
        assert len(winners) == 1 and all(isinstance(g, StoreLocked) for g in got if g is not winners[0]), got
        winners[0].release()
        assert read_lock(loc) is None


def test_holder_learns_it_lost_the_lease(tmp_path):
    loc = StoreLocation.of(tmp_path / "l.zarr")
    first = WriterLock(loc, heartbeat_s=0.05).acquire()
    second = WriterLock(loc, take_over=True).acquire()
    deadline = time.monotonic() + 10
    while first.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.lost is not None and second.info.run_id in first.lost
    first.release()  # must not remove the new holder's lock
    assert read_lock(loc).run_id == second.info.run_id
    second.release()


def test_a_task_of_a_run_that_lost_the_lease_writes_nothing(tmp_path):
    from pipeline.build import MODEL_FACTORY
    from pipeline.tasks import run_chunk
    from pipeline.types import ChunkTask, JobSpec

    pages = make_pages(tmp_path / "s", 16, seed=5)
    store = tmp_path / "f.zarr"
    args = ["--out", store, "--cluster", "sync", "--chunk-pages", "8", "--model", MODEL, "--no-progress"]
    assert run("build", pages, *args, "--init-only")[0] == 0
    loc = StoreLocation.of(store)
    job = JobSpec(store_url=loc.url, storage_options={}, run_id="oldrun000001", n_pages=16, chunk_pages=8,
                  max_panels=12, embedding_dim=16, embedding_dtype="float32", model_resident="pagecube-model-sync",
                  model_factory=MODEL_FACTORY, model_kwargs={"name": MODEL, "max_panels": 12})
    with WriterLock(loc) as holder:
        with pytest.raises(LeaseLost, match=holder.info.run_id):
            run_chunk(ChunkTask(0, 0, 8), PageSource(str(pages)).slice(0, 8), job)
        with pytest.raises(LeaseLost):
            fence(loc, "oldrun000001")
        fence(loc, holder.info.run_id)  # the holder itself passes
    status, emb = read(store, "status", "page_embeddings")
    assert (status == 0).all() and np.isnan(emb).all()
    assert not (store / "page_embeddings" / "c").exists(), "a fenced task wrote data"
    assert not (store / "_pagecube" / "chunks").exists() or not any((store / "_pagecube" / "chunks").iterdir())


def test_the_fence_between_data_and_status_keeps_pages_pending(tmp_path):
    """A lease lost while the data were written: the data may be there, ``status`` is never written."""
    from pipeline.store.schema import empty_region
    from pipeline.store.writer import open_store_group, write_region

    pages = make_pages(tmp_path / "s", 8, seed=6)
    store = tmp_path / "g.zarr"
    assert run("build", pages, "--out", store, "--cluster", "sync", "--chunk-pages", "8", "--model", MODEL,
               "--no-progress", "--init-only")[0] == 0
    region = empty_region(8, 12, 16, "float32")
    region["page_embeddings"][:] = 1.0
    region["status"][:] = 1

    def lost():
        raise LeaseLost("taken over")

    with pytest.raises(LeaseLost):
        write_region(open_store_group(StoreLocation.of(store), "r1"), region, 0, 8, 8, before_completion=lost)
    status, emb = read(store, "status", "page_embeddings")
    assert (emb == 1.0).all() and (status == 0).all()
