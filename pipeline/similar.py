"""Similarity search over a store: the nearest finished pages by cosine of ``page_embeddings``.

Streams the store block by block along ``page`` (a block is a whole number of
page chunks, at most ``block_bytes`` of embeddings), so memory stays bounded at
10^7 pages: per block it reads ``status`` (N bytes), then the embeddings of that
block only when some of its pages are done, and keeps a running top-k merged
with ``numpy.argpartition``.  Only pages with ``status == 1`` are ever scored,
so it works mid-run and after a crash.  Finding a query page by id streams
``page_id`` the same way.  Page ids, series and text are read for the k results
only.

Text queries rank in two keys (a hybrid ranking): first by how many of the
query's words a page's ``text_content`` holds as whole words (case-insensitive,
any panel), one more when a panel says them as the query does (the phrase, in
order), then by the cosine of the embedded query.  A user searching "hidden
garden" expects the pages that say it first; the embedding orders them and
finds the pages that say something close.  Text is then streamed with the
embeddings (``numpy.strings`` finds candidates, a regex checks word bounds).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import zarr

from .lookup import BLOCK_BYTES, NotAStore, SimilarError, blocks, find_page, open_group, pages_per_block
from .store.schema import STATUS_DONE, STATUS_FAILED

SNIPPET_LEN = 60


class SimilarPage(NamedTuple):
    page_index: int
    page_id: str
    score: float
    words: int = 0  # text queries: how many of the query's words the page's text holds
    phrase: bool = False  # text queries: a panel says the query's words in order (more than one word)


@dataclass(frozen=True)
class PageInfo:
    page_index: int
    page_id: str
    series: str
    snippet: str


# --------------------------------------------------------------------------- streaming the store

def iter_done_embeddings(store, *, storage_options: dict | None = None, block_pages: int | None = None,
                         block_bytes: int = BLOCK_BYTES, _group: zarr.Group | None = None
                         ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(page_indices, embeddings float32 [m, D])`` for the done pages of each block, in page order.

    A block is ``block_pages`` pages rounded down to whole page chunks (default: as many
    as fit in ``block_bytes`` of embeddings).  Blocks without done pages read only ``status``.
    """
    group = _group if _group is not None else open_group(store, storage_options)[1]
    status, emb = group["status"], group["page_embeddings"]
    size = pages_per_block(group, block_pages, block_bytes)
    for start, stop in blocks(int(status.shape[0]), size):
        done = np.flatnonzero(np.asarray(status[start:stop]) == STATUS_DONE)
        if done.size == 0:
            continue
        vecs = np.asarray(emb[start:stop], dtype=np.float32)[done]
        yield done.astype(np.int64) + start, vecs


# --------------------------------------------------------------------------- the query page

def page_vector(store, page: int, *, storage_options: dict | None = None, _group: zarr.Group | None = None
                ) -> np.ndarray:
    """The embedding of page ``page``; refused unless it is done."""
    group = _group if _group is not None else open_group(store, storage_options)[1]
    state = int(group["status"][page])
    if state != STATUS_DONE:
        what = "failed" if state == STATUS_FAILED else "not done yet (pending)"
        raise SimilarError(f"page @{page} is {what}: it has no embedding to search with")
    return np.asarray(group["page_embeddings"][page], dtype=np.float32)


# --------------------------------------------------------------------------- words in text

def query_words(text: str) -> list[str]:
    """The distinct words of a text query, lower case, in order (``\\w+``: letters, digits, underscore)."""
    return list(dict.fromkeys(w.lower() for w in re.findall(r"\w+", text or "")))


def _rows_matching(low: np.ndarray, first: str, pattern: re.Pattern) -> np.ndarray:
    """Rows of ``low`` (lower-cased pages x panels) where a panel matches ``pattern`` (it holds ``first``)."""
    has = np.zeros(low.shape[0], dtype=bool)
    for row, col in zip(*np.nonzero(np.strings.find(low, first) >= 0)):  # substring first: cheap, rare
        has[row] = has[row] or pattern.search(str(low[row, col])) is not None
    return has


def words_found(texts, words: list[str], phrase_bonus: bool = False) -> np.ndarray:
    """For each row of ``texts`` (pages x panels), how many of ``words`` it holds as whole words; with
    ``phrase_bonus``, one more where a panel says all of them in order (``hidden ... garden``, only
    spaces and punctuation between)."""
    texts = np.asarray(texts)
    found = np.zeros(texts.shape[0], dtype=np.int64)
    if not words or texts.size == 0:
        return found
    low = np.strings.lower(texts.astype(np.dtypes.StringDType()))
    for word in words:
        found += _rows_matching(low, word, re.compile(rf"(?<!\w){re.escape(word)}(?!\w)"))
    if phrase_bonus and len(words) > 1:
        said = r"\W+".join(map(re.escape, words))
        found += _rows_matching(low, words[0], re.compile(rf"(?<!\w){said}(?!\w)"))
    return found


