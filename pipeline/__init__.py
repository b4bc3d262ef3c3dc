"""pagecube: comic pages -> an xarray/Zarr embedding cube, built in parallel on Dask.

The public API is small: :func:`build` a store (its options:
:class:`BuildOptions`), :func:`open_pages` to read it (mid-run too),
:func:`store_status` to watch it, and the model protocol for bringing your own
model.

Names are imported on first use: ``import pipeline`` (and so ``pagecube
--version``, ``pagecube status``, a worker importing a model) does not pull in
xarray, Dask or torch.
"""
import sys as _sys
import types as _types

from cluster.lazy import lazy_exports as _lazy_exports

_LAZY = {
    "__version__": "._version",
    "build": ".build", "BuildResult": ".build", "BuildOptions": ".options",
    "BadArgument": ".errors", "BuildError": ".errors",
    "ModelInfo": ".model.protocol", "PageModel": ".model.protocol",
    "open_pages": ".readers", "open_store": ".readers", "store_status": ".readers",
}

__all__ = ["__version__", "build", "BuildOptions", "BuildResult", "BadArgument", "BuildError", "open_pages",
           "open_store", "store_status", "ModelInfo", "PageModel"]


__getattr__, __dir__ = _lazy_exports(__name__, _LAZY)


class _Package(_types.ModuleType):
    """``pipeline.build`` stays the function: importing the submodule ``pipeline.build`` would
    otherwise rebind the package attribute to the module (the eager import used to undo that)."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
