"""The installed version, read on first use (``importlib.metadata`` costs a tenth of a second to import)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pagecube")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
