"""Batch-system and Kubernetes clusters from a small YAML spec, built offline first.

Why pure builders: a job script or a DaskCluster resource can be checked
(tests, ``--dry-run``) without a scheduler, ``sbatch`` or a Kubernetes API.
The spec is ``{"kind": "slurm"|"pbs"|"kubernetes", "workers": N,
"gpus_per_worker": 0|1, ...}``; other keys go to the dask-jobqueue cluster
class or to ``KubeCluster``. GPU requests go on workers only: dask-kubernetes'
``resources=`` would also land on the scheduler pod (measured), so the worker
container is patched instead. Workers also get dask's malloc-trim pre-spawn
setting removed (it slowed torch 27-49%, see MEASURED.md).
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "JOBQUEUE_KINDS",
    "SPEC_KINDS",
    "jobqueue_kwargs",
    "kubernetes_cluster_spec",
    "load_spec",
    "slurm_job_script",
]

JOBQUEUE_KINDS = ("slurm", "pbs")
SPEC_KINDS = JOBQUEUE_KINDS + ("kubernetes",)

# Exported in worker environments so the nanny spawns workers without
# MALLOC_TRIM_THRESHOLD_ (dask reads DASK_* variables as config, None unsets).
NO_MALLOC_TRIM_ENV = {"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": '{"MALLOC_TRIM_THRESHOLD_": None}'}

# Keys of the spec that pagecube interprets; everything else is passed through.
OWN_KEYS = {"kind", "workers", "gpus_per_worker", "gpu_directive", "timeout", "wait_for_workers"}

_GPU_DIRECTIVE = {"slurm": "--gres=gpu:{n}", "pbs": "-l ngpus={n}"}


def load_spec(path: str | os.PathLike) -> dict:
    """Read and validate a YAML cluster spec; one clear line on any problem."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"cluster spec file not found: {path}")
    try:
        spec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"cluster spec {path} is not valid YAML: {e}".splitlines()[0]) from e
    return validate_spec(spec, source=str(path))


def validate_spec(spec: Any, source: str = "spec") -> dict:
    if not isinstance(spec, dict):
        raise ValueError(f"cluster {source} must be a mapping with a 'kind' key")
    kind = spec.get("kind")
    if kind not in SPEC_KINDS:
        raise ValueError(f"cluster {source}: kind must be one of {', '.join(SPEC_KINDS)}, got {kind!r}")
    workers = spec.get("workers", 1)
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"cluster {source}: workers must be a non-negative integer, got {workers!r}")
    gpus = spec.get("gpus_per_worker", 0)
    if gpus not in (0, 1):
        raise ValueError(f"cluster {source}: gpus_per_worker must be 0 or 1 (one worker per GPU), got {gpus!r}")
    return dict(spec)


def _passthrough(spec: dict) -> dict:
    return {k: copy.deepcopy(v) for k, v in spec.items() if k not in OWN_KEYS}


def jobqueue_kwargs(spec: dict) -> dict:
    """Keyword arguments for SLURMCluster/PBSCluster (and their Job classes)."""
    spec = validate_spec(spec)
    kw = _passthrough(spec)
    kw.setdefault("cores", 1)
    kw.setdefault("memory", "4GB")
    prologue = list(kw.get("job_script_prologue") or [])
    for k, v in NO_MALLOC_TRIM_ENV.items():
        prologue.insert(0, f"export {k}='{v}'")
    kw["job_script_prologue"] = prologue
    gpus = spec.get("gpus_per_worker", 0)
    if gpus:
        # One worker process per job so exactly one worker owns the job's GPU.
        kw["processes"] = 1
        directive = spec.get("gpu_directive", _GPU_DIRECTIVE[spec["kind"]]).format(n=gpus)
        directives = list(kw.get("job_extra_directives") or [])
        if directive not in directives:
            directives.append(directive)
        kw["job_extra_directives"] = directives
        args = list(kw.get("worker_extra_args") or [])
        if "--resources" not in args:
            args += ["--resources", f"GPU={gpus}"]
        kw["worker_extra_args"] = args
    return kw


