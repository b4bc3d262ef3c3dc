"""``--model closure-lite-base``: the seed's CLOSURE-Lite at its full size.

ViT-B/16 on 224 px panel crops and RoBERTa-base on panel text, both built from
``transformers`` configurations (nothing is downloaded), each projected to the
embedding dimension (384), panel geometry features, gated fusion, masked
multi-head attention pooling (8 heads, :class:`~pipeline.model.layers.MaskedMultiHeadPool`)
to the page embedding and attention weights (the mean over heads), and a bilinear
next-panel head whose pairwise scores are decoded into ``reading_order``.  The
shared pieces come from :mod:`pipeline.model.layers`, so the outputs mean the
same thing as the ``tiny`` model's.

Weights: a user's trained checkpoint (``--checkpoint``, safetensors or a
weights-only torch file; missing/unexpected keys are reported by name), or a
seeded random initialisation (``weights_source = "seeded-init"``) that is only
good for plumbing and throughput tests.  The text tokenizer is read from a
local directory (option ``tokenizer_dir`` holding a ``tokenizer.json`` of the
``tokenizers`` library, e.g. roberta-base's).  Without one, a seeded model falls
back to UTF-8 byte ids (recorded in ``info.extra["tokenizer"]``); a checkpoint
without a tokenizer is refused, since its text tower would read garbage.

Needs ``transformers`` and ``tokenizers`` (``pip install "pagecube[base]"``).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

INSTALL_HINT = "model 'closure-lite-base' needs transformers and tokenizers: install pagecube[base]"

try:  # pragma: no cover - depends on the environment
    from transformers import RobertaConfig, RobertaModel, ViTConfig, ViTModel
except ImportError as _exc:  # pragma: no cover
    raise ModuleNotFoundError(f"{INSTALL_HINT}; missing: {_exc.name}", name=_exc.name) from _exc

from .checkpoint import CheckpointError, apply_state_dict, load_state_dict  # noqa: E402
from .layers import (  # noqa: E402
    GatedFusion,
    GeometryEncoder,
    MaskedMultiHeadPool,
    NextPanelHead,
    box_features,
    decode_reading_order,
)
from .protocol import ModelInfo  # noqa: E402
from .runtime import (  # noqa: E402
    check_common, embedding_dim_of, inference, named_outputs, resolve_device, seeded, to_device, weights_identity,
)
from ..images import crop_panels, least_side  # noqa: E402

DEFAULT_DIM = 384
POOL_HEADS = 8  # attention-pooling heads (48 dims each at 384)
IMAGE_SIZE = 224
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5  # the ViT image processor's normalisation
BOS_ID, PAD_ID, EOS_ID = 0, 1, 2  # RoBERTa's special ids


def vit_b16_config() -> "ViTConfig":
    """ViT-B/16 at 224 px (the transformers defaults, spelled out)."""
    return ViTConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        image_size=IMAGE_SIZE, patch_size=16, num_channels=3, layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def roberta_base_config() -> "RobertaConfig":
    """roberta-base's configuration."""
    return RobertaConfig(
        vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


class ClosureLiteBase(nn.Module):
    """Backbones + projections + the shared CLOSURE-Lite head."""

    def __init__(self, dim: int = DEFAULT_DIM, vit_config=None, text_config=None, pool_heads: int = POOL_HEADS):
        super().__init__()
        self.vision = ViTModel(vit_config or vit_b16_config(), add_pooling_layer=False)
        self.text = RobertaModel(text_config or roberta_base_config(), add_pooling_layer=False)
        self.vision_proj = nn.Linear(self.vision.config.hidden_size, dim)
        self.text_proj = nn.Linear(self.text.config.hidden_size, dim)
        self.geometry = GeometryEncoder(dim)
        self.fusion = GatedFusion(dim, 3)
        self.pool = MaskedMultiHeadPool(dim, pool_heads)
        self.next_panel = NextPanelHead(dim)

    def forward(self, crops: Tensor, ids: Tensor, ids_mask: Tensor, boxes: Tensor, page_size: Tensor,
                mask: Tensor) -> dict:
        """crops uint8 [N,S,S,3] and ids [N,T] for the N real panels; boxes [B,P,4], mask [B,P]."""
        b, p = mask.shape
        idx = mask.reshape(-1).nonzero().squeeze(1)
        dtype = self.vision_proj.weight.dtype
        x = crops.permute(0, 3, 1, 2).to(dtype).div(255.0).sub(PIXEL_MEAN).div(PIXEL_STD)
        vis = self.vision_proj(self.vision(pixel_values=x).last_hidden_state[:, 0])
        txt = self.text_proj(self.text(input_ids=ids, attention_mask=ids_mask).last_hidden_state[:, 0])
        feats = box_features(boxes.float(), page_size.float().unsqueeze(1).expand(b, p, 2))
        geo = self.geometry(feats.reshape(b * p, -1).index_select(0, idx).to(vis.dtype))
        fused = self.fusion(vis, txt, geo)
        panels = torch.zeros(b * p, fused.shape[-1], dtype=fused.dtype, device=fused.device)
        panels = panels.index_copy(0, idx, fused).reshape(b, p, -1)
        page, weights = self.pool(panels, mask)
        scores, start = self.next_panel(panels, mask)
        return {"page": page, "panels": panels, "weights": weights, "scores": scores, "start": start}


def backbone_parameters(module: ClosureLiteBase) -> dict[str, int]:
    return {
        "vision": sum(t.numel() for t in module.vision.parameters()),
        "text": sum(t.numel() for t in module.text.parameters()),
    }


# --------------------------------------------------------------------------- tokenisation

class _ByteTokens:
    """Fallback for seeded models without a tokenizer: UTF-8 byte b -> id b + 3."""

    def encode_ids(self, text: str, max_tokens: int) -> np.ndarray:
        data = np.frombuffer(text.encode("utf-8", "replace")[: max_tokens - 2], dtype=np.uint8).astype(np.int64)
        return np.concatenate([[BOS_ID], data + 3, [EOS_ID]]).astype(np.int64)


class _FileTokens:
    def __init__(self, directory: str | os.PathLike, vocab_size: int):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover
            raise ModuleNotFoundError(f"{INSTALL_HINT}; missing: tokenizers", name="tokenizers") from exc
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"tokenizer_dir {os.fspath(directory)!r} has no tokenizer.json")
        self.tok = Tokenizer.from_file(str(path))
        self.tok.no_padding()
        self.tok.no_truncation()
        if self.tok.get_vocab_size() > vocab_size:
            raise ValueError(
                f"tokenizer in {os.fspath(directory)!r} has {self.tok.get_vocab_size()} ids but the text model "
                f"has {vocab_size} embeddings"
            )
        self.bos = self.tok.token_to_id("<s>")
        self.eos = self.tok.token_to_id("</s>")

    def encode_ids(self, text: str, max_tokens: int) -> np.ndarray:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        bos = BOS_ID if self.bos is None else self.bos
        eos = EOS_ID if self.eos is None else self.eos
        return np.asarray([bos, *ids[: max_tokens - 2], eos], dtype=np.int64)


