"""Reusable pieces of a CLOSURE-Lite style comics encoder.

Every built-in size (tiny CPU model up to ViT/RoBERTa backbones) shares these
so that what the store records (page embedding, attention weights, reading
order) means the same thing whatever backbone made the panel embeddings.

Conventions: panels are padded to a fixed cap P; ``mask`` is bool ``[B, P]``
(True = real panel).  Every piece must stay finite on a page with zero panels
and must not mix pages of a batch, so a page's outputs do not depend on what
else is in its batch.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

GEOMETRY_FEATURES = 8


def box_features(boxes: Tensor, page_size: Tensor) -> Tensor:
    """Scale-free geometry of panels: ``[..., 4]`` x,y,w,h px + ``[..., 2]`` W,H → ``[..., 8]``.

    Features: x, y, w, h, centre x, centre y (all / page size), area fraction,
    log aspect (clamped).  Normalising by the page size makes the same layout
    look the same at any scan resolution.
    """
    size = page_size.clamp(min=1.0).to(boxes.dtype)
    wh_page = torch.cat([size, size], dim=-1)
    if wh_page.dim() < boxes.dim():
        wh_page = wh_page.unsqueeze(-2)
    xywh = boxes / wh_page
    x, y, w, h = xywh.unbind(-1)
    area = w * h
    aspect = torch.log((boxes[..., 2].clamp(min=1.0)) / (boxes[..., 3].clamp(min=1.0))).clamp(-4.0, 4.0)
    return torch.stack([x, y, w, h, x + w / 2, y + h / 2, area, aspect], dim=-1)


class GeometryEncoder(nn.Module):
    """Small MLP from :func:`box_features` to the embedding dimension."""

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(GEOMETRY_FEATURES, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


class GatedFusion(nn.Module):
    """Mix K modality embeddings with per-panel softmax gates, then LayerNorm.

    Gates let the model lean on text for text-heavy panels and on the image
    elsewhere; they are computed from all modalities together.
    """

    def __init__(self, dim: int, n_inputs: int = 3):
        super().__init__()
        self.n_inputs = n_inputs
        self.gate = nn.Linear(dim * n_inputs, n_inputs)
        self.proj = nn.ModuleList([nn.Linear(dim, dim) for _ in range(n_inputs)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, *embeddings: Tensor) -> Tensor:
        if len(embeddings) != self.n_inputs:
            raise ValueError(f"GatedFusion expects {self.n_inputs} inputs, got {len(embeddings)}")
        gates = torch.softmax(self.gate(torch.cat(embeddings, dim=-1)), dim=-1)  # [..., K]
        mixed = sum(gates[..., k : k + 1] * p(e) for k, (p, e) in enumerate(zip(self.proj, embeddings)))
        return self.norm(mixed)


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over ``mask`` entries; exactly 0 elsewhere; all-zero (not NaN) if none valid."""
    scores = scores.float().masked_fill(~mask, float("-inf"))
    top = scores.amax(dim=dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    exp = torch.exp(scores - top) * mask
    total = exp.sum(dim=dim, keepdim=True)
    return exp / total.clamp(min=torch.finfo(exp.dtype).tiny)


def masked_mean(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Mean of ``x`` over valid positions of ``dim`` (``mask`` lacks the feature axis); 0 if none."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=dim) / m.sum(dim=dim).clamp(min=1.0)


class MaskedAttentionPool(nn.Module):
    """Learned-query attention over panels → page embedding ``[B, D]`` and weights ``[B, P]``.

    Weights sum to 1 over valid panels and are exactly 0 on padding; a page
    with no panels gets all-zero weights and the learned ``empty`` embedding
    (initialised to zeros).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.empty = nn.Parameter(torch.zeros(dim))
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, panels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        scores = (self.key(panels) * self.query).sum(-1) * self.scale  # [B, P]
        weights = masked_softmax(scores, mask, dim=-1)
        pooled = (weights.unsqueeze(-1).to(panels.dtype) * self.value(panels)).sum(dim=1)
        has_any = mask.any(dim=1, keepdim=True)
        page = torch.where(has_any, pooled, self.empty.to(pooled.dtype).expand_as(pooled))
        return page, weights


class MaskedMultiHeadPool(nn.Module):
    """Learned-query multi-head attention over panels → page embedding ``[B, D]`` and weights ``[B, P]``.

    The learned query, keys and values are split into ``heads`` heads of
    ``D / heads`` dims; each head takes its own masked softmax over the valid
    panels, the heads' pooled values are concatenated and go through an
    output projection.  The returned weights are the mean over heads, so they
    keep :class:`MaskedAttentionPool`'s contract: they sum to 1 over valid
    panels and are exactly 0 on padding; a page with no panels gets all-zero
    weights and the learned ``empty`` embedding (initialised to zeros).
    ``query`` is stored flat (``[D]``), so its length is the embedding size.
    """

    def __init__(self, dim: int, heads: int = 8):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"MaskedMultiHeadPool: dim {dim} is not a multiple of heads {heads}")
        self.heads = int(heads)
        self.head_dim = dim // self.heads
        self.query = nn.Parameter(torch.randn(dim) / math.sqrt(self.head_dim))
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.empty = nn.Parameter(torch.zeros(dim))
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def head_weights(self, panels: Tensor, mask: Tensor) -> Tensor:
        """Per-head attention ``[B, heads, P]``: each head sums to 1 over valid panels, 0 elsewhere."""
        b, p, _ = panels.shape
        keys = self.key(panels).reshape(b, p, self.heads, self.head_dim)
        scores = (keys * self.query.reshape(self.heads, self.head_dim)).sum(-1) * self.scale  # [B, P, H]
        return masked_softmax(scores.transpose(1, 2), mask.unsqueeze(1), dim=-1)

    def forward(self, panels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        b, p, d = panels.shape
        per_head = self.head_weights(panels, mask)  # [B, H, P] float32
        values = self.value(panels).reshape(b, p, self.heads, self.head_dim)
        pooled = torch.einsum("bhp,bphd->bhd", per_head.to(values.dtype), values).reshape(b, d)
        pooled = self.out(pooled)
        has_any = mask.any(dim=1, keepdim=True)
        page = torch.where(has_any, pooled, self.empty.to(pooled.dtype).expand_as(pooled))
        return page, per_head.mean(dim=1)


class NextPanelHead(nn.Module):
    """Pairwise scores ``s[b, i, j]`` that panel j is read right after panel i, plus a "first" score.

    Bilinear form ``(A h_i) · (B h_j)``; the diagonal and padding are masked
    to -inf so a decoder can never pick them.
    """

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.src = nn.Linear(dim, hidden)
        self.dst = nn.Linear(dim, hidden)
        self.first = nn.Linear(dim, 1)
        self.scale = 1.0 / math.sqrt(hidden)

    def forward(self, panels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        scores = torch.matmul(self.src(panels), self.dst(panels).transpose(1, 2)).float() * self.scale
        n = scores.shape[-1]
        eye = torch.eye(n, dtype=torch.bool, device=scores.device)
        pair_ok = mask.unsqueeze(2) & mask.unsqueeze(1) & ~eye
        scores = scores.masked_fill(~pair_ok, float("-inf"))
        start = self.first(panels).squeeze(-1).float().masked_fill(~mask, float("-inf"))
        return scores, start


def decode_reading_order(scores: Tensor, mask: Tensor, start_scores: Tensor | None = None) -> Tensor:
    """Greedy decode of pairwise next-panel scores into positions ``[B, P]`` (long).

    Start at the best ``start_scores`` panel (default: the panel least likely
    to follow any other), then repeatedly take the best unused successor.
    Ties go to the lowest slot, so the result is deterministic, and every
    valid slot gets exactly one position in ``0..n-1``; padding gets -1.
    """
    scores = torch.nan_to_num(scores.detach().float(), nan=0.0, posinf=1e30, neginf=-1e30)
    mask = mask.to(torch.bool)
    b, p = mask.shape
    if start_scores is None:
        incoming = (scores.clamp(min=-1e4) * mask.unsqueeze(2)).sum(dim=1)
        start_scores = -incoming
    start = torch.nan_to_num(start_scores.detach().float(), nan=0.0, posinf=1e30, neginf=-1e30)
    start = start.masked_fill(~mask, float("-inf"))
    order = torch.full((b, p), -1, dtype=torch.long, device=scores.device)
    used = ~mask
    n_valid = mask.sum(dim=1)
    rows = torch.arange(b, device=scores.device)
    current = start.argmax(dim=1)
    for step in range(p):
        active = n_valid > step
        if not bool(active.any()):
            break
        idx = rows[active]
        order[idx, current[active]] = step
        used[idx, current[active]] = True
        nxt = scores[rows, current].masked_fill(used, float("-inf"))
        # rows whose successor scores are all -inf still must pick an unused valid slot
        fallback = torch.where(used, float("-inf"), 0.0)
        nxt = torch.where(torch.isfinite(nxt).any(dim=1, keepdim=True), nxt, fallback)
        current = nxt.argmax(dim=1)
    return order
