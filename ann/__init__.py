"""Key indexes and selectors for retrieval attention, behind one protocol.

`make_index(method, dim, **params)` builds any of them; see `ann.base.KeyIndex`
for the protocol and `ann.selector.search_group` for GQA groups.
"""

from ann.base import GrowableKeys, KeyIndex, SearchResult
from ann.block import BlockIndex, BlockKeyIndex
from ann.flat import FlatIndex
from ann.graph import GraphIndex
from ann.hnsw import HNSWIndex
from ann.ivf import IVFIndex
from ann.qq import QQIndex
from ann.registry import METHODS, make_index
from ann.selector import search_group
from ann.union import UnionIndex

__all__ = [
    "METHODS", "BlockIndex", "BlockKeyIndex", "FlatIndex", "GraphIndex", "GrowableKeys", "HNSWIndex", "IVFIndex",
    "KeyIndex", "QQIndex", "SearchResult", "UnionIndex", "make_index", "search_group",
]