# --------------------------------------------------------------------------- the PageModel

@dataclass
class BasePrepared:
    crops: np.ndarray  # uint8 [n, 224, 224, 3]
    token_ids: list  # one int64 array per panel (with <s> ... </s>)
    boxes: np.ndarray  # float32 [n, 4]
    page_size: tuple[int, int]


class ClosureBaseModel:
    def __init__(self, module: ClosureLiteBase, tokens, info: ModelInfo, device: str, max_tokens: int):
        self.module = module.to(device).eval()
        self.tokens = tokens
        self.info = info
        self.device = device
        self.max_tokens = max_tokens
        self.image_size = int(module.vision.config.image_size)
        self.panel_side = least_side(self.image_size)  # pages are decoded just large enough for these crops

    def prepare(self, page) -> BasePrepared:
        boxes = np.asarray(page.boxes, dtype=np.float32).reshape(-1, 4)[: self.info.max_panels]
        n = boxes.shape[0]
        s = self.image_size
        crops = crop_panels(page.rgb(), page.image_boxes()[:n], s)
        texts = [(t or "") for t in list(page.texts)[:n]] + [""] * max(0, n - len(page.texts))
        ids = [self.tokens.encode_ids(t, self.max_tokens) for t in texts]
        return BasePrepared(crops, ids, boxes, page.size)

    def collate(self, prepared: list[BasePrepared]) -> dict[str, Tensor]:
        b, p, s = len(prepared), self.info.max_panels, self.image_size
        boxes = np.zeros((b, p, 4), dtype=np.float32)
        sizes = np.zeros((b, 2), dtype=np.float32)
        mask = np.zeros((b, p), dtype=bool)
        seqs = []
        for i, item in enumerate(prepared):
            n = item.boxes.shape[0]
            boxes[i, :n], sizes[i], mask[i, :n] = item.boxes, item.page_size, True
            seqs.extend(item.token_ids)
        crops = [it.crops for it in prepared if it.crops.shape[0]]
        t = max((len(q) for q in seqs), default=2)
        ids = np.full((len(seqs), t), PAD_ID, dtype=np.int64)
        ids_mask = np.zeros((len(seqs), t), dtype=np.int64)
        for i, q in enumerate(seqs):
            ids[i, : len(q)], ids_mask[i, : len(q)] = q, 1
        return {
            "crops": torch.from_numpy(np.concatenate(crops) if crops else np.zeros((0, s, s, 3), np.uint8)),
            "ids": torch.from_numpy(ids), "ids_mask": torch.from_numpy(ids_mask),
            "boxes": torch.from_numpy(boxes), "page_size": torch.from_numpy(sizes), "mask": torch.from_numpy(mask),
        }

    def forward(self, batch: dict[str, Tensor]) -> dict[str, np.ndarray]:
        with inference(self.device):
            t = to_device(batch, self.device)
            mask = t["mask"]
            if t["crops"].shape[0] == 0:  # no panel in the whole batch: skip the backbones
                out = self._empty(mask)
            else:
                out = self.module(t["crops"], t["ids"], t["ids_mask"], t["boxes"], t["page_size"], mask)
            order = decode_reading_order(out["scores"], mask, out["start"])
            return named_outputs(out["page"], out["panels"], out["weights"], order, mask)

    def _empty(self, mask: Tensor) -> dict:
        b, p = mask.shape
        dim = self.info.embedding_dim
        panels = torch.zeros(b, p, dim, device=mask.device)
        page, weights = self.module.pool(panels, mask)
        scores = torch.full((b, p, p), float("-inf"), device=mask.device)
        return {"page": page, "panels": panels, "weights": weights, "scores": scores,
                "start": torch.full((b, p), float("-inf"), device=mask.device)}


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older/newer transformers: just pay for the init
        return contextlib.nullcontext()
    return no_init_weights()


