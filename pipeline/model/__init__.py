"""Models: the protocol, the registry and the built-in comics encoders.

Names are imported on first use: the registry (which model, what it needs) is read at the very start
of a build, before numpy or torch are imported anywhere.
"""
from cluster.lazy import lazy_exports as _lazy_exports

_LAZY = {
    "OUTPUT_SPECS": ".protocol", "ModelInfo": ".protocol", "PageModel": ".protocol",
    "BUILTIN": ".registry", "ModelNotFound": ".registry", "load_model": ".registry",
    "resolve_factory": ".registry",
}
__all__ = list(_LAZY)
__getattr__, __dir__ = _lazy_exports(__name__, _LAZY)
