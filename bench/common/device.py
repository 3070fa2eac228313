"""Device memory of a benchmark case: the peak its tensors reached, and a clean start for the next."""

from __future__ import annotations

import gc

import torch

from engine.cache.store import release_pinned


def peak_bytes(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        release_pinned()  # the last case's host stores: a pinned block freed stays cached otherwise
        torch.cuda.reset_peak_memory_stats(device)
