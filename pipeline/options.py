"""``BuildOptions``: every option of a build, each declared once with its default and help text.

The Python API (``pipeline.build(pages, out, **options)``) and the command line (``pagecube build``,
whose options are made from these fields) share this one declaration and its one ``validate``.  A
field the command line sets as it is names its ``flag``; the others are set by the command line from
text of its own (``--storage-options`` JSON, the ``--tls-*`` files, ``--reading-direction``,
``--no-progress``).  Importing this module stays cheap: every command line run imports it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from .errors import BadArgument


def _option(default, help: str, flag: str | None = None):
    """A field with its help text, and the flag that sets it as it is on the command line (if one does)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class BuildOptions:
    """How to build (or resume) a store; ``validate`` refuses what cannot work before anything starts.

    ``cluster`` may also be the address of a scheduler you keep running (``tcp://...``/``tls://...``).
    ``model=None`` resumes a store with its own built-in model, else takes ``tiny`` for a
    ``checkpoint``, ``pretrained`` where it is installed and ``tiny`` (untrained) where not.
    """

    image_root: Optional[str] = _option(
        None, "Folder that relative image paths resolve against (default: each manifest's folder).", "--image-root")
    cluster: str = _option("local", "local | sync | tcp://HOST:PORT | tls://HOST:PORT | SPEC.yaml", "--cluster")
    workers: Optional[int] = _option(
        None, "Workers for --cluster local (default: one per core; with GPUs, about one per 4 cores, 1 to 4 per GPU, "
        "spread over the GPUs in turn).", "--workers")
    threads_per_worker: Optional[int] = _option(None, "Threads per local worker (default 1).", "--threads-per-worker")
    chunk_pages: Optional[int] = _option(
        None, "Pages per store chunk and per task (default: up to 256, in equal chunks whose count is a multiple of "
        "the tasks running at once; from the store when resuming).", "--chunk-pages")
    batch_size: Optional[int] = _option(
        None, "Pages per model batch (default 16 on CPU, 64 on GPU).", "--batch-size")
    max_panels: int = _option(12, "Panel cap: panel slots per page.", "--max-panels")
    model: Optional[str] = _option(
        None, "tiny | pretrained | closure-lite-base | package.module:factory (default: the store's model when "
        "resuming, else pretrained where installed, else tiny, untrained).", "--model")
    checkpoint: Optional[str] = _option(
        None, "Weights file (.safetensors, or a torch state dict loaded with weights_only=True).", "--checkpoint")
    embedding_dim: Optional[int] = _option(None, "Embedding dimension (default: the model's).", "--embedding-dim")
    device: str = _option("auto", "auto | cpu | cuda", "--device")
    embedding_dtype: str = _option("float32", "float32 | float16 storage for embeddings.", "--embedding-dtype")
    codec: str = _option("zstd", "zstd | lz4 | none, for the embedding arrays.", "--codec")
    overwrite: bool = _option(False, "Start afresh, replacing an existing store.", "--overwrite")
    init_only: bool = _option(False, "Create the store template and stop.", "--init-only")
    retry_failed: bool = _option(False, "Also redo chunks that hold failed pages.", "--retry-failed")
    verify: bool = _option(False, "Read every region back after writing it and compare.", "--verify")
    take_over_lock: bool = _option(
        False, "Take the store's writer lock even if its holder may be alive.", "--take-over-lock")
    seed: int = _option(0, "Seed for models built without a checkpoint.", "--seed")
    model_options: Optional[dict] = _option(
        None, "More keyword arguments for the model's factory (``--reading-direction`` sets reading_direction).")
    progress: bool = _option(True, "A progress bar or progress lines (``--no-progress``: none).")
    security: Any = _option(
        None, "A distributed Security for a tls:// scheduler (``--tls-ca-file``, ``--tls-cert``, ``--tls-key``).")
    dashboard_address: str = _option(
        "127.0.0.1:0", "Dashboard address for --cluster local (default: localhost, any free port; ':8787' listens on "
        "all interfaces).", "--dashboard-address")
    preflight_timeout: float = _option(
        60.0, "Seconds to wait for workers, the model and the store probe before any task.", "--preflight-timeout")
    no_workers_timeout: Optional[float] = _option(
        None, "Seconds the build waits while no worker is alive (all died, none replaced) before it stops, finished "
        "chunks kept (default 60 for --cluster local, 600 otherwise; 0: wait for ever).", "--no-workers-timeout")
    storage_options: Optional[dict] = _option(
        None, "fsspec options for s3:// and other URLs (``--storage-options``: a JSON object or @FILE).")

    @classmethod
    def names(cls) -> frozenset[str]:
        """Every option's name: what ``pipeline.build`` takes as keywords."""
        return frozenset(f.name for f in fields(cls))

    def validate(self) -> None:
        """Raise ``BadArgument`` with one line naming the option, for the first that cannot work."""
        from .store.lock import lease_seconds
        from .store.template import CODECS, EMBEDDING_DTYPES

        if self.preflight_timeout <= 0:
            raise BadArgument(f"--preflight-timeout must be a positive number of seconds, "
                              f"got {self.preflight_timeout:g}")
        for name in ("chunk_pages", "batch_size", "max_panels", "workers", "threads_per_worker"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise BadArgument(f"{flag(name)} must be a positive number, got {value}")
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise BadArgument(f"--embedding-dtype must be one of {', '.join(EMBEDDING_DTYPES)}, "
                              f"got {self.embedding_dtype!r}")
        if self.codec not in CODECS:
            raise BadArgument(f"--codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise BadArgument(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.no_workers_timeout is not None and not self.no_workers_timeout >= 0:
            raise BadArgument(f"--no-workers-timeout must be 0 (wait for ever) or a positive number of seconds, "
                              f"got {self.no_workers_timeout:g}")
        try:
            lease_seconds()  # the lease every build takes: PAGECUBE_LEASE_S from the environment
        except ValueError as exc:
            raise BadArgument(str(exc)) from None
        if self.checkpoint is not None and "://" not in self.checkpoint:
            _check_readable(self.checkpoint)
        _check_cluster_target(self.cluster)


def flag(name: str) -> str:
    """The command line flag of field ``name``, as messages name it."""
    return BuildOptions.__dataclass_fields__[name].metadata["flag"]


def _check_cluster_target(cluster) -> None:
    from cluster.targets import VALID_TARGETS

    target = os.fspath(cluster) if isinstance(cluster, (str, os.PathLike)) else None
    if target is None:
        raise BadArgument(f"--cluster must be one of: {VALID_TARGETS}")
    if target in ("local", "sync") or target.startswith(("tcp://", "tls://")):
        return
    if target.endswith((".yaml", ".yml")) or os.path.isfile(target):
        if not os.path.isfile(target):
            raise BadArgument(f"cluster spec not found: {target}")
        return
    raise BadArgument(f"unknown --cluster {target!r}; use one of: {VALID_TARGETS}")


def _check_readable(checkpoint: str) -> None:
    if not os.path.isfile(checkpoint):
        raise BadArgument(f"checkpoint not found: {checkpoint}")
    try:
        with open(checkpoint, "rb") as f:
            head = f.read(1)
    except OSError as exc:
        raise BadArgument(f"cannot read checkpoint {checkpoint}: {exc.strerror or exc}") from None
    if not head:
        raise BadArgument(f"checkpoint {checkpoint} is empty")
