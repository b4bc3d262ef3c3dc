"""cluster/: real Dask on 127.0.0.1, no mocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # workers import resident_factory (spawned children inherit sys.path)
    sys.path.insert(0, str(HERE))

import cluster  # noqa: E402
from cluster import (  # noqa: E402
    ClusterError,
    ResidentMissing,
    check_workers,
    get_resident,
    install_resident,
    kubernetes_cluster_spec,
    open_cluster,
    resident_status,
    slurm_job_script,
    versions_skew,
)
from cluster.tls import make_security, write_temporary_certs  # noqa: E402

FACTORY = "resident_factory:make_counter"
KW = {"tag": "t1"}


def use_resident(x, name):
    """A task body: same code on a worker and on the sync target."""
    counter = get_resident(name, fallback=(FACTORY, KW))
    return counter(x)


def worker_env(dask_worker=None):
    return {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}


def loads_here():
    import resident_factory

    return os.getpid(), resident_factory.LOADS


def test_cluster_never_imports_pipeline():
    for p in (ROOT / "cluster").glob("*.py"):
        src = p.read_text()
        assert "import pipeline" not in src and "from pipeline" not in src, p


@pytest.fixture(scope="module")
def local2():
    with open_cluster("local", workers=2, threads_per_worker=1, timeout=30) as h:
        yield h


def test_local_resident_loaded_once_per_worker(local2):
    h = local2
    assert h.kind == "local" and h.n_workers == 2 and not h.gpu and h.task_resources is None
    assert h.dashboard_link is None or "127.0.0.1" in h.dashboard_link
    client = h.client
    name = install_resident(client, FACTORY, KW)
    assert install_resident(client, FACTORY, KW) == name  # idempotent: no reload
    futs = [client.submit(use_resident, i, name, pure=False) for i in range(20)]
    results = client.gather(futs)
    assert [r["x"] for r in results] == [2 * i for i in range(20)]
    assert all(r["tag"] == "t1" for r in results)
    status = resident_status(client, name)
    assert len(status) == 2 and all(s["ok"] and s["loads"] == 1 for s in status.values())
    assert all(s["torch_threads"] in (1, None) for s in status.values())
    per_process = client.run(loads_here)
    assert sorted(pid for pid, _ in per_process.values()) == sorted(s["pid"] for s in status.values())
    assert all(n == 1 for _, n in per_process.values()), per_process
    assert {r["pid"] for r in results} <= {s["pid"] for s in status.values()}


def test_local_workers_have_no_malloc_trim(local2):
    envs = local2.client.run(worker_env)
    assert envs and all(e["MALLOC_TRIM_THRESHOLD_"] is None for e in envs.values()), envs


def dask_timers(dask_worker=None):
    import dask

    from cluster.timers import LOCAL_TIMERS

    return {key: dask.config.get(key) for key in LOCAL_TIMERS}


def test_local_cluster_slows_dask_timers_and_keeps_the_users_own():
    """Workers and scheduler of a local cluster run Dask's housekeeping at pagecube's step; a value the
    user configured is kept."""
    import dask

    from cluster.timers import LOCAL_TIMERS, local_timers

    ours = {key: value for key, (_, value) in LOCAL_TIMERS.items()}
    with dask.config.set({"distributed.worker.profile.interval": "30ms"}):
        assert "distributed.worker.profile.interval" not in local_timers()
        with open_cluster("local", workers=1, threads_per_worker=1, timeout=30) as h:
            on_workers = h.client.run(dask_timers)
            on_scheduler = h.client.run_on_scheduler(dask_timers)
    want = {**ours, "distributed.worker.profile.interval": "30ms"}
    assert list(on_workers.values()) == [want], on_workers
    assert on_scheduler["distributed.admin.tick.interval"] == "1s", on_scheduler


def heartbeat_ms(dask_worker):
    return dask_worker.periodic_callbacks["heartbeat"].callback_time


def last_seen(dask_scheduler):
    return {address: ws.last_seen for address, ws in dask_scheduler.workers.items()}


def test_local_workers_heartbeat_every_two_seconds_and_are_still_seen():
    """Dask asks a small cluster's workers for a heartbeat every 0.5 s; a local cluster's scheduler answers
    with LOCAL_HEARTBEAT_S instead, and the heartbeats still arrive (the scheduler's last-seen moves on)."""
    from cluster.timers import LOCAL_HEARTBEAT_S

    with open_cluster("local", workers=2, threads_per_worker=1, timeout=30) as h:
        deadline = time.monotonic() + 10
        while set(h.client.run(heartbeat_ms).values()) != {LOCAL_HEARTBEAT_S * 1000} and time.monotonic() < deadline:
            time.sleep(0.2)  # a worker takes the interval from the answer to its first heartbeat
        assert set(h.client.run(heartbeat_ms).values()) == {2000.0}
        seen = h.client.run_on_scheduler(last_seen)
        time.sleep(2 * LOCAL_HEARTBEAT_S + 0.5)
        later = h.client.run_on_scheduler(last_seen)
    assert seen.keys() == later.keys() and len(seen) == 2
    assert all(later[a] > seen[a] for a in seen), (seen, later)


def test_failing_factory_reports_error_text(local2):
    with pytest.raises(ResidentMissing, match="checkpoint weights.safetensors is corrupt"):
        install_resident(local2.client, "resident_factory:broken", {"k": 1})
    name = cluster.resident.resident_name("resident_factory:broken", {"k": 1})
    fut = local2.client.submit(get_resident, name, pure=False)
    with pytest.raises(ResidentMissing, match="corrupt"):
        fut.result()


def test_need_gpu_on_cpu_cluster_fails_fast(local2):
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=r"no worker offers resource GPU=1; start workers with --resources GPU=1"):
        check_workers(local2.client, timeout=30, need_resources={"GPU": 1})
    assert time.monotonic() - t0 < 10
    assert set(check_workers(local2.client, timeout=5)) == set(local2.client.scheduler_info(n_workers=-1)["workers"])


