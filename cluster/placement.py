"""Where local workers go and how many threads read for each: pure arithmetic on device ids and
cores, no I/O.

A worker's CPU side (reading, decoding, cropping pages, and launching the model's
kernels) runs under one interpreter lock, whatever its thread count. On an H200
with 16 cores, one process prepared at most about 320 pages/s for ViT-B/16-sized
crops on 16 threads (114 on one thread), while the GPU ran the same model at
480-640 pages/s; a build with one worker per GPU made 210 pages/s with the GPU
busy a quarter of the time (benchmarks/gpu_check.sh). Several worker processes
per GPU each bring their own lock; the GPU runs their batches in turn. The
default gives each worker about ``CORES_PER_GPU_WORKER`` cores.
"""
from __future__ import annotations

#: Cores the default gives each GPU worker: enough threads to read and prepare pages beside the model.
CORES_PER_GPU_WORKER = 4
#: At most this many workers share one GPU by default (each holds its own copy of the model there).
MAX_DEFAULT_PER_GPU = 4
#: The fewest threads that read and prepare pages on a GPU worker, or on a worker whose pages come
#: over the network.
READ_THREADS = 4
#: The fewest a CPU worker reading local files gets: one prepares while another waits on the disk.
MIN_CPU_READ_THREADS = 2


def default_workers_per_gpu(n_gpus: int, cores: int) -> int:
    """About ``CORES_PER_GPU_WORKER`` cores per worker, 1 to ``MAX_DEFAULT_PER_GPU`` workers per GPU."""
    if n_gpus < 1:
        return 0
    return max(1, min(MAX_DEFAULT_PER_GPU, cores // (CORES_PER_GPU_WORKER * n_gpus)))


def gpu_workers(ids: list[str], total: int) -> list[tuple[str, str]]:
    """(worker name, device id) for ``total`` local GPU workers, spread over ``ids`` in turn.

    Fewer workers than GPUs use the first ones. Names say which of ``ids`` (by position, as ids
    may be UUIDs): ``gpu-0``, or ``gpu-0.1`` for the second worker on the first device.
    """
    if not ids:
        return []
    out = []
    for k in range(max(1, total)):
        i, n = k % len(ids), k // len(ids)
        out.append((f"gpu-{i}" if n == 0 else f"gpu-{i}.{n}", ids[i]))
    return out


def read_threads(cores: int, gpu: bool, remote_pages: bool = False) -> int:
    """Threads that read and prepare pages for a worker with ``cores`` cores to itself.

    GPU workers: all of them, at least ``READ_THREADS``, since reading and preparing pages is then
    all the CPU does and 4 threads starve a fast GPU. CPU workers: the model runs on those same
    cores, and threads beyond them only take turns at the cores and the interpreter lock (2 cores,
    2 workers, the tiny model: 2 threads each read and prepared 6% more pages/s than 4), so as many
    as the cores, at least ``MIN_CPU_READ_THREADS``. Pages that come over the network wait on it,
    not on the cores: at least ``READ_THREADS`` then.
    """
    cores = max(1, int(cores))
    if gpu or remote_pages:
        return max(READ_THREADS, cores)
    return max(MIN_CPU_READ_THREADS, cores)
