"""The public API: build_index, open_index, Index, and the result records.

The names are imported on first use (PEP 562), so that importing a light submodule (`api.cli`, `api.methods`)
does not import torch, JAX or FAISS.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .index import METHODS, Index, build_index, open_index
    from .records import Explanation, Influencer, Suspect

#: public name -> the submodule that defines it
_EXPORTS = {
    "METHODS": ".index",
    "Index": ".index",
    "build_index": ".index",
    "open_index": ".index",
    "Explanation": ".records",
    "Influencer": ".records",
    "Suspect": ".records",
}

__all__ = ["METHODS", "Explanation", "Index", "Influencer", "Suspect", "build_index", "open_index"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'api' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
