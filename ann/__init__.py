"""Key indexes and selectors for retrieval attention, behind one protocol.

`make_index(method, dim, **params)` builds any of them (see `METHODS`);
`ann.base.KeyIndex` is the protocol, `search_group` the GQA search, and
`ann.block.BlockIndex` the device landmark index, batched over KV heads.
Index classes are imported on first use: flat needs numpy only, the others
faiss and numba (the `ann` extra), block torch.
"""

from ann.base import GrowableKeys, KeyIndex, SearchResult
from ann.registry import METHODS, estimate_index_bytes, make_index
from ann.selector import search_group

_LAZY = {
    "BlockIndex": "ann.block",
    "BlockKeyIndex": "ann.block",
    "FlatIndex": "ann.flat",
    "GraphIndex": "ann.graph",
    "HNSWIndex": "ann.hnsw",
    "IVFIndex": "ann.ivf",
    "QQIndex": "ann.qq",
    "UnionIndex": "ann.union",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ann' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "GrowableKeys",
    "KeyIndex",
    "SearchResult",
    "estimate_index_bytes",
    "make_index",
    "search_group",
]  # and the _LAZY classes