# --------------------------------------------------------------------------- search

def _merge(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray, k: int):
    """Keep the k best of both sets: highest score first, lower page index on ties."""
    if s.size > k:  # cut the block first; keep every tie of the k-th score so ties resolve by index
        kth = s[np.argpartition(-s, k - 1)[k - 1]]
        keep = s >= kth
        s, i = s[keep], i[keep]
    s, i = np.concatenate([best_s, s]), np.concatenate([best_i, i])
    order = np.lexsort((i, -s))[:k]
    return s[order], i[order]


def _unit_query(vector, dim: int) -> np.ndarray:
    q = np.asarray(vector, dtype=np.float64).reshape(-1)
    if q.shape[0] != dim:
        raise SimilarError(f"query vector has {q.shape[0]} dimensions, the store's embeddings have {dim}")
    norm = float(np.linalg.norm(q))
    if not np.isfinite(norm) or norm == 0.0:
        raise SimilarError("query vector is zero or not finite")
    return (q / norm).astype(np.float32)


#: a text query's rank key is words found x WORD_WEIGHT + cosine: a cosine (within [-1, 1]) never
#: lifts a page above one that holds more of the query's words
WORD_WEIGHT = 4.0


def search_vector(store, vector, *, k: int = 10, exclude: int | None = None, storage_options: dict | None = None,
                  block_pages: int | None = None, block_bytes: int = BLOCK_BYTES, words: list[str] | None = None,
                  _group: zarr.Group | None = None) -> list[tuple[int, float]]:
    """``[(page_index, cosine)]`` of the k done pages nearest ``vector``, best first (no ids).

    With ``words``, pages whose ``text_content`` holds more of them come first (see the module docstring).
    """
    return [(i, s) for i, s, _ in _search(store, vector, k=k, exclude=exclude, storage_options=storage_options,
                                          block_pages=block_pages, block_bytes=block_bytes, words=words,
                                          _group=_group)]


