"""Open a Dask cluster from one target string and close it cleanly.

Targets: "local" (processes sized to this machine; where there are GPUs,
workers pinned to them, as many per GPU as the cores feed), "sync" (no
distributed, in-process debugging), "tcp://HOST:PORT" / "tls://HOST:PORT" (a
running scheduler), or a YAML spec file for SLURM/PBS (dask-jobqueue) or
Kubernetes (dask-kubernetes). Dask's ``MALLOC_TRIM_THRESHOLD_`` pre-spawn
setting is removed before any local worker starts: measured, it slowed torch
inference 27-49%.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import dask

from .errors import ClusterError
from .specs import OWN_KEYS as OWN_SPEC_KEYS  # noqa: I001
from .specs import JOBQUEUE_KINDS, KUBE_SPEC_KEYS, jobqueue_kwargs, kubernetes_cluster_spec, load_spec
from .timers import LOCAL_CLUSTER_SYNC_S, local_timers, slow_heartbeats

__all__ = ["ClusterError", "ClusterHandle", "gpu_ids", "open_cluster", "VALID_TARGETS"]

VALID_TARGETS = "local, sync, tcp://HOST:PORT, tls://HOST:PORT, or a path to a YAML cluster spec (.yaml/.yml)"
NO_MALLOC_TRIM = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
#: A SpecCluster (LocalCluster's base) closes a worker's nanny for good when, ``lost-worker-timeout``
#: (15 s) after that worker left the scheduler, no worker of its name is registered at that very
#: instant: meant for a batch job that is gone, it also closes a local nanny that is only restarting
#: its worker. Measured: a task that crashes every worker it reaches had the nanny of a 1-worker
#: cluster closed 15 s after the first crash, leaving no worker for ever (with the timeout shortened,
#: the 2-worker fault test lost both nannies the same way and hung). Local nannies restart their
#: workers themselves (and close when they cannot): never close them.
KEEP_LOCAL_NANNIES = {"distributed.deploy.lost-worker-timeout": "3650 days"}
DEVICES = ("cpu", "cuda", "auto")


@dataclass
class ClusterHandle:
    """What callers need from an open cluster; ``client`` is None on the sync target."""

    client: Any
    kind: str  # "local" | "sync" | "remote" | "spec"
    dashboard_link: str | None = None
    n_workers: int = 0
    gpu: bool = False
    cluster: Any = field(default=None, repr=False)

    @property
    def task_resources(self) -> dict | None:
        """Resources each model task should ask for: {"GPU": 1} on GPU clusters."""
        return {"GPU": 1} if self.gpu else None


def gpu_ids() -> list[str]:
    """Device ids to pin one worker each to, without creating a CUDA context here.

    ``torch.cuda.device_count()`` asks the driver (or NVML) for a count and does
    not initialise a CUDA context, so the client holds no GPU memory; workers
    are spawned, not forked, so client-side CUDA state cannot leak into them.
    When ``CUDA_VISIBLE_DEVICES`` is set its entries (indices, UUIDs or MIG ids)
    are used as given, so worker i sees exactly the i-th device the user allowed.
    """
    from .forkserver import torch_cuda_build

    if torch_cuda_build() is False:
        return []  # CPU-only build (or no torch), known without importing torch (1.5 s on a client)
    try:
        import torch
    except ImportError:
        return []
    if not getattr(torch.version, "cuda", None):
        return []  # CPU-only build
    try:
        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken driver means no usable GPU
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if any(v.startswith("-") for v in ids):
            ids = ids[: next(i for i, v in enumerate(ids) if v.startswith("-"))]
        return ids[:count]
    return [str(i) for i in range(count)]


def _why_no_gpu() -> str:
    try:
        import torch
    except ImportError:
        return " (torch is not installed)"
    if not getattr(torch.version, "cuda", None):
        return f" (torch {torch.__version__} is a CPU-only build)"
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})"
    return ""


def _cpu_count() -> int:
    # dask.system.CPU_COUNT honours CPU affinity and cgroup quotas (containers).
    from dask.system import CPU_COUNT

    return max(1, int(CPU_COUNT))


def _dashboard(client) -> str | None:
    try:
        link = client.dashboard_link
    except Exception:  # noqa: BLE001 - no dashboard (bokeh missing) is not an error
        return None
    return link or None


def _n_workers(client) -> int:
    from .preflight import workers_info

    return len(workers_info(client))


def _offers_gpu(client) -> bool:
    from .preflight import workers_info

    workers = workers_info(client).values()
    return any((w.get("resources") or {}).get("GPU", 0) >= 1 for w in workers)


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")


@contextlib.contextmanager
def open_cluster(
    target: str = "local",
    *,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    device: str = "cpu",
    dashboard_address: str | None = "127.0.0.1:0",
    security=None,
    timeout: float = 60,
    preload_modules: Sequence[str] = (),
    warm_modules: Sequence[str] = (),
) -> Iterator[ClusterHandle]:
    """Yield a ``ClusterHandle`` for ``target``; close client and cluster on exit.

    ``device``: "cpu" never asks for GPUs; "cuda" requires them (error if
    none); "auto" uses GPUs where there are some. Invalid targets raise
    ``ValueError`` with the list of valid ones. ``preload_modules``: for a
    local CPU cluster, workers are forked from a server that imported these
    (see ``cluster.forkserver``; ``start_forkserver`` may start it earlier).
    ``warm_modules``: what each such forked worker imports in the background once
    it has started (what its first task needs, but joining the cluster does not).
    """
    _check_device(device)
    if not isinstance(target, (str, os.PathLike)):
        raise ValueError(f"cluster target must be a string: {VALID_TARGETS}")
    target = os.fspath(target)
    if target == "sync":
        with dask.config.set(scheduler="sync"):
            yield ClusterHandle(client=None, kind="sync", n_workers=0, gpu=False)
        return
    if target == "local":
        with _open_local(workers, threads_per_worker, device, dashboard_address, security, timeout,
                         preload_modules, warm_modules) as h:
            yield h
        return
    if target.startswith(("tcp://", "tls://")):
        with _open_remote(target, device, security, timeout) as h:
            yield h
        return
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        with _open_spec(target, device, dashboard_address, security, timeout) as h:
            yield h
        return
    raise ValueError(f"unknown cluster target {target!r}; valid targets: {VALID_TARGETS}")


def gpu_spec_cluster(ids, threads_per_worker=1, dashboard_address="127.0.0.1:0", security=None, workers=None):
    """A SpecCluster of Nannies pinned to GPUs, each worker seeing only its own device.

    ``workers``: how many in all, spread over ``ids`` in turn (``cluster.placement``); None: one
    per GPU. ``LocalCluster(env=...)`` would give every worker the same env, hence a spec. Each
    worker offers ``{"GPU": 1}``, so a worker runs one model task at a time, and several workers
    on one GPU take turns on it. Call inside ``dask.config.set(NO_MALLOC_TRIM)``.
    """
    from distributed import Nanny, Scheduler, SpecCluster

    from .placement import gpu_workers

    protocol = "tls://" if security is not None and getattr(security, "require_encryption", False) else "tcp://"
    worker_specs = {
        name: {
            "cls": Nanny,
            "options": {
                "nthreads": threads_per_worker,
                "env": {"CUDA_VISIBLE_DEVICES": str(dev)},
                "resources": {"GPU": 1},
                "host": "127.0.0.1",
                "protocol": protocol,
                "security": security,
                "silence_logs": logging.WARNING,
            },
        }
        for name, dev in gpu_workers(list(ids), len(ids) if workers is None else workers)
    }
    scheduler = {
        "cls": Scheduler,
        "options": {
            "host": "127.0.0.1",
            "port": 0,
            "protocol": protocol,
            "security": security,
            "dashboard_address": dashboard_address,
        },
    }
    return SpecCluster(workers=worker_specs, scheduler=scheduler, security=security, silence_logs=logging.WARNING,
                       scheduler_sync_interval=LOCAL_CLUSTER_SYNC_S)


def _pre_spawn_env() -> dict[str, str]:
    """What a Nanny sets before spawning a worker (Dask's own rule: the environment wins)."""
    cfg = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    return {k: os.environ.get(k, str(v)) for k, v in cfg.items() if v is not None}


@contextlib.contextmanager
def _worker_start(preload_modules, warm_modules=()):
    """Config and Nanny ``env`` that fork local CPU workers from the preloaded forkserver, held for
    the cluster's life (a Nanny reads the start method again when it restarts a killed worker)."""
    env = None
    if preload_modules:
        from .forkserver import WARM_KEY, forkserver_worker_env, start_forkserver

        if start_forkserver(preload_modules):
            env = forkserver_worker_env(_pre_spawn_env())
        if env is not None and warm_modules:
            env = {**env, WARM_KEY: ",".join(warm_modules)}
    if env is None:
        yield {}
        return
    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        yield {"env": env, "preload": ["cluster.forkserver"]}


def _ignore_sigint_preload() -> dict:
    """Config that adds ``cluster.interrupts`` to the workers' preloads: a spawned local worker then
    ignores Ctrl-C, which its client handles (forked ones ignore it from the start)."""
    from .interrupts import PRELOAD

    preload = dask.config.get("distributed.worker.preload", default=None) or []
    preload = [preload] if isinstance(preload, str) else list(preload)
    return {"distributed.worker.preload": preload if PRELOAD in preload else [*preload, PRELOAD]}


@contextlib.contextmanager
def _open_local(workers, threads_per_worker, device, dashboard_address, security, timeout, preload_modules=(),
                warm_modules=()):
    ids = gpu_ids() if device != "cpu" else []
    if device == "cuda" and not ids:
        # decided: no silent fall-back to CPU when CUDA was asked for explicitly
        raise ClusterError(f"device cuda requested but no CUDA GPU is visible{_why_no_gpu()}; use --device cpu or auto")
    # A nanny started earlier in this process may have exported dask's value
    # into os.environ, which spawned workers would inherit: drop that one.
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") == "65536":
        del os.environ["MALLOC_TRIM_THRESHOLD_"]
    protocol = "tls://" if security is not None and getattr(security, "require_encryption", False) else "tcp://"
    with contextlib.ExitStack() as stack:
        # held for the cluster's life: a nanny reads them again when its worker is lost or restarted
        stack.enter_context(dask.config.set({**NO_MALLOC_TRIM, **KEEP_LOCAL_NANNIES, **local_timers(),
                                             **_ignore_sigint_preload()}))
        start = stack.enter_context(_worker_start(preload_modules if not ids else (), warm_modules))
        with _cluster_and_client(ids, workers, threads_per_worker, dashboard_address, security, timeout,
                                 protocol, start) as handle:
            yield handle


@contextlib.contextmanager
def _cluster_and_client(ids, workers, threads_per_worker, dashboard_address, security, timeout, protocol, start):
    from distributed import Client, LocalCluster

    if ids:
        from .placement import default_workers_per_gpu

        if workers is None:  # enough workers per GPU to feed it (cluster.placement says why)
            workers = len(ids) * default_workers_per_gpu(len(ids), _cpu_count())
        with _half_started_dropped():
            cluster = gpu_spec_cluster(ids, threads_per_worker or 1, dashboard_address, security, workers)
        gpu = True
    else:
        cores = _cpu_count()
        if workers is None and threads_per_worker is None:
            workers, threads_per_worker = cores, 1
        elif workers is None:
            workers = max(1, cores // threads_per_worker)
        elif threads_per_worker is None:
            threads_per_worker = max(1, cores // workers)
        if workers * threads_per_worker > cores:
            warnings.warn(
                f"{workers} workers x {threads_per_worker} threads exceed {cores} cores; "
                "torch runs slower when oversubscribed",
                RuntimeWarning,
                stacklevel=6,
            )
        with _half_started_dropped():
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=threads_per_worker,
                processes=True,
                host="127.0.0.1",
                protocol=protocol,
                dashboard_address=dashboard_address,
                security=security,
                silence_logs=logging.WARNING,
                scheduler_sync_interval=LOCAL_CLUSTER_SYNC_S,
                **start,
            )
        gpu = False
    slow_heartbeats(getattr(cluster, "scheduler", None))
    try:
        client = Client(cluster, security=security, timeout=timeout)
        try:
            yield ClusterHandle(client, "local", _dashboard(client), _n_workers(client), gpu, cluster)
        finally:
            client.close()
    finally:
        _close_local(cluster)


@contextlib.contextmanager
def _half_started_dropped():
    """A cluster whose start was cut short (Ctrl-C while it started its workers) is closed as far as it
    goes and left out of distributed's exit hook, which would fail on it with a traceback
    (``AssertionError: Status.init``) after the program's last line. Its worker processes end with
    this process."""
    from distributed import SpecCluster

    before = set(SpecCluster._instances)
    try:
        yield
    except BaseException:
        for cluster in set(SpecCluster._instances) - before:
            with contextlib.suppress(BaseException):
                cluster.close(timeout=2)
            cluster.shutdown_on_close = False
        raise


#: Seconds a local cluster may take to close before the worker processes still alive are killed.
#: A nanny whose restarted worker died before the nanny read its "connected" message starts another
#: one while the first start still polls: both read one queue, the first drops the new worker's
#: message as not its own, and the second start never ends (distributed 2026.7). The worker runs
#: fine, but closing the nanny waits for that start for ever; the worker's exit ends it. A normal
#: close takes a second or two (a nanny gives its worker 5 s to stop before killing it).
CLOSE_GRACE_S = 20.0


def _close_local(cluster, grace: float = CLOSE_GRACE_S) -> None:
    import threading

    timer = threading.Timer(grace, _kill_worker_processes, args=(cluster,))
    timer.daemon = True
    timer.start()
    try:
        cluster.close()
    finally:
        timer.cancel()


def _kill_worker_processes(cluster) -> None:
    import signal

    for nanny in list(getattr(cluster, "workers", {}).values()):
        pid = getattr(nanny, "pid", None)
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))


