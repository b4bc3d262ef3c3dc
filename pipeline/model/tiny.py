"""The built-in ``tiny`` model: a CPU-friendly CLOSURE-Lite style encoder.

It exists so that the whole pipeline (demo, tests, CI, benchmarks) runs
anywhere without downloads, with outputs shaped and behaving like the big
models: 64 px panel crops through a small CNN, UTF-8 bytes through a byte
embedding + 1D convs, panel geometry, gated fusion, attention pooling and a
pairwise next-panel head.  Weights are seeded (reproducible) unless a
checkpoint is given.

Determinism across batches matters (a store built by 2 workers must equal a
1-process build), so each page's panels are computed with per-panel ops only
and nothing mixes pages of a batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..images import crop_panels, least_side
from .checkpoint import CheckpointError, apply_state_dict, load_state_dict
from .layers import (
    GatedFusion,
    GeometryEncoder,
    MaskedAttentionPool,
    NextPanelHead,
    box_features,
    decode_reading_order,
    masked_mean,
)
from .protocol import ModelInfo
from .runtime import (
    check_common, embedding_dim_of, inference, named_outputs, resolve_device, seeded, to_device, weights_identity,
)

DEFAULT_DIM = 128
_MEAN, _STD = 0.5, 0.25  # fixed pixel normalisation: no dataset statistics needed


class PanelCNN(nn.Module):
    """Four stride-2 convs (64 → 4 px) + global average pool + linear."""

    def __init__(self, dim: int, width: int = 16):
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GELU()]
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(chans[-1], dim)

    def forward(self, crops: Tensor) -> Tensor:  # [N, 3, S, S] float
        return self.out(self.features(crops).mean(dim=(2, 3)))


class ByteTextEncoder(nn.Module):
    """UTF-8 bytes → embedding → two 1D convs → masked mean; no tokenizer to ship."""

    def __init__(self, dim: int, width: int = 64):
        super().__init__()
        self.embed = nn.Embedding(257, width, padding_idx=0)  # 0 = padding, byte b → b + 1
        self.conv1 = nn.Conv1d(width, width, 5, padding=2)
        self.conv2 = nn.Conv1d(width, width, 5, padding=2)
        self.act = nn.GELU()
        self.out = nn.Linear(width, dim)

    def forward(self, tokens: Tensor) -> Tensor:  # [N, L] long
        valid = tokens > 0
        x = self.embed(tokens).transpose(1, 2)  # [N, C, L]
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x)) + x
        return self.out(masked_mean(x.transpose(1, 2), valid, dim=1))


class TinyEncoder(nn.Module):
    """Panel tensors in, page/panel embeddings, attention and next-panel scores out."""

    def __init__(self, dim: int = DEFAULT_DIM):
        super().__init__()
        self.vision = PanelCNN(dim)
        self.text = ByteTextEncoder(dim)
        self.geometry = GeometryEncoder(dim)
        self.fusion = GatedFusion(dim, 3)
        self.pool = MaskedAttentionPool(dim)
        self.next_panel = NextPanelHead(dim)

    def forward(self, crops: Tensor, tokens: Tensor, boxes: Tensor, page_size: Tensor, mask: Tensor) -> dict:
        """crops uint8 [B,P,S,S,3], tokens [B,P,L], boxes [B,P,4], page_size [B,2], mask bool [B,P]."""
        b, p = mask.shape
        idx = mask.reshape(-1).nonzero().squeeze(1)  # only real panels go through the encoders
        flat_crops = crops.reshape(b * p, *crops.shape[2:]).index_select(0, idx)
        x = flat_crops.permute(0, 3, 1, 2).float().div_(255.0).sub_(_MEAN).div_(_STD)
        vis = self.vision(x)
        txt = self.text(tokens.reshape(b * p, -1).index_select(0, idx).long())
        feats = box_features(boxes.float(), page_size.float().unsqueeze(1).expand(b, p, 2))
        geo = self.geometry(feats.reshape(b * p, -1).index_select(0, idx))
        fused = self.fusion(vis, txt, geo)
        panels = torch.zeros(b * p, fused.shape[-1], dtype=fused.dtype, device=fused.device)
        panels = panels.index_copy(0, idx, fused).reshape(b, p, -1)
        page, weights = self.pool(panels, mask)
        scores, start = self.next_panel(panels, mask)
        return {"page": page, "panels": panels, "weights": weights, "scores": scores, "start": start}


@dataclass
class TinyPrepared:
    """One page on CPU, ready to collate (numpy, so it pickles small and fast)."""

    crops: np.ndarray  # uint8 [n, S, S, 3]
    tokens: np.ndarray  # int16 [n, L], byte + 1, 0 = padding
    boxes: np.ndarray  # float32 [n, 4]
    page_size: tuple[int, int]


def encode_text(text: str, length: int) -> np.ndarray:
    """UTF-8 bytes shifted by one (0 is padding), truncated/padded to ``length``."""
    data = np.frombuffer(text.encode("utf-8", "replace")[:length], dtype=np.uint8).astype(np.int16) + 1
    out = np.zeros(length, dtype=np.int16)
    out[: data.size] = data
    return out


class TinyModel:
    """The PageModel wrapper: prepare on CPU threads, collate, forward on ``device``."""

    def __init__(self, module: TinyEncoder, info: ModelInfo, device: str, crop_size: int, text_bytes: int):
        self.module = module.to(device).eval()
        self.info = info
        self.device = device
        self.crop_size = crop_size
        self.panel_side = least_side(crop_size)  # pages are decoded just large enough for these crops
        self.text_bytes = text_bytes

    def prepare(self, page) -> TinyPrepared:
        boxes = np.asarray(page.boxes, dtype=np.float32).reshape(-1, 4)[: self.info.max_panels]
        n = boxes.shape[0]
        crops = crop_panels(page.rgb(), page.image_boxes()[:n], self.crop_size)
        texts = list(page.texts)[:n] + [""] * max(0, n - len(page.texts))
        tokens = np.stack([encode_text(t or "", self.text_bytes) for t in texts]) if n else (
            np.zeros((0, self.text_bytes), dtype=np.int16)
        )
        return TinyPrepared(crops, tokens, boxes, page.size)

    def collate(self, prepared: list[TinyPrepared]) -> dict[str, Tensor]:
        b, p, s, length = len(prepared), self.info.max_panels, self.crop_size, self.text_bytes
        crops = np.zeros((b, p, s, s, 3), dtype=np.uint8)
        tokens = np.zeros((b, p, length), dtype=np.int16)
        boxes = np.zeros((b, p, 4), dtype=np.float32)
        sizes = np.zeros((b, 2), dtype=np.float32)
        mask = np.zeros((b, p), dtype=bool)
        for i, item in enumerate(prepared):
            n = item.crops.shape[0]
            crops[i, :n], tokens[i, :n], boxes[i, :n] = item.crops, item.tokens, item.boxes
            sizes[i] = item.page_size
            mask[i, :n] = True
        batch = {
            "crops": torch.from_numpy(crops), "tokens": torch.from_numpy(tokens),
            "boxes": torch.from_numpy(boxes), "page_size": torch.from_numpy(sizes), "mask": torch.from_numpy(mask),
        }
        if self.device.startswith("cuda"):
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def forward(self, batch: dict[str, Tensor]) -> dict[str, np.ndarray]:
        with inference(self.device):
            t = to_device(batch, self.device)
            out = self.module(t["crops"], t["tokens"], t["boxes"], t["page_size"], t["mask"])
            order = decode_reading_order(out["scores"], t["mask"], out["start"])
            return named_outputs(out["page"], out["panels"], out["weights"], order, t["mask"])


def _seeded_encoder(dim: int, seed: int) -> TinyEncoder:
    with seeded(seed):
        return TinyEncoder(dim)


def build_tiny(
    *,
    max_panels: int = 12,
    embedding_dim: int | None = None,
    checkpoint: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    crop_size: int = 64,
    text_bytes: int = 128,
    **options,
) -> TinyModel:
    """Factory for ``--model tiny`` (see :mod:`pipeline.model.registry`)."""
    check_common("tiny", options, max_panels)
    state = load_state_dict(checkpoint) if checkpoint is not None else None
    dim = embedding_dim_of(state, embedding_dim, DEFAULT_DIM)
    module = _seeded_encoder(dim, seed)
    if state is not None:
        apply_state_dict(module, state, strict=True, source=os.path.basename(os.fspath(checkpoint)))
    digest, source = weights_identity(checkpoint, seed)
    info = ModelInfo(
        name="tiny", embedding_dim=dim, max_panels=int(max_panels), weights_digest=digest, weights_source=source,
        extra={"crop_size": crop_size, "text_bytes": text_bytes},
    )
    return TinyModel(module, info, resolve_device(device), crop_size, text_bytes)


__all__ = ["build_tiny", "TinyModel", "TinyEncoder", "TinyPrepared", "CheckpointError"]
