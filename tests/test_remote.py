"""Builds on clusters started with the `dask scheduler` / `dask worker` commands (issue 4).

A plain-TCP scheduler with a 3-thread and a 1-thread worker and a TLS scheduler with
temporary certificates, all bound to 127.0.0.1; each build must equal a local
build of the same pages. Pre-flight failures (no GPU workers, a model that does
not load, a store the workers cannot write or do not share, pagecube/zarr
version skew) exit 1 with one line before any task. The scheduler's records
hold the build's span with read/inference/write metrics, and its /metrics page
serves the pagecube page counters.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import pipeline
from conftest import ROOT, run_cli
from pipeline.store.schema import STATUS_DONE

HERE = Path(__file__).resolve().parent
MODEL_VARS = ("page_embeddings", "panel_embeddings", "attention_weights", "reading_order")
DASK = [sys.executable, "-m", "dask"]


def _env(fake_versions: dict | None = None, tmp: Path | None = None) -> dict:
    env = dict(os.environ)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)  # a nanny started in this process may have exported dask's value
    paths = [str(HERE), str(ROOT)]
    if fake_versions:
        # A dist-info folder ahead of site-packages: importlib.metadata reports that version
        # on this worker while the real package still imports (what a skewed install looks like).
        meta = tmp / "fake-meta"
        for name, version in fake_versions.items():
            d = meta / f"{name}-{version}.dist-info"
            d.mkdir(parents=True, exist_ok=True)
            (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        paths.insert(0, str(meta))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    # Workers start without dask's MALLOC_TRIM_THRESHOLD_ (measured: it slows torch inference)
    env["DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"] = '{"MALLOC_TRIM_THRESHOLD_": None}'
    return env


class DaskProcs:
    """A `dask scheduler` and `dask worker` processes in their own sessions; stopped by PID."""

    def __init__(self, tmp: Path, tls_args=(), protocol="tcp"):
        self.tmp, self.tls_args, self.procs = tmp, list(tls_args), []
        sfile = tmp / "scheduler.json"
        self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                                  "127.0.0.1:0", "--scheduler-file", str(sfile), "--protocol", protocol,
                                  *self.tls_args], _env())
        deadline = time.monotonic() + 60
        while not sfile.exists() or not sfile.read_text().strip():
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                raise RuntimeError((tmp / "scheduler.log").read_text())
            time.sleep(0.1)
        info = json.loads(sfile.read_text())
        self.address = info["address"]
        self.dashboard_port = info["services"]["dashboard"]

    def _spawn(self, name, args, env):
        with open(self.tmp / f"{name}.log", "w") as log:
            p = subprocess.Popen(DASK + args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def add_worker(self, name, env=None, nthreads=1):
        return self._spawn(name, ["worker", self.address, "--nthreads", str(nthreads), "--host", "127.0.0.1",
                                  "--no-dashboard", *self.tls_args], env or _env())

    def wait_workers(self, n, security=None, timeout=60):
        from distributed import Client

        with Client(self.address, security=security, timeout=30) as c:
            c.wait_for_workers(n, timeout=timeout)

    def stop(self, procs=None):
        procs = list(reversed(procs if procs is not None else self.procs))
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)  # its own session: the worker and its nanny's child
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    """Both clusters, started at once (they come up while the reference store is built).

    tcp: `dask scheduler` + `dask worker --nthreads 3` and `--nthreads 1`, the second reporting
    another torch version; tls: a scheduler and one worker with temporary certificates.
    """
    from cluster.tls import write_temporary_certs

    tmp = tmp_path_factory.mktemp("tcp-cluster")
    tls_tmp = tmp_path_factory.mktemp("tls-cluster")
    ca, cert, key = write_temporary_certs(tls_tmp / "certs")
    tls_args = ["--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key]
    started = []
    try:
        tcp = DaskProcs(tmp)
        started.append(tcp)
        tcp.add_worker("worker-a", nthreads=3)
        tcp.add_worker("worker-b", _env({"torch": "2.0.0"}, tmp))
        tls = DaskProcs(tls_tmp, tls_args, protocol="tls")
        started.append(tls)
        tls.add_worker("worker")
        yield tcp, tls
    finally:
        for c in started:
            c.stop()


@pytest.fixture(scope="module")
def tcp_cluster(clusters):
    return clusters[0]


@pytest.fixture(scope="module")
def reference(clusters, sample40, tmp_path_factory):
    """The same pages built on this machine (a LocalCluster)."""
    out = tmp_path_factory.mktemp("reference") / "local.zarr"
    res = pipeline.build(str(sample40), str(out), cluster="local", workers=1, threads_per_worker=1,
                         chunk_pages=8, model="tiny", progress=False)
    assert res.exit_code == 0
    return out


def assert_same_store(a_path, b_path):
    a, b = xr.open_zarr(a_path), xr.open_zarr(b_path)
    assert (a["status"].values == STATUS_DONE).all() and (b["status"].values == STATUS_DONE).all()
    assert (a["page_id"].values == b["page_id"].values).all()
    for name in MODEL_VARS:
        np.testing.assert_allclose(a[name].values.astype(np.float64), b[name].values.astype(np.float64),
                                   atol=1e-5, err_msg=name)
    assert (a["text_content"].values == b["text_content"].values).all()


def test_build_on_dask_scheduler_and_workers(tcp_cluster, reference, sample40, tmp_path):
    tcp_cluster.wait_workers(2)
    out = tmp_path / "remote.zarr"
    proc = run_cli("build", sample40, "--out", out, "--cluster", tcp_cluster.address, "--chunk-pages", 8,
                   "--model", "tiny", "--preflight-timeout", 30, check=0)
    assert_same_store(reference, out)
    err = proc.stderr
    # the dashboard link and plain progress lines (not a terminal), the torch skew as a warning only
    assert f"Dask dashboard at http://127.0.0.1:{tcp_cluster.dashboard_port}/status" in err, err
    assert "pages 40/40 (done 40, failed 0)" in err and "pages/s ETA" in err, err
    assert "warning: version skew: torch:" in err and "2.0.0 (1)" in err, err
    from distributed import Client

    # defined here so that it is pickled by value for the scheduler
    def _span_metrics(dask_scheduler=None):
        spans = dask_scheduler.extensions["spans"].spans
        out = {}
        for s in spans.values():
            if s.name and s.name[0].startswith("pagecube-build-"):
                labels = {}
                for key, v in s.cumulative_worker_metrics.items():
                    if key[0] == "execute" and key[-1] == "seconds":
                        labels[key[-2]] = labels.get(key[-2], 0.0) + v
                out[s.name[0]] = {"labels": labels, "done": s.done}
        return out

    with Client(tcp_cluster.address, timeout=30) as c:
        # workers run without MALLOC_TRIM_THRESHOLD_
        assert all(v is None for v in c.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")).values())
        # each worker read pages on as many threads as its cores, which are its Dask threads here
        # (at least 2 on CPU): 3 on the 3-thread worker, 2 on the 1-thread one
        readers = c.run(lambda: sum(t.name.startswith("pagecube-read") for t in threading.enumerate()))
        nthreads = c.nthreads()
        assert sorted((nthreads[w], n) for w, n in readers.items()) == [(1, 2), (3, 3)], (readers, nthreads)
        # the build's span, with fine performance metrics for reading, inference and writing
        deadline = time.monotonic() + 20
        while True:
            spans = c.run_on_scheduler(_span_metrics)
            labels = next(iter(spans.values()))["labels"] if spans else {}
            if all(labels.get(k, 0) > 0 for k in ("read", "inference", "write")) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(spans) == 1, spans
        assert all(labels.get(k, 0) > 0 for k in ("read", "inference", "write")), labels
    # the scheduler's Prometheus page counts the pages
    body = urllib.request.urlopen(f"http://127.0.0.1:{tcp_cluster.dashboard_port}/metrics", timeout=10).read().decode()
    values = {ln.split()[0]: float(ln.split()[1]) for ln in body.splitlines() if ln.startswith("pagecube_pages_")}
    assert values.get("pagecube_pages_done_total") == 40.0, values
    assert values.get("pagecube_pages_failed_total") == 0.0, values


def test_device_cuda_without_gpu_workers_fails_fast(tcp_cluster, sample40, tmp_path):
    t0 = time.monotonic()
    proc = run_cli("build", sample40, "--out", tmp_path / "gpu.zarr", "--cluster", tcp_cluster.address,
                   "--device", "cuda", "--model", "tiny", "--preflight-timeout", 10, check=1)
    assert time.monotonic() - t0 < 40
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("pagecube: error:") and "GPU" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "gpu.zarr" / "zarr.json").exists()


def test_local_cuda_without_gpu_fails_fast(sample40, tmp_path):
    pytest.importorskip("torch")
    from cluster.targets import gpu_ids

    from cluster import ClusterError

    if gpu_ids():
        pytest.skip("this machine has a GPU")
    # decided: no silent fall-back to CPU; a ClusterError is one line and exit 1 on the command line
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match="device cuda requested but no CUDA GPU is visible"):
        pipeline.build(str(sample40), str(tmp_path / "gpu.zarr"), cluster="local", device="cuda", model="tiny",
                       progress=False)
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "gpu.zarr").exists()


def test_preflight_failures_are_one_line_before_any_task(tcp_cluster, sample40, tmp_path):
    from pipeline.build import BuildError
    from pipeline.preflight import PreflightError

    addr = tcp_cluster.address
    # the model does not load on the workers: their error, one line (exit 1 on the command line)
    with pytest.raises(BuildError, match=r"could not be loaded: .*corrupt \(test\)") as info:
        pipeline.build(str(sample40), str(tmp_path / "m.zarr"), cluster=addr, model="resident_factory:broken",
                       progress=False, preflight_timeout=20)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m.zarr" / "zarr.json").exists()
    # a store the workers cannot write (its parent is a file)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(PreflightError, match="not writable from the workers"):
        pipeline.build(str(sample40), str(blocker / "s.zarr"), cluster=addr, model="tiny", progress=False,
                       preflight_timeout=20)
    # a store the workers write somewhere this process cannot see (each process has its own memory://)
    with pytest.raises(PreflightError, match="not shared with the workers"):
        pipeline.build(str(sample40), "memory://pagecube-preflight/s.zarr", cluster=addr, model="tiny", progress=False,
                       preflight_timeout=20)


def test_zarr_major_skew_is_an_error(tcp_cluster, sample40, tmp_path):
    w = tcp_cluster.add_worker("worker-old-zarr", _env({"zarr": "2.18.3"}, tmp_path))
    try:
        tcp_cluster.wait_workers(3)
        from pipeline.preflight import PreflightError

        with pytest.raises(PreflightError, match=r"version skew .*zarr 2\.18\.3 on worker tcp://"):
            pipeline.build(str(sample40), str(tmp_path / "skew.zarr"), cluster=tcp_cluster.address, model="tiny", progress=False,
                           preflight_timeout=20)
        assert not (tmp_path / "skew.zarr" / "zarr.json").exists()
    finally:
        tcp_cluster.stop([w])


def test_tls_build_and_refusals(clusters, reference, sample40, tmp_path):
    from cluster import ClusterError, make_security
    from cluster.tls import write_temporary_certs

    c = clusters[1]
    tls = c.tls_args
    assert c.address.startswith("tls://127.0.0.1:")
    out = tmp_path / "tls.zarr"
    run_cli("build", sample40, "--out", out, "--cluster", c.address, "--chunk-pages", 8, *tls,
            "--model", "tiny", "--preflight-timeout", 60, check=0)
    assert_same_store(reference, out)
    # no certificates: refused with one clear line
    with pytest.raises(ClusterError, match="uses TLS but no certificates"):
        pipeline.build(str(sample40), str(tmp_path / "x.zarr"), cluster=c.address, model="tiny", progress=False,
                       preflight_timeout=3)
    # certificates from another authority: refused
    other = make_security(*write_temporary_certs(tmp_path / "other-certs"))
    with pytest.raises(ClusterError, match="cannot connect to scheduler"):
        pipeline.build(str(sample40), str(tmp_path / "y.zarr"), cluster=c.address, security=other,
                       model="tiny", progress=False, preflight_timeout=3)
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()