@contextlib.contextmanager
def _open_remote(address, device, security, timeout):
    from distributed import Client

    from .tls import make_security

    if address.startswith("tls://") and security is None:
        security = make_security()  # from Dask config, if any
        if security is None:
            raise ClusterError(
                f"scheduler {address} uses TLS but no certificates were given; pass --tls-ca-file, "
                "--tls-cert and --tls-key (or set distributed.comm.tls in Dask config)"
            )
    try:
        client = Client(address, security=security, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - turned into one clear line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = " (is the scheduler running there, and does it expect tls://?)" if address.startswith("tcp://") else ""
        raise ClusterError(f"cannot connect to scheduler {address}: {msg}{hint}") from None
    try:
        _wait_for(client, 1, timeout, address)
        gpu = _gpu_choice(client, device)
        yield ClusterHandle(client, "remote", _dashboard(client), _n_workers(client), gpu)
    finally:
        client.close()


def _wait_for(client, n: int, timeout: float, where: str, **hint) -> None:
    from .preflight import check_workers

    check_workers(client, timeout=timeout, n_workers=n, where=where, **hint)


def _gpu_choice(client, device: str) -> bool:
    if device == "cpu":
        return False
    offers = _offers_gpu(client)
    if device == "cuda" and not offers:
        raise ClusterError("no worker offers resource GPU=1; start workers with --resources GPU=1 or use --device cpu")
    return offers


@contextlib.contextmanager
def _open_spec(path, device, dashboard_address, security, timeout):
    from distributed import Client

    spec = load_spec(path)
    kind = spec["kind"]
    timeout = spec.get("timeout", timeout)
    n = spec.get("workers", 1)
    if kind in JOBQUEUE_KINDS:
        from .specs import import_jobqueue

        jq = import_jobqueue(kind)
        cls = {"slurm": jq.SLURMCluster, "pbs": jq.PBSCluster}[kind]
        submit = cls.job_cls.submit_command
        if shutil.which(submit) is None:
            raise ClusterError(f"cluster kind {kind!r} needs `{submit}` on PATH; run from a {kind.upper()} login node")
        kw = jobqueue_kwargs(spec)
        sched = dict(kw.pop("scheduler_options", None) or {})
        if dashboard_address is not None:
            sched.setdefault("dashboard_address", dashboard_address)
        if security is not None:
            kw.setdefault("security", security)
        with dask.config.set(NO_MALLOC_TRIM):
            cluster = cls(scheduler_options=sched, silence_logs=logging.WARNING, **kw)
        cluster.scale(n)
    else:
        try:
            from dask_kubernetes.operator import KubeCluster
        except ImportError:
            raise ImportError("cluster kind 'kubernetes' needs dask-kubernetes: install pagecube[k8s]") from None
        resource = kubernetes_cluster_spec(spec)
        kw = {k: v for k, v in spec.items() if k not in KUBE_SPEC_KEYS | OWN_SPEC_KEYS}
        cluster = KubeCluster(custom_cluster_spec=resource, **kw)
    try:
        client = Client(cluster, security=security, timeout=timeout)
        try:
            _wait_for(
                client,
                min(n, spec.get("wait_for_workers", 1)),
                timeout,
                f"{kind} cluster from {path}",
                hint="jobs or pods may still be queued; raise `timeout` in the spec or check the queue",
            )
            gpu = spec.get("gpus_per_worker", 0) > 0 and device != "cpu"
            yield ClusterHandle(client, "spec", _dashboard(client), _n_workers(client), gpu, cluster)
        finally:
            client.close()
    finally:
        cluster.close()
