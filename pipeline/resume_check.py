"""Refuse a store made with other settings before anything starts: no cluster, no model, no lock.

The full check compares the loaded model's own description with the store's attributes, once the
workers have loaded it (``build``). Most differences are known from the command line already: the
model's name, the weights of a seeded built-in model (``seed:N``) or of a local checkpoint file (its
sha256, read here), the embedding dimension asked of a built-in model and the storage dtype. Those
are compared here, so a rerun with another setting is told in a second, not after a cluster started.
``pretrained``'s digest covers its installed weight files and settings, and a ``package.module:factory``
model describes itself: the full check keeps those.
"""
from __future__ import annotations

import hashlib
import os

from .errors import BadArgument
from .model.registry import BUILTIN

#: Hex digits of a sha256 shown in messages: enough to tell two apart, short enough to read.
SHORT_DIGEST = 12


def short_digest(value):
    """A 64-hex sha256 cut to ``SHORT_DIGEST`` digits; any other value (``seed:0``, 128) as it is."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value.lower()):
        return value[:SHORT_DIGEST]
    return value


def expected_settings(model: str, checkpoint: str | None, seed: int, embedding_dim: int | None,
                      embedding_dtype: str) -> dict:
    """The store attributes this build will write that the client can tell without loading the model."""
    out: dict = {"embedding_dtype": embedding_dtype}
    if model not in BUILTIN:
        return out
    out["model"] = model
    if embedding_dim is not None:
        out["embedding_dim"] = int(embedding_dim)
    if model != "pretrained":  # tiny and closure-lite-base: the seed, or the checkpoint file's sha256
        if checkpoint is None:
            out["weights_digest"] = f"seed:{seed}"
        elif "://" not in os.fspath(checkpoint):
            out["weights_digest"] = _file_sha256(checkpoint)
    return out


def refuse_other_settings(store, existing, **settings) -> None:
    """Raise ``BadArgument`` (one line, short digests) when ``existing`` (the store's ``StoreConfig``)
    was made with settings other than those of :func:`expected_settings`; ``store`` is only named
    in the message."""
    expected = expected_settings(**settings)
    diffs = [f"{key} {short_digest(getattr(existing, key))!r} (store) vs {short_digest(value)!r} (this build)"
             for key, value in expected.items() if getattr(existing, key) != value]
    if diffs:
        raise BadArgument(f"store {store} was made with different settings: {'; '.join(diffs)}; "
                          "use --overwrite to start afresh (or a new --out)")


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise BadArgument(f"cannot read checkpoint {os.fspath(path)}: {exc.strerror or exc}") from None
    return h.hexdigest()
