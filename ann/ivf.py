"""faiss IVF over keys (inner product): k-means lists, probe the nprobe best centroids."""

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
    single_thread,
)


def _clean(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = ids.astype(np.int64, copy=False)
    scores = scores.astype(np.float32, copy=True)
    scores[ids < 0] = -np.inf
    return ids, scores


class IVFIndex(FaissBacked):
    """Inverted lists over keys. nlist is capped at N; scanned counts the nlist
    centroids and the list entries scored (faiss's own counter) per query."""

    def __init__(self, dim: int, nlist: int = 256, nprobe: int = 8, seed: int = 0):
        check_counts(positive={"nlist": nlist, "nprobe": nprobe}, seeds={"seed": seed})
        self.dim, self.nlist, self.nprobe, self.seed = dim, nlist, nprobe, seed
        self.index = None

    @staticmethod
    def estimate_bytes(n_keys: int, dim: int, n_queries: int = 0, nlist: int = 256, **params) -> int:
        """Each key's vector and id in its list, and the centroids."""
        return n_keys * (4 * dim + 8) + min(nlist, n_keys) * 4 * dim

    def build(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        """keys [N, dim]; queries are ignored (lists are trained on keys)."""
        keys = as_vectors(keys, self.dim, "keys")
        nlist = min(self.nlist, len(keys))
        quant = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quant, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.seed
        index.cp.min_points_per_centroid = 1  # small contexts: no warning spam, lists may be tiny
        index.train(keys)
        index.add(keys)
        self.index = index

    def add(self, keys: np.ndarray) -> None:
        """keys [n, dim]: each goes to its best list, O(nlist) per key."""
        if self.index is None:
            raise RuntimeError("add before build: build the IVF index first (it needs keys to train)")
        keys = as_vectors(keys, self.dim, "keys")
        with single_thread(len(keys) <= SMALL_BATCH):
            self.index.add(keys)

    def search(self, q: np.ndarray, k: int) -> SearchResult:
        """q [n_q, dim] -> top-k per query among the keys of the nprobe best lists."""
        k = check_k(k, len(self))
        q = as_vectors(q, self.dim, "queries")
        self.index.nprobe = min(self.nprobe, self.index.nlist)
        stats = faiss.cvar.indexIVF_stats
        with FAISS_COUNTERS:
            stats.reset()
            with single_thread(len(q) <= SMALL_BATCH):
                scores, ids = self.index.search(q, k)
            keys_scored = int(stats.ndis)
        ids, scores = _clean(ids, scores)
        return SearchResult(ids, scores, scanned=keys_scored + len(q) * self.index.nlist, keys_scored=keys_scored)