def import_jobqueue(kind: str):
    try:
        import dask_jobqueue
    except ImportError:
        raise ImportError(f"cluster kind {kind!r} needs dask-jobqueue: install pagecube[slurm]") from None
    return dask_jobqueue


def slurm_job_script(spec: dict, scheduler_address: str = "tcp://SCHEDULER:8786") -> str:
    """The batch script one worker job would run, built offline (no scheduler, no sbatch).

    Works for ``kind: pbs`` too (a PBS script); the scheduler address is a
    placeholder unless given.
    """
    spec = dict(spec)
    spec.setdefault("kind", "slurm")
    kind = validate_spec(spec)["kind"]
    if kind not in JOBQUEUE_KINDS:
        raise ValueError(f"job scripts exist for {', '.join(JOBQUEUE_KINDS)}, not {kind!r}")
    jq = import_jobqueue(kind)
    job_cls = {"slurm": jq.SLURMCluster, "pbs": jq.PBSCluster}[kind].job_cls
    kw = jobqueue_kwargs(spec)
    kw.pop("scheduler_options", None)
    kw.pop("n_workers", None)
    kw.pop("silence_logs", None)
    logs = kw.get("log_directory")
    if logs is None:
        return job_cls(scheduler=scheduler_address, name="pagecube-worker", **kw).job_script()
    # dask-jobqueue makes the log folder when a job is made (it is for the submitting machine, at
    # submit time): an offline script must not leave one in the current folder, so the job is made with
    # a throw-away folder whose path is then replaced by the spec's in the script
    with tempfile.TemporaryDirectory(prefix="jobqueue-logs-") as scratch:
        kw["log_directory"] = stand_in = os.path.join(scratch, "logs")
        script = job_cls(scheduler=scheduler_address, name="pagecube-worker", **kw).job_script()
    return script.replace(stand_in, os.fspath(logs))


def kubernetes_cluster_spec(spec: dict) -> dict:
    """A dask-kubernetes ``DaskCluster`` resource, built offline, GPU on workers only.

    Keys used: name, image, env, worker_command, scheduler_service_type,
    idle_timeout, worker_resources (k8s ``resources`` for the worker
    container); the rest of the spec is for ``KubeCluster``.
    """
    spec = dict(spec)
    spec.setdefault("kind", "kubernetes")
    spec = validate_spec(spec)
    try:
        from dask_kubernetes.operator import make_cluster_spec
    except ImportError:
        raise ImportError("cluster kind 'kubernetes' needs dask-kubernetes: install pagecube[k8s]") from None
    env = dict(NO_MALLOC_TRIM_ENV)
    env.update({k: str(v) for k, v in (spec.get("env") or {}).items()})
    resource = make_cluster_spec(
        name=spec.get("name", "pagecube"),
        image=spec.get("image", "ghcr.io/dask/dask:latest"),
        n_workers=spec.get("workers", 1),
        resources=None,  # never here: it would also go on the scheduler pod
        env=env,
        worker_command=spec.get("worker_command", "dask worker"),
        scheduler_service_type=spec.get("scheduler_service_type", "ClusterIP"),
        idle_timeout=spec.get("idle_timeout", 0),
    )
    worker = resource["spec"]["worker"]["spec"]["containers"][0]
    resources = copy.deepcopy(spec.get("worker_resources") or {})
    gpus = spec.get("gpus_per_worker", 0)
    if gpus:
        resources.setdefault("limits", {})["nvidia.com/gpu"] = gpus
        worker["args"] = list(worker["args"]) + ["--resources", f"GPU={gpus}"]
    if resources:
        worker["resources"] = resources
    return resource


KUBE_SPEC_KEYS = {"name", "image", "env", "worker_command", "scheduler_service_type", "idle_timeout", "worker_resources"}
