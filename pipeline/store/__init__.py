"""The store: ``Store`` is its one face (``store.py``); the modules beside it each keep one concern.

Names are imported on first use, so ``from pipeline.store import Store`` stays cheap.
"""
from cluster.lazy import lazy_exports as _lazy_exports

_LAZY = {
    "Store": ".store", "RegionWriter": ".store",
    "StoreLocation": ".location", "parse_storage_options": ".location",
    "StoreConfig": ".template", "ChunkEntry": ".index",
    "LeaseLost": ".lock", "StoreLocked": ".lock", "StopRecord": ".stopped",
}
__all__ = sorted(_LAZY)

__getattr__, __dir__ = _lazy_exports(__name__, _LAZY)