def test_versions_skew_none_locally(local2):
    assert versions_skew(local2.client, extra=("pagecube", "not-a-real-package-xyz")) == []


def test_local_nanny_restarting_its_worker_is_not_closed():
    """Dask's SpecCluster closes a nanny for good when its worker is still away lost-worker-timeout
    (15 s) after it left; shortened here below the time a restart takes, a killed worker would never
    come back. A local cluster of ours keeps its nannies: the worker is replaced."""
    import dask

    with dask.config.set({"distributed.deploy.lost-worker-timeout": "100ms"}), \
            open_cluster("local", workers=1, threads_per_worker=1, timeout=30) as h:
        (pid,) = h.client.run(os.getpid).values()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while set(h.client.run(os.getpid, on_error="ignore").values()) in (set(), {pid}):
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.1)
        time.sleep(0.5)  # past the (shortened) timeout once more
        assert len(h.cluster.workers) == 1 and len(h.client.nthreads()) == 1


def test_gpu_spec_cluster_pins_one_device_per_worker():
    # The one-worker-per-GPU layout, run on CPU with device ids given explicitly.
    import dask
    from distributed import Client

    from cluster.targets import NO_MALLOC_TRIM, gpu_spec_cluster

    with dask.config.set(NO_MALLOC_TRIM):
        spec = gpu_spec_cluster(["0", "1"])
    with spec, Client(spec) as client:
        client.wait_for_workers(2, timeout=30)
        info = check_workers(client, timeout=10, need_resources={"GPU": 1})
        assert sorted(w["resources"]["GPU"] for w in info.values()) == [1, 1]
        envs = client.run(worker_env)
        assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in envs.values()) == ["0", "1"]
        assert all(e["MALLOC_TRIM_THRESHOLD_"] is None for e in envs.values())
        seen = client.gather([client.submit(worker_env, pure=False, resources={"GPU": 1}) for _ in range(4)])
        assert {e["CUDA_VISIBLE_DEVICES"] for e in seen} <= {"0", "1"}


def test_several_workers_share_a_gpu_each_pinned_to_it():
    """Workers beyond the GPU count go round the devices in turn, each seeing only its own device and
    offering GPU=1 (run on CPU with device ids given explicitly: the spec, its env and resources are
    what a GPU machine gets)."""
    import dask
    from distributed import Client

    from cluster.targets import NO_MALLOC_TRIM, gpu_spec_cluster

    with dask.config.set(NO_MALLOC_TRIM):
        spec = gpu_spec_cluster(["3"], workers=2)
    with spec, Client(spec) as client:
        client.wait_for_workers(2, timeout=30)
        assert sorted(spec.workers) == ["gpu-0", "gpu-0.1"]
        info = check_workers(client, timeout=10, need_resources={"GPU": 1})
        assert sorted(w["resources"]["GPU"] for w in info.values()) == [1, 1]
        assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in client.run(worker_env).values()) == ["3", "3"]


