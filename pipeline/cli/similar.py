"""``pagecube similar``: the nearest finished pages to a page, or to a text query (one or the other)."""
from __future__ import annotations

from typing import Optional

import typer

from .app import app


@app.command()
def similar(
    store: str = typer.Argument(..., help="The store (a path or an fsspec URL such as s3://...)."),
    page_id: Optional[str] = typer.Argument(None, help="The query page: a page id, or @N for the page at position N. "
                                                       "It must be done (status 1). Not with --text."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="How many pages to show."),
    text: Optional[str] = typer.Option(None, "--text", help="Search with this text instead of a PAGE_ID: pages that "
                                                            "say it first, then those holding more of its words, each "
                                                            "group by cosine to the text embedded by the model's text "
                                                            "tower."),
    model: Optional[str] = typer.Option(None, "--model", help="With --text: the model that built the store "
                                                              "(default: the store's model attribute)."),
    seed: int = typer.Option(0, "--seed", help="With --text: the seed the store was built with."),
    device: str = typer.Option("cpu", "--device", help="With --text: where the text tower runs (cpu, cuda)."),
    include_self: bool = typer.Option(False, "--include-self", help="Also list the query page itself."),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", help="fsspec options for URLs, as a "
                                                                                  "JSON object or @FILE."),
) -> None:
    """Nearest finished pages to a page, or to a text query: one or the other, never both.

    pagecube similar STORE PAGE_ID [-k K]

    pagecube similar STORE --text TEXT [-k K]

    A page query ranks by cosine of page embeddings. Streams the store; works mid-run.

    A text query ranks first the pages that say it, then those holding more of its words, each group by cosine.
    """
    from ..errors import BadArgument
    from ..similar import (NotAStore, SimilarError, describe_pages, embed_text_query, find_page, query_words,
                           similar_pages)
    from ..store import Store, parse_storage_options

    if (page_id is None) == (text is None):
        raise BadArgument("give either a PAGE_ID or --text \"...\", not both: pagecube similar STORE PAGE_ID, "
                          "or pagecube similar STORE --text TEXT")
    if text is None and model is not None:
        raise BadArgument("--model only applies to --text queries")
    try:
        opened = Store.open(store, parse_storage_options(storage_options))
        if text is not None:
            vector = embed_text_query(opened, text, model=model, device=device, seed=seed)
            words = query_words(text)
            hits = similar_pages(opened, vector=vector, k=k, words=words)
            query = f"query: text {text!r} (pages that say it first, then those holding more of its words)"
        else:
            qi = find_page(opened, page_id)  # one pass over page_id, then by position
            hits = similar_pages(opened, f"@{qi}", k=k, exclude_self=not include_self)
            q = describe_pages(opened, [qi])[0]
            query = f"query: page @{q.page_index} {q.page_id}  series={q.series or '-'}  {q.snippet}"
        rows = describe_pages(opened, [h.page_index for h in hits])
    except NotAStore:
        raise  # not a bad argument: exit 1 with its line
    except (SimilarError, ValueError) as exc:
        raise BadArgument(str(exc)) from None
    print(query)
    if not hits:
        print("no other finished pages to compare with")
        return
    wid = max(4, *(len(h.page_id) for h in hits))
    wser = max(6, *(len(r.series or "-") for r in rows))
    def match(h) -> str:  # a text query's column: the phrase said, or how many of its words
        return "" if text is None else f"  {'phrase' if h.phrase else f'{h.words}/{len(words)}':<7}"

    print(f"{'rank':>4}  {'score':>7}{'  match  ' if text is not None else ''}  {'page':<{wid}}  "
          f"{'series':<{wser}}  first panel text")
    for rank, (hit, row) in enumerate(zip(hits, rows), 1):
        print(f"{rank:>4}  {hit.score:7.4f}{match(hit)}  {hit.page_id:<{wid}}  {row.series or '-':<{wser}}  "
              f"{row.snippet}")
