"""HNSW over keys (inner product), faiss's implementation.

faiss rather than hnswlib because faiss exposes how many distances a search
computed (`hnsw_stats.ndis`), so the share of keys scanned is measured.
Insertion runs on one thread: a multi-threaded faiss HNSW build depends on
thread timing, and indexes must be reproducible. The nodes' levels are drawn
from a generator seeded, at each add, by `seed` and the number of keys before
it: faiss's own generator is not part of a copy (its serialised form), so a
copy of the index would otherwise add keys at other levels than the original."""

from __future__ import annotations

import faiss
import numpy as np

from ann.base import (
    FAISS_COUNTERS,
    SMALL_BATCH,
    FaissBacked,
    SearchResult,
    as_vectors,
    check_counts,
    check_k,
    hnsw_bytes,
    single_thread,
)
from ann.ivf import _clean


class HNSWIndex(FaissBacked):
    """M links per node (2M at the base layer), efConstruction at build, ef at search."""

    def __init__(self, dim: int, M: int = 32, ef_construction: int = 128, ef: int = 128, seed: int = 0):
        check_counts(positive={"M": M, "ef_construction": ef_construction, "ef": ef}, non_negative={"seed": seed})
        if M <= 1:
            raise ValueError(f"need M > 1, got {M}")
        self.dim, self.M, self.ef_construction, self.ef, self.seed = dim, M, ef_construction, ef, seed
        self.index = None

    @staticmethod
    def estimate_bytes(n_keys: int, dim: int, n_queries: int = 0, M: int = 32, **params) -> int:
        return hnsw_bytes(n_keys, dim, M)

    def _new(self):
        index = faiss.IndexHNSWFlat(self.dim, self.M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        return index

    def build(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        """keys [N, dim]; queries are ignored."""
        keys = as_vectors(keys, self.dim, "keys")
        self.index = self._new()
        self._insert(keys)

    def add(self, keys: np.ndarray) -> None:
        """keys [n, dim], inserted incrementally (O(ef_construction · log N) each)."""
        if self.index is None:
            self.index = self._new()
        self._insert(as_vectors(keys, self.dim, "keys"))

    def _insert(self, keys: np.ndarray) -> None:
        self.index.hnsw.rng = faiss.RandomGenerator((self.seed * 1_000_003 + self.index.ntotal) % 2**31)
        with single_thread():
            self.index.add(keys)

    def search(self, q: np.ndarray, k: int) -> SearchResult:
        """q [n_q, dim] -> top-k per query; scanned = distances computed (faiss's
        counter), upper layers included: a key on several layers may count more
        than once, so with ef near N the count can pass N."""
        k = check_k(k, len(self))
        q = as_vectors(q, self.dim, "queries")
        self.index.hnsw.efSearch = max(self.ef, k)
        stats = faiss.cvar.hnsw_stats
        with FAISS_COUNTERS:
            stats.reset()
            with single_thread(len(q) <= SMALL_BATCH):
                scores, ids = self.index.search(q, k)
            scanned = int(stats.ndis)
        ids, scores = _clean(ids, scores)
        return SearchResult(ids, scores, scanned=scanned)
