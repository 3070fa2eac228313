"""Distinct host ids per row (per KV head), in linear time where numba is installed:
the candidates of a step come from several sources that overlap."""

from __future__ import annotations

import functools

import numpy as np
import torch


def unique_rows(ids: torch.Tensor) -> torch.Tensor:
    """ids [H, M] -> [H, M'] the distinct non-negative ids of each row in ascending order,
    -1 after them, M' the longest row's count (sorted ids make the kernel's gather walk
    memory in order; dropping the padding keeps later per-candidate work proportional to
    the candidates, not to the proposals they were chosen from)."""
    return distinct_rows(ids, ids.shape[1])


def distinct_rows(ids: torch.Tensor, limit: int) -> torch.Tensor:
    """ids [H, C] (CPU, -1 = none) -> [H, M'] each row's first `limit` distinct ids in
    ascending order, -1 after them, M' the most any row keeps. numba's linear pass
    (ann._kernels.distinct_rows) where it is installed, else sorts in torch."""
    if ids.shape[1] == 0 or limit == 0:
        return ids.new_full((ids.shape[0], 0), -1, dtype=torch.int64)
    kernel = _distinct_kernel()
    if kernel is None:
        return _distinct_rows_torch(ids, limit)
    ids = ids.to(torch.int64).contiguous()
    out, width = kernel(ids.numpy(), limit, max(int(ids.max()) + 1, 1))  # marks for the ids present only
    return torch.from_numpy(np.ascontiguousarray(out[:, :width]))


@functools.cache
def _distinct_kernel():
    """numba's `distinct_rows`, or None without numba (the `ann` extra; the block index alone
    needs only torch). Looked up once: a failed import would be retried at every step."""
    try:
        from ann._kernels import distinct_rows
    except ImportError:
        return None
    return distinct_rows


def _distinct_rows_torch(ids: torch.Tensor, limit: int) -> torch.Tensor:
    """`distinct_rows` with torch's sort: one stable sort finds each id's first appearance."""
    sorted_ids, order = ids.sort(dim=1, stable=True)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    first &= sorted_ids >= 0
    keep = torch.zeros_like(first).scatter_(1, order, first)  # back in the original order
    keep &= keep.cumsum(dim=1) <= limit
    return compact_rows(sorted_ids, keep.gather(1, order))


def compact_rows(ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """ids [H, M] and keep [H, M] -> [H, M'] each row's kept ids in their order, -1 after
    them, M' the most any row keeps (a scatter, not a sort)."""
    kept = keep.sum(dim=1)
    width = int(kept.max()) if ids.numel() else 0
    out = torch.full((ids.shape[0], width + 1), -1, dtype=ids.dtype)  # column `width`: the dropped
    slot = torch.where(keep, keep.cumsum(dim=1) - 1, width)
    return out.scatter_(1, slot, torch.where(keep, ids, -1))[:, :width]


def _pad(rows: list[np.ndarray]) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows)), -1, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
