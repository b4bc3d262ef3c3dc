"""The core build (issue 2): distributed equals in-process, the store reads back right,
the model loads once per worker, readers see progress mid-run, kills resume, mismatches are refused."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import pipeline
from conftest import CLI, ROOT, manifests, run_cli, cli_env
from pipeline.store.schema import STATUS_DONE

MODEL_VARS = ("page_embeddings", "panel_embeddings", "attention_weights", "reading_order")


@pytest.fixture(scope="module")
def built_pair(sample200, tmp_path_factory):
    """The same 200 pages built on a LocalCluster of 2 workers and with --cluster sync."""
    tmp = tmp_path_factory.mktemp("pair")
    loadlog = tmp / "loads.txt"
    os.environ["PAGECUBE_TEST_LOADLOG"] = str(loadlog)
    try:
        local = pipeline.build(str(sample200), str(tmp / "local.zarr"), cluster="local", workers=2,
                               threads_per_worker=1, model="models_for_tests:counting_tiny", progress=False)
    finally:
        del os.environ["PAGECUBE_TEST_LOADLOG"]
    sync = pipeline.build(str(sample200), str(tmp / "sync.zarr"), cluster="sync", model="tiny", progress=False)
    return local, sync, loadlog


def test_local_build_equals_sync_build(built_pair):
    local, sync, _ = built_pair
    assert local.exit_code == 0 and sync.exit_code == 0
    a = xr.open_zarr(local.store)
    b = xr.open_zarr(sync.store)
    assert (a["status"].values == STATUS_DONE).all()
    assert (b["status"].values == STATUS_DONE).all()
    for name in MODEL_VARS:
        np.testing.assert_allclose(a[name].values.astype(np.float64), b[name].values.astype(np.float64),
                                   atol=1e-5, err_msg=name)


def test_model_loaded_once_per_worker_process(built_pair):
    _, _, loadlog = built_pair
    pids = loadlog.read_text().split()
    assert len(pids) == 2, pids  # two workers, one load each
    assert len(set(pids)) == 2
    assert str(os.getpid()) not in pids  # never loaded on the client


def test_store_matches_manifests(built_pair, sample200):
    local, _, _ = built_pair
    ds = xr.open_zarr(local.store).load()
    cap = ds.sizes["panel"]
    assert cap == 12 and ds.sizes["page"] == 200
    for i, m in enumerate(manifests(sample200)):
        panels = m["panels"]
        keep = sorted(sorted(range(len(panels)), key=lambda j: panels[j]["order_index"])[:cap])
        assert ds["page_id"].values[i] == m["page_id"]
        assert int(ds["n_panels"].values[i]) == len(panels)
        assert ds["series"].values[i] == m["series"] and int(ds["page_num"].values[i]) == m["page_num"]
        mask = ds["panel_mask"].values[i]
        assert mask.sum() == len(keep) and mask[: len(keep)].all()
        np.testing.assert_array_equal(ds["panel_coordinates"].values[i, : len(keep)],
                                      np.array([panels[j]["panel_coords"] for j in keep], np.float32))
        texts = ["\n".join(panels[j]["text"]["dialogue"] + panels[j]["text"]["narration"] + panels[j]["text"]["sfx"])
                 for j in keep]
        assert list(ds["text_content"].values[i, : len(keep)]) == texts
        assert ds["manifest_path"].values[i].endswith(f"page_{i:05d}.json")


def test_attention_and_reading_order_are_well_formed(built_pair):
    local, _, _ = built_pair
    ds = xr.open_zarr(local.store).load()
    mask = ds["panel_mask"].values
    att = ds["attention_weights"].values
    order = ds["reading_order"].values
    for i in range(ds.sizes["page"]):
        n = int(mask[i].sum())
        if n:
            assert abs(att[i][mask[i]].sum() - 1.0) < 1e-5
        assert (att[i][~mask[i]] == 0).all()
        assert sorted(order[i][mask[i]].tolist()) == list(range(n))
        assert (order[i][~mask[i]] == -1).all()
    assert np.isfinite(ds["page_embeddings"].values).all()


def test_store_is_xarray_shaped_with_attrs(built_pair):
    local, _, _ = built_pair
    ds = xr.open_zarr(local.store, consolidated=True)
    assert set(ds.dims) == {"page", "panel", "embedding_dim", "coord"}
    assert not ds.indexes  # no page index coordinate for readers to load
    assert ds["text_content"].dtype.kind == "T"
    for var in ds.data_vars.values():
        assert var.dims[0] == "page"
    attrs = ds.attrs
    assert attrs["model"] == "tiny" and attrs["weights_digest"] == "seed:0"
    assert attrs["model_weights_source"] == "seeded-init"
    assert attrs["max_panels"] == 12 and attrs["embedding_dim"] == ds.sizes["embedding_dim"]
    assert attrs["pagecube_version"] == pipeline.__version__
    assert ds["written_at"].dtype == np.dtype("datetime64[ns]")


def test_resume_recomputes_nothing_when_complete(built_pair, sample200):
    local, _, _ = built_pair
    before = xr.open_zarr(local.store)["written_at"].values.copy()
    again = pipeline.build(str(sample200), local.store, cluster="sync", progress=False,
                           model="models_for_tests:counting_tiny")
    assert again.planned_pages == 0 and again.done == 200
    np.testing.assert_array_equal(xr.open_zarr(local.store)["written_at"].values, before)


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small_store(sample40, tmp_path_factory):
    store = tmp_path_factory.mktemp("small") / "s.zarr"
    pipeline.build(str(sample40), str(store), cluster="sync", model="tiny", progress=False)
    return store


@pytest.mark.parametrize("args, why", [
    (["--max-panels", "8"], "max-panels"),
    (["--seed", "1"], "weights_digest"),
    (["--embedding-dim", "64"], "embedding_dim"),
    (["--chunk-pages", "16"], "chunk-pages"),
    (["--list", "reordered"], "page list changed"),
])
def test_mismatched_store_is_refused_and_untouched(small_store, sample40, tmp_path, args, why):
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    digest = _tree_digest(store)
    pages = sample40
    if args[0] == "--list":
        lines = sample40.read_text().splitlines()
        pages = sample40.parent / "reordered.txt"
        pages.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
        args = []
    proc = run_cli("build", pages, "--out", store, "--cluster", "sync", "--model", "tiny", "--no-progress", *args)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len([ln for ln in err if ln.startswith("pagecube: error:")]) == 1 and why in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _tree_digest(store) == digest


def test_reader_in_another_process_sees_progress_and_never_a_half_page(sample40, tmp_path):
    store = tmp_path / "live.zarr"
    expect_text = tmp_path / "expect.json"
    # pages whose manifest has text in the first kept slot: the reader checks they are never empty when done
    cap = 12
    has_text = {}
    for i, m in enumerate(manifests(sample40)):
        kept = sorted(m["panels"], key=lambda p: p["order_index"])[:cap]
        has_text[i] = any(p["text"]["dialogue"] or p["text"]["narration"] or p["text"]["sfx"] for p in kept)
    expect_text.write_text(json.dumps(has_text))
    run_cli("build", sample40, "--out", store, "--init-only", "--cluster", "sync", "--chunk-pages", "4",
            "--model", "models_for_tests:slow_tiny", check=0)
    reader = subprocess.Popen([sys.executable, str(ROOT / "tests" / "poll_reader.py"), str(store), "40", str(expect_text)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        built = run_cli("build", sample40, "--out", store, "--cluster", "local", "--workers", "2", "--no-progress",
                        "--model", "models_for_tests:slow_tiny", env={"PAGECUBE_TEST_DELAY": "0.15"}, check=0)
    finally:
        out, err = reader.communicate(timeout=60)
    # where the tasks' time went: 10 chunks of 4 pages, one forward each, each sleeping 0.15 s
    phases = re.search(r"task time by phase, summed over tasks: model ([\d.]+) s, waiting for pages "
                       r"\(read \+ prepare\) ([\d.]+) s, writing ([\d.]+) s$", built.stdout, re.M)
    assert phases, built.stdout
    assert 1.5 <= float(phases[1]) < 10 and float(phases[2]) < float(phases[1]), phases[0]
    assert reader.returncode == 0, err
    report = json.loads(out)
    assert report["bad"] == [], report["bad"][:5]
    assert any(0 < d < 40 for d in report["seen_done"]), report["seen_done"]
    assert report["polls"] > 5


def _wait_for_entries(store: Path, n: int, timeout: float) -> None:
    folder = store / "_pagecube" / "chunks"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if folder.is_dir() and len(os.listdir(folder)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} finished chunks within {timeout}s")


def test_killed_build_resumes_and_keeps_finished_pages(sample40, tmp_path):
    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen([*CLI, "build", str(sample40), "--out", str(store), "--workers", "2",
                             "--chunk-pages", "4", "--model", "models_for_tests:slow_tiny", "--no-progress"],
                            env=cli_env({"PAGECUBE_TEST_DELAY": "0.3"}), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_entries(store, 2, timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the client and its whole local cluster
        proc.wait(timeout=30)
    ds = xr.open_zarr(store)
    status = ds["status"].values
    finished = status == STATUS_DONE
    assert 0 < finished.sum() < 40
    stamps = ds["written_at"].values[finished].copy()
    run_cli("build", sample40, "--out", store, "--workers", "2", "--no-progress",
            "--model", "models_for_tests:slow_tiny", env={"PAGECUBE_TEST_DELAY": "0"}, check=0)
    ds = xr.open_zarr(store)
    assert (ds["status"].values == STATUS_DONE).all()
    np.testing.assert_array_equal(ds["written_at"].values[finished], stamps)


def test_summary_by_page_id_or_position(small_store):
    from pipeline.readers import page_summaries

    ds = xr.open_zarr(small_store)
    pid = str(ds["page_id"].values[5])
    by_id = page_summaries(str(small_store), page_id=pid)
    assert by_id[1].startswith(f"page 5  id={pid}")
    assert page_summaries(str(small_store), page_id="@5") == by_id
    proc = run_cli("summary", small_store, "--page-id", "no-such-page")
    assert proc.returncode == 1 and "page id 'no-such-page' is not among the 40 pages" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_io_threads_follow_the_cores_of_local_workers(monkeypatch):
    """On a local cluster each worker reads and prepares pages on its share of the cores: GPU workers
    at least 4 (fewer starve a fast GPU), CPU workers at least 2 (the model shares those cores), and
    at least 4 again where pages come over the network. Elsewhere each task asks its worker (its Dask
    threads are its cores: tests/test_remote.py); off a worker (``--cluster sync``) this machine's."""
    from types import SimpleNamespace

    import dask.system

    from pipeline.build import _worker_cores
    from pipeline.inputs import over_network
    from pipeline.tasks import _read_threads
    from pipeline.types import JobSpec

    job = JobSpec("s.zarr", {}, "run", 40, 8, 12, 64, "float32", "m", "f:m", {})

    def threads(handle, device, remote_pages=False):
        return _read_threads(replace(job, worker_cores=_worker_cores(handle), model_kwargs={"device": device},
                                     pages_over_network=remote_pages))

    def workers(n):
        return SimpleNamespace(worker_spec={f"w{i}": {} for i in range(n)})

    monkeypatch.setattr(dask.system, "CPU_COUNT", 16)
    one_gpu = SimpleNamespace(worker_spec={"gpu-0": {}})
    assert threads(SimpleNamespace(kind="local", n_workers=1, cluster=one_gpu), "cuda") == 16
    assert threads(SimpleNamespace(kind="local", n_workers=0, cluster=one_gpu), "cuda") == 16  # not joined yet
    assert threads(SimpleNamespace(kind="local", n_workers=8, cluster=None), "cuda") == 4
    two_on_one = SimpleNamespace(worker_spec={"gpu-0": {}, "gpu-0.1": {}})  # two workers share the GPU
    assert threads(SimpleNamespace(kind="local", n_workers=0, cluster=two_on_one), "cuda") == 8
    # CPU: the default local cluster is a worker per core, whose model shares that core
    assert threads(SimpleNamespace(kind="local", n_workers=16, cluster=workers(16)), "cpu") == 2
    assert threads(SimpleNamespace(kind="local", n_workers=16, cluster=workers(16)), "cpu", True) == 4
    assert threads(SimpleNamespace(kind="local", n_workers=2, cluster=workers(2)), "cpu") == 8
    assert _worker_cores(SimpleNamespace(kind="remote", n_workers=1, cluster=None)) is None
    assert _worker_cores(SimpleNamespace(kind="slurm", n_workers=16, cluster=None)) is None
    # off a worker with no share sent (--cluster sync): this machine's cores
    cpu, gpu = replace(job, model_kwargs={"device": "cpu"}), replace(job, model_kwargs={"device": "cuda"})
    assert (_read_threads(cpu), _read_threads(gpu)) == (16, 16)
    monkeypatch.setattr(dask.system, "CPU_COUNT", 1)
    assert (_read_threads(cpu), _read_threads(gpu)) == (2, 4)
    assert _read_threads(replace(cpu, pages_over_network=True)) == 4
    assert _read_threads(replace(gpu, worker_cores=8)) == 8  # the share the build sent wins
    assert over_network("s3://bucket/pages.txt") and over_network("https://host/images")
    assert not over_network("pages.txt") and not over_network(None)
    assert not over_network("file:///data/pages.txt") and not over_network("/data/images")


