"""The cache and its stores: `HybridCache` (a transformers `Cache`), its per-sequence
`HybridLayer` (resident ring on the device, host KV store, block and key indexes), the
`BatchLayer` of a batch decoded together, and the host store itself."""

from engine.cache.batch import BatchLayer
from engine.cache.cache import HybridCache
from engine.cache.layer import HybridLayer

__all__ = ["BatchLayer", "HybridCache", "HybridLayer"]
