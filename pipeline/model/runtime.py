"""What every built-in model does the same way: device choice, seeded init, weights identity,
the inference context (inference_mode, bf16 autocast on CUDA, non-blocking copies) and the
named numpy outputs of the protocol."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from torch import Tensor

from .checkpoint import file_digest


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def check_common(model: str, options: dict, max_panels: int) -> None:
    """Refuse options a factory does not know, and a panel cap below one."""
    if options:
        raise ValueError(f"model {model!r} does not take option(s): {', '.join(sorted(options))}")
    if max_panels < 1:
        raise ValueError(f"max_panels must be >= 1, got {max_panels}")


@contextlib.contextmanager
def seeded(seed: int):
    """Same seed, same weights, without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def embedding_dim_of(state: dict, embedding_dim: int | None, default: int) -> int:
    """The asked dimension, else the one a checkpoint was trained with (its pooling query), else the default."""
    if embedding_dim is None and state is not None and "pool.query" in state:
        return int(state["pool.query"].shape[0])
    return int(embedding_dim or default)


def weights_identity(checkpoint: str | None, seed: int) -> tuple[str, str]:
    """(weights_digest, weights_source) for the store's attributes and fingerprint."""
    if checkpoint is None:
        return f"seed:{seed}", "seeded-init"
    return file_digest(checkpoint), f"checkpoint:{os.path.basename(os.fspath(checkpoint))}"


@contextlib.contextmanager
def inference(device: str):
    """inference_mode everywhere, bf16 autocast on CUDA."""
    on_cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        yield


def to_device(batch: dict[str, Tensor], device: str) -> dict[str, Tensor]:
    on_cuda = device.startswith("cuda")
    return {k: v.to(device, non_blocking=on_cuda) for k, v in batch.items()}


def named_outputs(page: Tensor, panels: Tensor, weights: Tensor, order: Tensor, mask: Tensor) -> dict[str, np.ndarray]:
    """The protocol's outputs as numpy: float32 embeddings (zero in padding slots), int16 order."""
    return {
        "page_embeddings": page.float().cpu().numpy(),
        "panel_embeddings": (panels.float() * mask.unsqueeze(-1)).cpu().numpy(),
        "attention_weights": weights.float().cpu().numpy(),
        "reading_order": order.to(torch.int16).cpu().numpy(),
    }
