"""hybridattn engine: long-context decoding with a host-memory KV cache and retrieval attention.

Importing the package registers the "hybrid" attention implementation with transformers.
"""

from engine import attention as _attention  # noqa: F401  (registers "hybrid")
from engine.cache import HybridCache
from engine.config import PRESETS, OffloadConfig
from engine.plan import plan_memory

__all__ = ["HybridCache", "OffloadConfig", "PRESETS", "plan_memory"]
