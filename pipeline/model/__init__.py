"""Models: the protocol, the registry and the built-in comics encoders."""
from .protocol import OUTPUT_SPECS, ModelInfo, PageModel
from .registry import BUILTIN, ModelNotFound, load_model, resolve_factory

__all__ = ["OUTPUT_SPECS", "ModelInfo", "PageModel", "BUILTIN", "ModelNotFound", "load_model", "resolve_factory"]