def test_batch_size_defaults_by_device_and_keeps_what_was_asked():
    from pipeline.build import _batch_size

    assert (_batch_size(None, "cpu"), _batch_size(None, "cuda")) == (16, 64)
    assert (_batch_size(8, "cpu"), _batch_size(8, "cuda")) == (8, 8)


def test_default_chunks_of_a_large_corpus_fill_the_last_round_of_tasks(sample40, tmp_path):
    """From 2,048 pages on, equal chunks of at most 256 whose count is a multiple of the tasks the cluster
    runs at once (the last round keeps every worker busy); smaller corpora keep ~n/8 powers of two."""
    from pipeline.plan import default_chunk_pages

    assert [default_chunk_pages(n, 2) for n in (40, 1000, 2048, 3000, 4000, 4001)] == [8, 64, 256, 250, 250, 251]
    assert default_chunk_pages(4000, 1) == 250 and default_chunk_pages(10_000, 8) == 250
    assert default_chunk_pages(3000) == default_chunk_pages(3000, 1)
    # the slots come from the cluster: 2 local workers x 1 thread, 3000 pages (sample40's pages, repeated)
    lines = [str(sample40.parent / line) for line in sample40.read_text().split()] * 75
    listing = tmp_path / "pages3000.txt"
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "big.zarr"
    proc = run_cli("build", listing, "--out", out, "--workers", "2", "--model", "tiny", "--no-progress",
                   "--init-only", check=0)
    assert "(12 chunks of 250)" in proc.stderr, proc.stderr
    assert xr.open_zarr(out)["status"].encoding["chunks"] == (250,)


def test_cli_exit_still_flushes_output_and_runs_cleanups(sample40, tmp_path):
    """The command ends without the interpreter's slow teardown, yet its output arrives whole, its exit
    code stands and its atexit cleanups run (the spawn flag file it made in TMPDIR is gone)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "c.zarr"
    proc = run_cli("build", sample40, "--out", out, "--workers", "2", "--model", "tiny", "--no-progress",
                   "--init-only", env={"TMPDIR": str(tmp)}, check=0)
    assert proc.stdout.strip().endswith(f"initialised {out}: 40 pages pending"), proc.stdout
    assert "created store" in proc.stderr
    assert not list(tmp.glob("pagecube-spawn-*")), list(tmp.iterdir())
    proc = run_cli("build", sample40, "--out", out, "--chunk-pages", "0", env={"TMPDIR": str(tmp)}, check=2)
    assert proc.stderr.strip() == "pagecube: error: --chunk-pages must be a positive number, got 0", proc.stderr