def build_closure_lite_base(
    *,
    max_panels: int = 12,
    embedding_dim: int | None = None,
    checkpoint: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    tokenizer_dir: str | None = None,
    max_text_tokens: int = 128,
    **options,
) -> ClosureBaseModel:
    """Factory for ``--model closure-lite-base`` (see :mod:`pipeline.model.registry`)."""
    check_common("closure-lite-base", options, max_panels)
    text_config = roberta_base_config()
    if not 3 <= max_text_tokens <= text_config.max_position_embeddings - 2:
        raise ValueError(f"max_text_tokens must be between 3 and {text_config.max_position_embeddings - 2}")
    state = None
    if checkpoint is not None:
        if tokenizer_dir is None:
            raise ValueError(
                "model 'closure-lite-base' with a checkpoint needs the tokenizer it was trained with: "
                "pass tokenizer_dir (a folder with tokenizer.json)"
            )
        state = load_state_dict(checkpoint)
    dim = embedding_dim_of(state, embedding_dim, DEFAULT_DIM)
    if dim < 1 or dim % POOL_HEADS:
        raise ValueError(
            f"model 'closure-lite-base': embedding_dim must be a positive multiple of {POOL_HEADS} "
            f"(the attention-pooling heads), got {dim}"
        )
    tokens = _FileTokens(tokenizer_dir, text_config.vocab_size) if tokenizer_dir is not None else _ByteTokens()
    with seeded(seed):
        # a strict checkpoint load overwrites every weight: skip the (slow) random init then
        with _no_init() if state is not None else contextlib.nullcontext():
            module = ClosureLiteBase(dim, vit_b16_config(), text_config)
    if state is not None:
        apply_state_dict(module, state, strict=True, source=os.path.basename(os.fspath(checkpoint)))
    digest, source = weights_identity(checkpoint, seed)
    info = ModelInfo(
        name="closure-lite-base", embedding_dim=dim, max_panels=int(max_panels),
        weights_digest=digest, weights_source=source,
        extra={
            "vision": "vit-b16-224", "text": "roberta-base", "max_text_tokens": int(max_text_tokens),
            "tokenizer": "file" if tokenizer_dir is not None else "bytes", "pool_heads": POOL_HEADS,
            **{f"{k}_parameters": v for k, v in backbone_parameters(module).items()},
        },
    )
    return ClosureBaseModel(module, tokens, info, resolve_device(device), int(max_text_tokens))


__all__ = ["build_closure_lite_base", "ClosureBaseModel", "ClosureLiteBase", "backbone_parameters",
           "vit_b16_config", "roberta_base_config", "CheckpointError", "INSTALL_HINT"]
