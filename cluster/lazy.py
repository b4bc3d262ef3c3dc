"""Names of a package imported on first use (PEP 562), so that importing the package stays cheap."""
from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, table: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: each name in ``table`` comes from its relative module
    when first asked for, and is then kept in the package's namespace."""
    namespace = vars(sys.modules[package])

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name], package), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
