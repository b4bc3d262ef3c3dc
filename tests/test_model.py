"""The tiny model, the shared layers and safe checkpoint loading."""
from __future__ import annotations

import hashlib
import os
import pickle
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline.model.checkpoint import (
    CheckpointError,
    _scan_checkpoint,
    apply_state_dict,
    file_digest,
    load_state_dict,
    save_safetensors,
)
from pipeline.model.layers import (
    MaskedAttentionPool,
    MaskedMultiHeadPool,
    decode_reading_order,
    masked_softmax,
)
from pipeline.model.protocol import PageModel
from pipeline.model.registry import ModelNotFound, load_model
from pipeline.pages import Page

P = 12


def make_page(i: int, n: int = 8, size=(320, 480)) -> Page:
    """A drawn page with ``n`` panels in two columns, each with a distinct blob and text."""
    w, h = size
    rng = np.random.default_rng(i)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    rows = max(1, (n + 1) // 2)
    boxes = []
    for k in range(n):
        r, c = divmod(k, 2)
        bx, by, bw, bh = 5 + c * (w // 2), 5 + r * (h // rows), w // 2 - 10, h // rows - 10
        draw.rectangle([bx, by, bx + bw, by + bh], outline="black", width=2)
        cx, cy = bx + int(rng.integers(5, max(6, bw - 20))), by + int(rng.integers(5, max(6, bh - 20)))
        draw.ellipse([cx, cy, cx + 15, cy + 15], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        boxes.append([bx, by, bw, bh])
    texts = [f"page {i} panel {k}: ça va? 💥" * (k % 3) for k in range(n)]
    return Page(f"p{i}", image, np.asarray(boxes, np.float32).reshape(-1, 4), texts, n)


def run(model, pages):
    return model.forward(model.collate([model.prepare(p) for p in pages]))


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_model("tiny", max_panels=P)


@pytest.fixture(scope="module")
def batch_pages():
    counts = [8, 3, 0, 12, 1, 5, 8, 2, 7, 0, 4, 6, 11, 8, 1, 9]
    return [make_page(i, n) for i, n in enumerate(counts)]


@pytest.fixture(scope="module")
def batch_out(tiny, batch_pages):
    return run(tiny, batch_pages)


def test_protocol_info_shapes_and_dtypes(tiny, batch_pages, batch_out):
    assert isinstance(tiny, PageModel)
    info = tiny.info
    assert (info.name, info.embedding_dim, info.max_panels) == ("tiny", 128, P)
    assert (info.weights_digest, info.weights_source) == ("seed:0", "seeded-init")
    b, d = len(batch_pages), 128
    expect = {
        "page_embeddings": ((b, d), np.float32),
        "panel_embeddings": ((b, P, d), np.float32),
        "attention_weights": ((b, P), np.float32),
        "reading_order": ((b, P), np.int16),
    }
    assert {k: (v.shape, v.dtype) for k, v in batch_out.items()} == expect
    for v in batch_out.values():
        assert np.isfinite(v).all()


def test_attention_and_padding(batch_pages, batch_out):
    for i, page in enumerate(batch_pages):
        n = page.n_kept
        w = batch_out["attention_weights"][i]
        assert (w[n:] == 0).all()
        assert (batch_out["panel_embeddings"][i, n:] == 0).all()
        if n:
            assert abs(w[:n].sum() - 1.0) < 1e-5 and (w[:n] > 0).all()
            assert np.abs(batch_out["panel_embeddings"][i, :n]).sum(axis=-1).min() > 0
        else:
            assert (w == 0).all()


def test_reading_order_is_permutation(batch_pages, batch_out):
    for i, page in enumerate(batch_pages):
        n = page.n_kept
        order = batch_out["reading_order"][i]
        assert sorted(order[:n].tolist()) == list(range(n))
        assert (order[n:] == -1).all()


def test_zero_panel_page_alone_is_finite(tiny):
    out = run(tiny, [make_page(0, 0)])
    assert all(np.isfinite(v).all() for v in out.values())
    assert (out["attention_weights"] == 0).all() and (out["reading_order"] == -1).all()


def test_degenerate_boxes_do_not_crash(tiny):
    page = make_page(1, 3)
    w, h = page.size
    page.boxes = np.array([[0, 0, 0, 0], [w - 0.5, h - 0.5, 0.2, 0.0], [10, 10, 0.3, 200]], np.float32)
    page.texts = ["", "x", ""]
    out = run(tiny, [page])
    assert np.isfinite(out["page_embeddings"]).all()
    assert sorted(out["reading_order"][0, :3].tolist()) == [0, 1, 2]


def test_batch_of_one_equals_batch_of_sixteen(tiny, batch_pages, batch_out):
    for i, page in enumerate(batch_pages):
        one = run(tiny, [page])
        for key, value in one.items():
            np.testing.assert_allclose(value[0], batch_out[key][i], atol=1e-5, rtol=0, err_msg=key)


def test_seeded_init_is_deterministic_and_leaves_global_rng_alone(batch_pages):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = load_model("tiny", max_panels=P, seed=7)
    assert torch.equal(torch.rand(3), expected)
    b = load_model("tiny", max_panels=P, seed=7)
    c = load_model("tiny", max_panels=P, seed=8)
    pages = batch_pages[:4]
    oa, ob, oc = run(a, pages), run(b, pages), run(c, pages)
    assert a.info.weights_digest == "seed:7"
    np.testing.assert_array_equal(oa["page_embeddings"], ob["page_embeddings"])
    assert not np.allclose(oa["page_embeddings"], oc["page_embeddings"])


def test_safetensors_roundtrip_via_registry(tiny, batch_pages, batch_out, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_safetensors(tiny.module, path)
    loaded = load_model("tiny", max_panels=P, checkpoint=str(path), seed=99)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.info.weights_digest == digest == file_digest(path)
    assert loaded.info.weights_source == "checkpoint:tiny.safetensors"
    out = run(loaded, batch_pages)
    for key in batch_out:
        np.testing.assert_array_equal(out[key], batch_out[key])


@pytest.mark.parametrize("nest", [None, "state_dict", "model"])
def test_torch_save_state_dict_loads_weights_only(tiny, tmp_path, nest):
    state = tiny.module.state_dict()
    path = tmp_path / "tiny.pt"
    torch.save(state if nest is None else {nest: state, "epoch": 3}, path)
    loaded = load_state_dict(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    model = load_model("tiny", max_panels=P, checkpoint=str(path))
    assert model.info.weights_source == "checkpoint:tiny.pt"


def test_legacy_torch_format_loads(tiny, batch_pages, batch_out, tmp_path):
    state = tiny.module.state_dict()
    path = tmp_path / "legacy.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)  # the pre-1.6 format, not the zip one
    loaded = load_state_dict(path)
    assert loaded.keys() == state.keys()
    for k in state:
        assert loaded[k].dtype == state[k].dtype and torch.equal(loaded[k], state[k]), k
    model = load_model("tiny", max_panels=P, checkpoint=str(path), seed=99)  # not the fixture's seed
    out = run(model, batch_pages)
    for key in batch_out:
        np.testing.assert_array_equal(out[key], batch_out[key])


class Evil:
    """Unpickling this creates the marker file: the attack we must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_files(tmp_path, marker):
    plain = tmp_path / "evil_plain.pt"
    plain.write_bytes(pickle.dumps({"w": Evil(marker)}, protocol=4))
    zipped = tmp_path / "evil_zip.pt"
    torch.save({"w": torch.zeros(2), "x": Evil(marker)}, zipped)
    assert zipfile.is_zipfile(zipped)
    return [plain, zipped]


@pytest.mark.parametrize("force_env", [False, True])
def test_malicious_pickle_is_refused(tmp_path, monkeypatch, force_env):
    marker = str(tmp_path / "PWNED")
    files = _evil_files(tmp_path, marker)
    if force_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for path in files:
        with pytest.raises(CheckpointError, match=path.name):
            load_state_dict(path)
        with pytest.raises(CheckpointError):
            load_model("tiny", checkpoint=str(path))
        # the pickle scan alone also refuses (second lock, independent of torch)
        with pytest.raises(ValueError, match=r"unsafe global (io|builtins)\.open"):
            _scan_checkpoint(str(path))
    assert not os.path.exists(marker)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_torch_keeps_explicit_weights_only_under_force_env(tmp_path, monkeypatch):
    """The claim checkpoint.py relies on: an explicit weights_only=True beats the env var."""
    marker = str(tmp_path / "PWNED")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for path in _evil_files(tmp_path, marker):
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, map_location="cpu", weights_only=True)
    assert not os.path.exists(marker)


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a checkpoint" * 10)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\xff" * 64)
    not_tensors = tmp_path / "dict.pt"
    torch.save({"lr": 0.1, "w": torch.zeros(1)}, not_tensors)
    for path in (garbage, bad_st, not_tensors):
        with pytest.raises(CheckpointError) as err:
            load_state_dict(path)
        assert path.name in str(err.value) and "\n" not in str(err.value)


def test_mismatched_checkpoint_names_keys(tiny, tmp_path):
    state = dict(tiny.module.state_dict())
    state.pop("pool.query")
    state["extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        apply_state_dict(load_model("tiny").module, state, source="x.pt")
    msg = str(err.value)
    assert "1 missing key(s): pool.query" in msg and "1 unexpected key(s): extra.weight" in msg and "x.pt" in msg
    path = tmp_path / "wrong_dim.safetensors"
    save_safetensors(load_model("tiny", embedding_dim=64).module, path)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_model("tiny", embedding_dim=128, checkpoint=str(path))
    assert load_model("tiny", checkpoint=str(path)).info.embedding_dim == 64  # dim read from checkpoint


def test_registry_errors_and_user_factory(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFound):
        load_model("no-such-model")
    with pytest.raises(ModelNotFound):
        load_model("pagecube_no_such_module_xyz:build")
    with pytest.raises(ValueError, match="bogus"):
        load_model("tiny", bogus=1)
    (tmp_path / "my_comics_model.py").write_text(
        "from pipeline.model.tiny import build_tiny\n"
        "def build(**kw):\n"
        "    kw.pop('flavour')\n"
        "    return build_tiny(**kw)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("my_comics_model:build", max_panels=4, embedding_dim=32, flavour="x")
    out = run(model, [make_page(3, 3)])
    assert out["panel_embeddings"].shape == (1, 4, 32)
    sys.modules.pop("my_comics_model", None)


def test_decode_reading_order_edge_cases():
    torch.manual_seed(0)
    mask = torch.tensor([[True] * 6, [True, False, True, False, True, False], [False] * 6])
    for scores in (torch.randn(3, 6, 6), torch.zeros(3, 6, 6), torch.full((3, 6, 6), float("nan"))):
        order = decode_reading_order(scores, mask)
        again = decode_reading_order(scores, mask)
        assert torch.equal(order, again) and order.dtype == torch.long
        for row, m in zip(order, mask):
            assert sorted(row[m].tolist()) == list(range(int(m.sum())))
            assert (row[~m] == -1).all()
    chain = torch.full((1, 4, 4), -5.0)
    for a, b in [(2, 0), (0, 3), (3, 1)]:
        chain[0, a, b] = 5.0
    start = torch.tensor([[0.0, 0.0, 9.0, 0.0]])
    assert decode_reading_order(chain, torch.ones(1, 4, dtype=torch.bool), start).tolist() == [[1, 3, 0, 2]]


def test_masked_pooling_layers():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    w = masked_softmax(torch.tensor([[1.0, 2.0, 50.0], [1.0, 2.0, 3.0]]), mask)
    assert torch.allclose(w[0].sum(), torch.tensor(1.0)) and w[0, 2] == 0 and (w[1] == 0).all()
    pool = MaskedAttentionPool(8)
    page, weights = pool(torch.randn(2, 3, 8), mask)
    assert torch.isfinite(page).all() and torch.equal(page[1], pool.empty.detach())


def test_masked_multi_head_pool():
    torch.manual_seed(0)
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False], [False] * 5])
    panels = torch.randn(3, 5, 16)
    panels[~mask] = 0.0

    # heads=1 with an identity output projection is exactly the single-query pool
    single, multi = MaskedAttentionPool(16), MaskedMultiHeadPool(16, heads=1)
    with torch.no_grad():
        for name in ("query", "key.weight", "key.bias", "value.weight", "value.bias", "empty"):
            multi.get_parameter(name).copy_(single.get_parameter(name))
        multi.out.weight.copy_(torch.eye(16))
        multi.out.bias.zero_()
        page1, w1 = single(panels, mask)
        page2, w2 = multi(panels, mask)
    assert page2.shape == (3, 16) and w2.shape == (3, 5)
    torch.testing.assert_close(page2, page1)
    torch.testing.assert_close(w2, w1)

    # the contract at 8 heads: sums to 1 on valid panels, exactly 0 on padding, finite empty page
    pool = MaskedMultiHeadPool(16, heads=8)
    assert pool.query.shape == (16,)
    with torch.no_grad():
        pool.empty.normal_()
        page, weights = pool(panels, mask)
        per_head = pool.head_weights(panels, mask)
    assert torch.isfinite(page).all() and torch.isfinite(weights).all()
    assert per_head.shape == (3, 8, 5) and (per_head[~mask.unsqueeze(1).expand_as(per_head)] == 0).all()
    assert (weights[~mask] == 0).all() and (weights[2] == 0).all()
    torch.testing.assert_close(weights[:2].sum(-1), torch.ones(2))
    torch.testing.assert_close(per_head[:2].sum(-1), torch.ones(2, 8))
    assert torch.equal(page[2], pool.empty.detach())
    torch.testing.assert_close(weights, per_head.mean(1))
    # a padded slot's content never leaks in, and pages of a batch stay apart
    noisy = panels.clone()
    noisy[~mask] = 1e3
    with torch.no_grad():
        page_n, weights_n = pool(noisy, mask)
        alone, w_alone = pool(panels[:1], mask[:1])
    torch.testing.assert_close(page_n, page)
    assert torch.equal(weights_n, weights)
    torch.testing.assert_close(alone[0], page[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w_alone[0], weights[0], atol=1e-6, rtol=1e-6)

    # different heads can attend to different panels
    two = MaskedMultiHeadPool(4, heads=2)
    with torch.no_grad():
        two.key.weight.copy_(torch.eye(4))
        two.key.bias.zero_()
        two.query.copy_(torch.tensor([10.0, 0.0, 10.0, 0.0]))
        x = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
        m = torch.tensor([[True, True, False]])
        heads = two.head_weights(x, m)[0]
        _, mean = two(x, m)
    assert heads[0].argmax() == 0 and heads[1].argmax() == 1 and heads[0, 0] > 0.9 and heads[1, 1] > 0.9
    assert (heads[:, 2] == 0).all()
    torch.testing.assert_close(mean[0, :2].sum(), torch.tensor(1.0))
    assert abs(float(mean[0, 0] - mean[0, 1])) < 1e-6  # symmetric set-up: the mean splits evenly
    with pytest.raises(ValueError, match="multiple of heads"):
        MaskedMultiHeadPool(10, heads=8)
