"""The public API: build_index, open_index, Index, and the result records."""

from .index import METHODS, Index, build_index, open_index
from .records import Explanation, Influencer, Suspect

__all__ = ["METHODS", "Explanation", "Index", "Influencer", "Suspect", "build_index", "open_index"]