def _search(store, vector, *, k, exclude, storage_options, block_pages, block_bytes, words, _group
            ) -> list[tuple[int, float, int]]:
    if int(k) < 1:
        raise SimilarError(f"k must be >= 1, got {k}")
    k = int(k)
    group = _group if _group is not None else open_group(store, storage_options)[1]
    q = _unit_query(vector, int(group["page_embeddings"].shape[1]))
    texts = group["text_content"] if words and "text_content" in group else None
    best_s = np.zeros(0, dtype=np.float64)
    best_i = np.zeros(0, dtype=np.int64)
    for idx, vecs in iter_done_embeddings(store, block_pages=block_pages, block_bytes=block_bytes, _group=group):
        norms = np.linalg.norm(vecs, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            scores = ((vecs @ q) / norms).astype(np.float64)
        ok = np.isfinite(scores)  # a done page never holds NaN, but a zero vector must not win
        if exclude is not None:
            ok &= idx != exclude
        if not ok.all():
            scores, idx = scores[ok], idx[ok]
        if texts is not None and scores.size:
            scores = scores + WORD_WEIGHT * words_found(_read_rows(texts, idx), words, phrase_bonus=True)
        if scores.size:
            best_s, best_i = _merge(best_s, best_i, scores, idx, k)
    found = np.round(best_s / WORD_WEIGHT).astype(np.int64)
    cosine = (best_s - WORD_WEIGHT * found).astype(np.float32)
    return [(int(i), float(s), int(n)) for i, s, n in zip(best_i, cosine, found)]


def _read_rows(arr, indices: np.ndarray) -> np.ndarray:
    """Rows ``indices`` of a page-chunked array (reads only the chunks they fall in)."""
    if indices.size == 0:
        return np.asarray(arr[0:0])
    return np.asarray(arr.oindex[indices])


def similar_pages(store, page_id: str | None = None, *, vector=None, k: int = 10,
                  storage_options: dict | None = None, exclude_self: bool = True,
                  block_pages: int | None = None, block_bytes: int = BLOCK_BYTES,
                  words: list[str] | None = None) -> list[SimilarPage]:
    """The k finished pages (``status == 1``) nearest by cosine of ``page_embeddings``, best first.

    Query by ``page_id`` (a page id, or ``@N`` for the page at position N; it must be done)
    or by ``vector`` (``[embedding_dim]``).  With ``exclude_self`` the query page itself is
    not returned.  With ``words`` (a text query's, ``query_words``), pages whose text holds more
    of them come first (a panel that says them in order counts one more), each group by cosine.  Memory is bounded by one block of embeddings
    plus k results.
    """
    if (page_id is None) == (vector is None):
        raise SimilarError("give either a page id or a query vector")
    _, group = open_group(store, storage_options)
    exclude = None
    if page_id is not None:
        page = find_page(store, page_id, block_pages=block_pages, _group=group)
        vector = page_vector(store, page, _group=group)
        exclude = page if exclude_self else None
    hits = _search(store, vector, k=k, exclude=exclude, storage_options=None, block_pages=block_pages,
                   block_bytes=block_bytes, words=words, _group=group)
    idx = np.asarray([i for i, _, _ in hits], dtype=np.int64)
    ids = _read_rows(group["page_id"], idx)
    phrase = bool(words) and len(words) > 1
    return [SimilarPage(i, str(pid), s, min(n, len(words or ())), phrase and n > len(words))
            for (i, s, n), pid in zip(hits, ids)]


def describe_pages(store, indices, *, storage_options: dict | None = None, snippet_len: int = SNIPPET_LEN,
                   _group: zarr.Group | None = None) -> list[PageInfo]:
    """Id, series and first panel text (in reading order) of a few pages."""
    group = _group if _group is not None else open_group(store, storage_options)[1]
    idx = np.asarray(list(indices), dtype=np.int64)
    ids = _read_rows(group["page_id"], idx)
    series = _read_rows(group["series"], idx) if "series" in group else [""] * len(idx)
    texts = _read_rows(group["text_content"], idx) if "text_content" in group else None
    order = _read_rows(group["reading_order"], idx) if "reading_order" in group else None
    out = []
    for row, i in enumerate(idx):
        snippet = ""
        if texts is not None:
            t = np.asarray(texts[row], dtype=object)
            slots = range(len(t))
            if order is not None:
                o = np.asarray(order[row])
                slots = sorted((s for s in slots if o[s] >= 0), key=lambda s: o[s]) or list(slots)
            first = next((str(t[s]) for s in slots if str(t[s]).strip()), "")
            snippet = " / ".join(x.strip() for x in first.splitlines() if x.strip())
            if len(snippet) > snippet_len:
                snippet = snippet[: snippet_len - 1] + "…"
        out.append(PageInfo(int(i), str(ids[row]), str(series[row]), snippet))
    return out


# --------------------------------------------------------------------------- text queries

def embed_text_query(store, text: str, *, model: str | None = None, model_options: dict | None = None,
                     device: str = "cpu", seed: int = 0, storage_options: dict | None = None) -> np.ndarray:
    """Embed ``text`` with the text tower of the model the store was built with.

    ``model`` defaults to the store's ``model`` attribute.  The loaded model must match the
    store's ``model`` and ``weights_digest`` (same weights, seed and settings), else refused.
    """
    from .model.registry import ModelNotFound, load_model

    if not text or not text.strip():
        raise SimilarError("the query text is empty")
    store, group = open_group(store, storage_options)
    attrs = dict(group.attrs)
    built_with = str(attrs.get("model", ""))
    name = model or built_with
    if not name:
        raise SimilarError(f"{store} does not say which model built it; pass --model")
    from .model.registry import BUILTIN

    if name in BUILTIN and built_with in BUILTIN and name != built_with:  # refuse before loading weights
        raise SimilarError(f"store {store} was built with model {built_with!r}, not {name!r}: a text query is "
                           f"only meaningful in the embedding space of the model that built the store")
    try:
        m = load_model(name, max_panels=int(attrs.get("max_panels", 12)),
                       embedding_dim=int(attrs["embedding_dim"]) if "embedding_dim" in attrs else None,
                       device=device, seed=seed, **(model_options or {}))
    except ModelNotFound as exc:
        raise SimilarError(str(exc)) from None
    info = m.info
    digest = str(attrs.get("weights_digest", ""))
    if info.name != built_with or info.weights_digest != digest:
        raise SimilarError(
            f"store {store} was built with model {built_with!r} (weights {digest[:12] or '?'}), not with "
            f"{info.name!r} (weights {info.weights_digest[:12]}): a text query is only meaningful in the "
            f"embedding space of the model (same seed and options) that built the store")
    embed = getattr(m, "embed_texts", None)
    if not callable(embed):
        raise SimilarError(f"model {info.name!r} has no text tower for text queries (embed_texts)")
    vec = np.asarray(embed([text]), dtype=np.float32)
    if vec.ndim != 2 or vec.shape[0] != 1:
        raise SimilarError(f"model {info.name!r}: embed_texts returned shape {vec.shape}, expected (1, D)")
    return vec[0]


def similar_to_text(store, text: str, *, model: str | None = None, k: int = 10, model_options: dict | None = None,
                    device: str = "cpu", seed: int = 0, storage_options: dict | None = None) -> list[SimilarPage]:
    """The k finished pages for a text query: those whose text holds more of its words first, each group
    by cosine to the query embedded by the store's model (see :func:`embed_text_query`)."""
    vec = embed_text_query(store, text, model=model, model_options=model_options, device=device, seed=seed,
                           storage_options=storage_options)
    return similar_pages(store, vector=vec, k=k, storage_options=storage_options, words=query_words(text))


__all__ = ["similar_pages", "similar_to_text", "embed_text_query", "iter_done_embeddings", "find_page",
           "describe_pages", "query_words", "words_found", "SimilarPage", "SimilarError", "NotAStore"]