def test_gpu_worker_placement_defaults_to_about_four_cores_a_worker():
    from cluster.placement import default_workers_per_gpu, gpu_workers

    assert default_workers_per_gpu(1, 16) == 4  # the H200 machine measured: 16 cores, one GPU
    assert default_workers_per_gpu(1, 2) == 1 and default_workers_per_gpu(1, 64) == 4  # 1 to 4 per GPU
    assert default_workers_per_gpu(8, 64) == 2 and default_workers_per_gpu(8, 16) == 1
    assert default_workers_per_gpu(0, 16) == 0
    assert gpu_workers(["0", "1"], 4) == [("gpu-0", "0"), ("gpu-1", "1"), ("gpu-0.1", "0"), ("gpu-1.1", "1")]
    assert gpu_workers(["0", "1"], 1) == [("gpu-0", "0")]  # fewer workers than GPUs: the first ones
    assert gpu_workers(["MIG-a", "MIG-b"], 3) == [("gpu-0", "MIG-a"), ("gpu-1", "MIG-b"), ("gpu-0.1", "MIG-a")]
    assert gpu_workers([], 4) == []


def test_no_visible_gpu_means_no_gpu_ids(monkeypatch):
    """Asserts on every machine without a GPU, whichever torch build it has (a plain index gives a
    CUDA build on Linux): no GPU ids, and ``--device cuda`` is refused, never a CPU fall-back."""
    import torch

    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")

    def no_gpu(why: str):
        assert cluster.targets.gpu_ids() == []
        with pytest.raises(ClusterError, match=f"no CUDA GPU is visible{why}"):
            with open_cluster("local", device="cuda"):
                pass

    no_gpu(r" \(torch .* is a CPU-only build\)" if not torch.version.cuda else "")
    # the paths a CUDA build takes, on this machine: a CPU build reports 0 devices as a CUDA build
    # without a driver or a GPU does
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "12.8")
    no_gpu("")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # names devices that are not there
    no_gpu(r" \(CUDA_VISIBLE_DEVICES='0,1'\)")


def test_sync_target_runs_same_task_in_process():
    with open_cluster("sync") as h:
        assert h.client is None and h.kind == "sync"
        name = install_resident(h.client, FACTORY, KW)
        out = [use_resident(i, name) for i in range(3)]
    assert {r["pid"] for r in out} == {os.getpid()}
    assert [r["x"] for r in out] == [0, 2, 4]
    assert check_workers(None, timeout=1) == {} and versions_skew(None) == []


@pytest.mark.parametrize(
    "target", ["tcp:/nope", "gpu", "", "http://127.0.0.1:8786", "missing-spec.yaml"]
)
def test_invalid_target(target):
    with pytest.raises(ValueError) as e:
        with open_cluster(target):
            pass
    msg = str(e.value)
    assert "\n" not in msg
    assert "valid targets" in msg or "not found" in msg


def test_invalid_device():
    with pytest.raises(ValueError, match="device must be one of"):
        with open_cluster("sync", device="tpu"):
            pass


# --- a running scheduler in subprocesses -------------------------------------------------


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    env["DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"] = '{"MALLOC_TRIM_THRESHOLD_": None}'
    return env


def _start_remote(tmp_path, tls_args=(), protocol="tcp", worker=True):
    sfile = tmp_path / "scheduler.json"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    procs = []
    with open(tmp_path / "scheduler.log", "w") as log:
        procs.append(
            subprocess.Popen(
                dask + ["--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
                        "--scheduler-file", str(sfile), "--protocol", protocol, *tls_args],
                env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        )
    deadline = time.monotonic() + 30
    while not sfile.exists() or not sfile.read_text().strip():
        if time.monotonic() > deadline or procs[0].poll() is not None:
            raise RuntimeError((tmp_path / "scheduler.log").read_text())
        time.sleep(0.1)
    address = json.loads(sfile.read_text())["address"]
    if not worker:
        return address, procs
    with open(tmp_path / "worker.log", "w") as wlog:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                 "--host", "127.0.0.1", "--no-dashboard", *tls_args],
                env=_env(), stdout=wlog, stderr=subprocess.STDOUT, start_new_session=True,
            )
        )
    return address, procs


def _stop(procs):
    for p in reversed(procs):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)  # own session: the worker and its nanny child
    for p in reversed(procs):
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def test_remote_tcp_target(tmp_path):
    address, procs = _start_remote(tmp_path)
    try:
        assert address.startswith("tcp://127.0.0.1:")
        with open_cluster(address, timeout=30) as h:
            assert h.kind == "remote" and h.n_workers == 1 and not h.gpu
            name = install_resident(h.client, FACTORY, KW)
            assert h.client.submit(use_resident, 21, name, pure=False).result()["x"] == 42
            assert all(e["MALLOC_TRIM_THRESHOLD_"] is None for e in h.client.run(worker_env).values())
            assert versions_skew(h.client) == []
    finally:
        _stop(procs)


