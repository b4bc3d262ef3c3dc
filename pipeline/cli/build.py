"""``pagecube build``: build or resume a store."""
from __future__ import annotations

import functools
import sys
from typing import Optional

import typer

from .app import app


def says_interrupted(command):
    """Ctrl-C at any moment of ``pagecube build`` ends with the one line: the build says it once its tasks
    run (with the command to resume), this says it for a Ctrl-C before (imports, the cluster's start)."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt as stop:
            if not getattr(stop, "said", False):
                print("pagecube: interrupted; finished chunks are kept. Resume with the same command",
                      file=sys.stderr, flush=True)
            raise

    return run


@app.command()
@says_interrupted
def build(
    pages: str = typer.Argument(..., help="A list file (one manifest per line), a glob, or a .jsonl catalog."),
    out: str = typer.Option(..., "--out", "-o", help="The store (a local path or an fsspec URL such as s3://...)."),
    image_root: Optional[str] = typer.Option(None, "--image-root", help="Folder that relative image paths resolve against (default: each manifest's folder)."),
    cluster: str = typer.Option("local", "--cluster", help="local | sync | tcp://HOST:PORT | tls://HOST:PORT | SPEC.yaml"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Workers for --cluster local (default: one per core; with GPUs, about one per 4 cores, 1 to 4 per GPU, spread over the GPUs in turn)."),
    threads_per_worker: Optional[int] = typer.Option(None, "--threads-per-worker", help="Threads per local worker (default 1)."),
    chunk_pages: Optional[int] = typer.Option(None, "--chunk-pages", help="Pages per store chunk and per task (default: up to 256, in equal chunks whose count is a multiple of the tasks running at once; from the store when resuming)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Pages per model batch (default 16 on CPU, 64 on GPU)."),
    max_panels: int = typer.Option(12, "--max-panels", help="Panel cap: panel slots per page."),
    model: Optional[str] = typer.Option(None, "--model", help="tiny | pretrained | closure-lite-base | package.module:factory (default: the store's model when resuming, else pretrained where installed, else tiny, untrained)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Weights file (.safetensors, or a torch state dict loaded with weights_only=True)."),
    embedding_dim: Optional[int] = typer.Option(None, "--embedding-dim", help="Embedding dimension (default: the model's)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    embedding_dtype: str = typer.Option("float32", "--embedding-dtype", help="float32 | float16 storage for embeddings."),
    codec: str = typer.Option("zstd", "--codec", help="zstd | lz4 | none, for the embedding arrays."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh, replacing an existing store."),
    init_only: bool = typer.Option(False, "--init-only", help="Create the store template and stop."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Also redo chunks that hold failed pages."),
    verify: bool = typer.Option(False, "--verify", help="Read every region back after writing it and compare."),
    take_over_lock: bool = typer.Option(False, "--take-over-lock", help="Take the store's writer lock even if its holder may be alive."),
    seed: int = typer.Option(0, "--seed", help="Seed for models built without a checkpoint."),
    reading_direction: Optional[str] = typer.Option(None, "--reading-direction", help="ltr | rtl (manga), for models that order panels by geometry."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar or progress lines."),
    tls_ca_file: Optional[str] = typer.Option(None, "--tls-ca-file", help="CA certificate (PEM) for a tls:// scheduler; default: Dask config distributed.comm.tls.ca-file."),
    tls_cert: Optional[str] = typer.Option(None, "--tls-cert", help="Client certificate (PEM) for a tls:// scheduler."),
    tls_key: Optional[str] = typer.Option(None, "--tls-key", help="Client private key (PEM), if not inside --tls-cert."),
    dashboard_address: str = typer.Option("127.0.0.1:0", "--dashboard-address", help="Dashboard address for --cluster local (default: localhost, any free port; ':8787' listens on all interfaces)."),
    preflight_timeout: float = typer.Option(60.0, "--preflight-timeout", help="Seconds to wait for workers, the model and the store probe before any task."),
    no_workers_timeout: Optional[float] = typer.Option(None, "--no-workers-timeout", help="Seconds the build waits while no worker is alive (all died, none replaced) before it stops, finished chunks kept (default 60 for --cluster local, 600 otherwise; 0: wait for ever)."),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", help="fsspec options for s3:// and other URLs, as a JSON object or @FILE (credentials: prefer the AWS_* environment)."),
) -> None:
    """Build the embedding store for PAGES into --out; resumes by default."""
    # the local workers' forkserver was started by pipeline.cli.main, before typer was imported
    from ..build import build as run_build
    from ..errors import BadArgument
    from ..store.location import parse_storage_options

    try:
        so = parse_storage_options(storage_options)
    except ValueError as exc:
        raise BadArgument(str(exc)) from None

    from cluster import make_security

    try:
        security = make_security(tls_ca_file, tls_cert, tls_key)
    except ValueError as exc:
        raise BadArgument(str(exc)) from None
    if preflight_timeout <= 0:
        raise BadArgument(f"--preflight-timeout must be a positive number of seconds, got {preflight_timeout:g}")

    options = {}
    if reading_direction is not None:
        options["reading_direction"] = reading_direction
    result = run_build(
        pages, out, image_root=image_root, cluster=cluster, workers=workers,
        threads_per_worker=threads_per_worker, chunk_pages=chunk_pages, batch_size=batch_size,
        max_panels=max_panels, model=model, checkpoint=checkpoint, embedding_dim=embedding_dim,
        model_options=options, device=device, embedding_dtype=embedding_dtype, codec=codec,
        overwrite=overwrite, init_only=init_only, retry_failed=retry_failed, verify=verify,
        take_over_lock=take_over_lock, seed=seed, progress=not no_progress, storage_options=so,
        security=security, dashboard_address=dashboard_address, preflight_timeout=preflight_timeout,
        no_workers_timeout=no_workers_timeout,
    )
    if init_only:
        print(f"initialised {result.store}: {result.n_pages} pages pending")
        return
    print(f"{result.store}: {result.done} done, {result.failed} failed, {result.pending} pending "
          f"of {result.n_pages} pages ({result.pages_per_s:.1f} pages/s over this run, "
          "first task to last, warm-up included)")
    if result.phases:
        print("  task time by phase, summed over tasks: " + phase_line(result.phases))
    for r in result.reasons[:5]:
        print(f"  failed: {r}", file=sys.stderr)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


PHASE_NAMES = {"inference": "model", "read": "waiting for pages (read + prepare)", "write": "writing",
               "verify": "verifying"}


def phase_line(phases: dict[str, float]) -> str:
    """Where the tasks' time went: the model, or waiting for pages to be read and prepared, or the store."""
    order = [k for k in PHASE_NAMES if k in phases] + sorted(k for k in phases if k not in PHASE_NAMES)
    return ", ".join(f"{PHASE_NAMES.get(k, k)} {phases[k]:.1f} s" for k in order)
