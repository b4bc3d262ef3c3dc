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

from .build import BuildResult, build  # noqa: E402
from .errors import BadArgument, BuildError  # noqa: E402
from .model.protocol import ModelInfo, PageModel  # noqa: E402
from .readers import open_pages, open_store, store_status  # noqa: E402

__all__ = ["__version__", "build", "BuildResult", "BadArgument", "BuildError", "open_pages", "open_store",
           "store_status", "ModelInfo", "PageModel"]
