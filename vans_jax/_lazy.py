"""Lazy re-exports (PEP 562): a package names things that live elsewhere and imports them on first
use. Used for cheap package imports (``vans_jax.data``) and for the public facades that keep
stable names where the code moved up the layers (``vans_jax.models.qwen2_5_vl.from_pretrained``
lives in ``convert``): importing the package never imports the layer above (the layering test
checks both)."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]):
    """``(__getattr__, __dir__, names)`` for a package: ``exports`` maps a module (absolute, or
    relative to ``package``) to the names it provides."""
    where = {name: mod for mod, names in exports.items() for name in names}

    def __getattr__(name):
        if name in where:
            mod = importlib.import_module(where[name], package) if where[name].startswith(".") else \
                importlib.import_module(where[name])
            return getattr(mod, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(where)

    return __getattr__, __dir__, sorted(where)
