"""Host-memory KV store of one layer, and the prefill-query sample its index is built from."""

from __future__ import annotations

import ctypes
import sys

import torch

_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def host_empty(shape, dtype: torch.dtype, *, pin: bool = False) -> torch.Tensor:
    """An uninitialised host tensor for KV rows that are read in scattered order.

    Pinned when `pin` (CUDA copies can then be asynchronous). Otherwise, on
    Linux, large buffers ask for transparent huge pages before their first
    touch: the gather kernel reads rows all over the store, and with 4 KiB
    pages nearly every row is a TLB miss.
    """
    t = torch.empty(shape, dtype=dtype, pin_memory=pin)
    if not pin and _libc is not None and t.nbytes >= 4 * _HUGE_PAGE:
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # madvise wants aligned ranges
        end = (t.data_ptr() + t.nbytes) // _HUGE_PAGE * _HUGE_PAGE
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)  # advice only
    return t


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src) for K/V rows [H, n, D], asynchronous between pinned host memory and
    a device. A host store's slice has its heads strided by the store's capacity; torch
    would copy such a tensor through a pageable staging buffer, synchronously and at a
    fraction of the bus's speed, so it goes head by head, each head's rows contiguous."""
    if dst.device == src.device or (dst.is_contiguous() and src.is_contiguous()):
        return dst.copy_(src, non_blocking=True)
    for h in range(src.shape[0]):
        dst[h].copy_(src[h], non_blocking=True)
    return dst


def rows_on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """K/V rows [H, n, D] on `device` (t itself if there already); see copy_rows."""
    if t.device == device:
        return t
    return copy_rows(torch.empty(t.shape, dtype=t.dtype, device=device), t)


class HostKV:
    """K and V [Hkv, capacity, D] in host memory, appended in position order.

    Pinned when the device is CUDA, so device-to-host copies of evicted tokens
    and host-to-device copies of prefill key blocks can be asynchronous. The
    capacity grows by half again when full; `reserve()` sizes it exactly when
    the final length is known.
    """

    def __init__(self, n_heads: int, dim: int, dtype: torch.dtype, *, pin: bool, capacity: int = 0):
        self.n_heads, self.dim, self.dtype, self.pin = n_heads, dim, dtype, pin
        self.n = 0
        self.k = self._alloc(capacity)  # [Hkv, capacity, D]
        self.v = self._alloc(capacity)

    def _alloc(self, capacity: int) -> torch.Tensor:
        return host_empty((self.n_heads, capacity, self.dim), self.dtype, pin=self.pin)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reserve(self, capacity: int) -> None:
        if capacity > self.capacity:
            k, v = self._alloc(capacity), self._alloc(capacity)
            k[:, : self.n], v[:, : self.n] = self.keys, self.values
            self.k, self.v = k, v

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [Hkv, n, D] on any device."""
        n = k.shape[1]
        if self.n + n > self.capacity:
            self.reserve(max(self.n + n, self.capacity * 3 // 2, 256))
        copy_rows(self.k[:, self.n : self.n + n], k)
        copy_rows(self.v[:, self.n : self.n + n], v)
        self.n += n

    @property
    def keys(self) -> torch.Tensor:
        """[Hkv, n, D] view; rows contiguous, heads strided by the capacity."""
        return self.k[:, : self.n]

    @property
    def values(self) -> torch.Tensor:
        return self.v[:, : self.n]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class QuerySample:
    """Prefill queries at evenly spaced positions, at most `limit` of them.

    Keeps every `stride`-th position; when full, doubles the stride and drops
    the positions that no longer fall on it, so the sample stays spread over
    the whole prefill however long it turns out to be.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.stride = 1
        self.pos: list[torch.Tensor] = []
        self.q: list[torch.Tensor] = []

    def add(self, q: torch.Tensor, positions: torch.Tensor) -> None:
        """q [Hq, Q, D] of positions [Q] (host copies are kept)."""
        if self.limit == 0:
            return
        keep = positions % self.stride == 0
        self.pos.append(positions[keep].cpu())
        self.q.append(q[:, keep.to(q.device)].cpu())
        while sum(len(p) for p in self.pos) > self.limit:
            self.stride *= 2
            kept = [p % self.stride == 0 for p in self.pos]
            self.q = [q[:, m] for q, m in zip(self.q, kept)]
            self.pos = [p[m] for p, m in zip(self.pos, kept)]

    def __len__(self) -> int:
        return sum(len(p) for p in self.pos)

    def queries(self) -> torch.Tensor:
        """[Hq, n, D]"""
        return torch.cat(self.q, dim=1) if self.q else torch.empty(0)

    def clear(self) -> None:
        self.pos, self.q = [], []
