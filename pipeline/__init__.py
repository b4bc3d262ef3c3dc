"""pagecube: comic pages -> an xarray/Zarr embedding cube, built in parallel on Dask.

The public API is small: :func:`build` a store, :func:`open_pages` to read it
(mid-run too), :func:`store_status` to watch it, and the model protocol for
bringing your own model.
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("pagecube")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "build", "BuildResult", "BadArgument", "open_pages", "open_store", "store_status",
           "ModelInfo", "PageModel"]

# Imported on first use, so that light commands (``pagecube status``) do not pay for dask.array and torch.
_LAZY = {
    "build": ".build", "BuildResult": ".build", "BadArgument": ".errors",
    "open_pages": ".readers", "open_store": ".readers", "store_status": ".readers",
    "ModelInfo": ".model.protocol", "PageModel": ".model.protocol",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
