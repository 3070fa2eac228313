"""Exact inner-product search: the oracle, and the right choice for short contexts."""

from __future__ import annotations

import numpy as np

from ann.base import GrowableKeys, SearchResult, as_vectors, check_counts, check_k, topk_rows


class FlatIndex:
    """Scores every key. keys [N, dim] float32, appended in id order."""

    def __init__(self, dim: int, chunk: int = 65536):
        check_counts(positive={"chunk": chunk})
        self.dim = dim
        self.chunk = chunk  # keys scored per matmul, bounds the [n_q, chunk] score buffer
        self.store = GrowableKeys(dim)

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    @staticmethod
    def estimate_bytes(n_keys: int, dim: int, n_queries: int = 0, **params) -> int:
        return 4 * n_keys * dim

    def __len__(self) -> int:
        return len(self.store)

    def build(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        """keys [N, dim]; queries are ignored (exact search needs no training)."""
        self.store.reset(as_vectors(keys, self.dim, "keys"))

    def add(self, keys: np.ndarray) -> None:
        """keys [n, dim]; they get ids len(self) .. len(self)+n-1."""
        self.store.append(as_vectors(keys, self.dim, "keys"))

    def search(self, q: np.ndarray, k: int) -> SearchResult:
        """q [n_q, dim] -> exact top-k per query; scanned = n_q · N."""
        k = check_k(k, len(self))
        q = as_vectors(q, self.dim, "queries")
        keys = self.store.data
        if len(keys) <= self.chunk:
            ids, scores = topk_rows(q @ keys.T, k)
        else:  # merge per-chunk top-k so the score buffer stays bounded
            parts_i, parts_s = [], []
            for s in range(0, len(keys), self.chunk):
                blk = keys[s : s + self.chunk]
                i, sc = topk_rows(q @ blk.T, min(k, len(blk)))
                parts_i.append(i + s)
                parts_s.append(sc)
            all_i, all_s = np.concatenate(parts_i, 1), np.concatenate(parts_s, 1)
            pos, scores = topk_rows(all_s, k)
            ids = np.take_along_axis(all_i, pos, 1)
        return SearchResult(ids, scores, scanned=len(q) * len(keys))