def test_remote_without_workers_times_out_clearly(tmp_path):
    address, procs = _start_remote(tmp_path, worker=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match="Dask workers joined"):
            with open_cluster(address, timeout=2):
                pass
        assert time.monotonic() - t0 < 10
    finally:
        _stop(procs)


def test_remote_tls_target(tmp_path):
    ca, cert, key = write_temporary_certs(tmp_path / "certs")
    tls_args = ["--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key]
    address, procs = _start_remote(tmp_path, tls_args, protocol="tls")
    try:
        assert address.startswith("tls://127.0.0.1:")
        sec = make_security(ca, cert, key)
        with open_cluster(address, security=sec, timeout=30) as h:
            assert h.n_workers == 1
            assert h.client.submit(lambda x: x + 1, 1).result() == 2
        # a client without TLS is refused, with one clear line
        with pytest.raises(ClusterError, match="cannot connect to scheduler"):
            with open_cluster(address.replace("tls://", "tcp://"), timeout=3):
                pass
        with pytest.raises(ClusterError, match="uses TLS but no certificates"):
            with open_cluster(address, security=None, timeout=3):
                pass
    finally:
        _stop(procs)


def test_make_security_errors(tmp_path):
    assert make_security() is None  # no TLS in Dask config: plain TCP
    with pytest.raises(ValueError, match="missing: tls_cert"):
        make_security(tls_ca_file=str(tmp_path / "ca.pem"))
    with pytest.raises(ValueError, match="not found"):
        make_security(str(tmp_path / "ca.pem"), str(tmp_path / "c.pem"))


# --- offline specs ---------------------------------------------------------------------


def test_slurm_job_script_gpu():
    script = slurm_job_script({"kind": "slurm", "workers": 4, "gpus_per_worker": 1, "cores": 8, "memory": "32GB",
                               "walltime": "01:00:00"})
    assert "#SBATCH --gres=gpu:1" in script
    assert "--resources GPU=1" in script
    assert "MALLOC_TRIM_THRESHOLD_" in script and "None" in script
    cpu = slurm_job_script({"kind": "slurm", "workers": 2, "cores": 2, "memory": "4GB"})
    assert "--gres" not in cpu and "--resources" not in cpu
    pbs = slurm_job_script({"kind": "pbs", "gpus_per_worker": 1, "cores": 4, "memory": "8GB"})
    assert "#PBS -l ngpus=1" in pbs and "--resources GPU=1" in pbs


def test_spec_file_validation(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: lsf\nworkers: 2\n")
    with pytest.raises(ValueError, match="kind must be one of slurm, pbs, kubernetes"):
        with open_cluster(str(bad)):
            pass
    gpus = tmp_path / "gpus.yaml"
    gpus.write_text("kind: slurm\ngpus_per_worker: 2\n")
    with pytest.raises(ValueError, match="gpus_per_worker must be 0 or 1"):
        with open_cluster(str(gpus)):
            pass


def test_kubernetes_spec_gpu_on_worker_only():
    spec = kubernetes_cluster_spec({"kind": "kubernetes", "workers": 3, "gpus_per_worker": 1,
                                    "image": "example/pagecube:1"})
    worker = spec["spec"]["worker"]["spec"]["containers"][0]
    sched = spec["spec"]["scheduler"]["spec"]["containers"][0]
    assert spec["spec"]["worker"]["replicas"] == 3
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in json.dumps(sched)
    assert "--resources" in worker["args"] and "GPU=1" in worker["args"]
    assert any(e["name"] == "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON" for e in worker["env"])


def test_slurm_spec_without_sbatch_is_one_clear_line(tmp_path):
    import shutil

    if shutil.which("sbatch"):
        pytest.skip("a real SLURM is here")
    spec = tmp_path / "slurm.yaml"
    spec.write_text("kind: slurm\nworkers: 2\ngpus_per_worker: 1\ncores: 1\nmemory: 1GB\n")
    with pytest.raises(ClusterError, match="needs `sbatch` on PATH"):
        with open_cluster(str(spec), timeout=3):
            pass


def test_missing_optional_package_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import now fails
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    with pytest.raises(ImportError, match=r"install pagecube\[slurm\]"):
        slurm_job_script({"kind": "slurm", "cores": 1, "memory": "1GB"})
    with pytest.raises(ImportError, match=r"install pagecube\[k8s\]"):
        kubernetes_cluster_spec({"kind": "kubernetes"})
