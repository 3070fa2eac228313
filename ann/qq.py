"""Query->query selector: decode queries look like prefill queries, not like keys.

Build keeps each build query's exact top-M keys. A search finds the decode
query's nearest build queries (cosine, an in-distribution ANN problem: faiss
HNSW over the build queries) and reranks the union of their key lists
exactly. Keys added after build enter the lists of the build queries that
score them highest (replacing each list's weakest entry), so they can be found.
"""

from __future__ import annotations

import faiss
import numpy as np

from ann.base import SMALL_BATCH, GrowableKeys, as_vectors, faiss_nbytes, hnsw_bytes, single_thread
from ann.graph import _unit, exact_topk
from ann.selector import Selector


class QQIndex(Selector):
    """m_keys: keys kept per build query; n_neighbors: build queries whose lists
    a search merges; max_queries: build queries kept (evenly strided);
    hnsw_M / ef: the query index; n_add: lists each added key may enter."""

    def __init__(
        self,
        dim: int,
        m_keys: int = 64,
        n_neighbors: int = 32,
        max_queries: int = 32768,
        hnsw_M: int = 16,
        ef: int = 64,
        n_add: int = 16,
        store: GrowableKeys | None = None,
    ):
        for name, v in {"m_keys": m_keys, "n_neighbors": n_neighbors, "max_queries": max_queries, "ef": ef}.items():
            if v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        self.dim, self.m_keys, self.n_neighbors, self.max_queries = dim, m_keys, n_neighbors, max_queries
        self.hnsw_M, self.ef, self.n_add = hnsw_M, ef, n_add
        self.store = store if store is not None else GrowableKeys(dim)
        self._owns_store = store is None
        self.qindex = None
        self.lists = np.empty((0, m_keys), np.int32)  # [Nq, M] key ids per build query (int32: memory)
        self.list_scores = np.empty((0, m_keys), np.float32)  # [Nq, M] their scores
        self.queries = np.empty((0, dim), np.float32)  # [Nq, dim]

    def __len__(self) -> int:
        return len(self.store)

    @property
    def nbytes(self) -> int:
        arrays = self.lists.nbytes + self.list_scores.nbytes + self.queries.nbytes
        return arrays + faiss_nbytes(self.qindex) + (self.store.nbytes if self._owns_store else 0)

    @staticmethod
    def estimate_bytes(
        n_keys: int,
        dim: int,
        n_queries: int = 0,
        m_keys: int = 64,
        max_queries: int = 32768,
        hnsw_M: int = 16,
        store: GrowableKeys | None = None,
        **params,
    ) -> int:
        """Each build query's key list with scores and its vector in an HNSW, and the
        keys unless the store is shared."""
        nq = min(n_queries, max_queries)
        own_keys = 0 if store is not None else 4 * n_keys * dim
        return nq * 8 * m_keys + hnsw_bytes(nq, dim, hnsw_M) + nq * 4 * dim + own_keys

    def build(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        """keys [N, dim]; queries [Nq, dim] (required: this selector is made of them)."""
        keys = as_vectors(keys, self.dim, "keys")
        if queries is None:
            raise ValueError("the qq selector needs build queries (prefill queries of the group's heads)")
        queries = as_vectors(queries, self.dim, "queries")
        if len(queries) > self.max_queries:
            queries = queries[np.linspace(0, len(queries) - 1, self.max_queries).astype(np.int64)]
        if self._owns_store:
            self.store.reset(keys)
        m = min(self.m_keys, len(keys))
        self.queries = queries
        self.lists = np.full((len(queries), self.m_keys), -1, np.int32)
        self.list_scores = np.full((len(queries), self.m_keys), -np.inf, np.float32)
        self.lists[:, :m] = exact_topk(queries, keys, m)
        self.list_scores[:, :m] = _row_scores(queries, keys, self.lists[:, :m])
        self.qindex = faiss.IndexHNSWFlat(self.dim, self.hnsw_M, faiss.METRIC_INNER_PRODUCT)
        with single_thread():
            self.qindex.add(_unit(queries))

    def add(self, keys: np.ndarray) -> None:
        """keys [n, dim]: stored, and each enters the lists of the build queries
        (among its n_add nearest by direction) whose weakest entry it beats."""
        keys = as_vectors(keys, self.dim, "keys")
        if self.qindex is None:
            raise RuntimeError("add before build: the qq selector needs build queries first")
        if self._owns_store:
            self.store.append(keys)
        start = len(self.store) - len(keys)  # a shared store already holds them
        if self.n_add <= 0:
            return
        self.qindex.hnsw.efSearch = max(self.ef, self.n_add)
        with single_thread(len(keys) <= SMALL_BATCH):
            _, near = self.qindex.search(_unit(keys), min(self.n_add, len(self.queries)))  # [n, n_add]
        for i in range(len(keys)):  # one row per new key; n is usually 1
            rows = near[i][near[i] >= 0]
            s = self.queries[rows] @ keys[i]  # [r]
            worst = np.argmin(self.list_scores[rows], axis=1)
            better = s > self.list_scores[rows, worst]
            self.lists[rows[better], worst[better]] = start + i
            self.list_scores[rows[better], worst[better]] = s[better]

    def candidates(self, q: np.ndarray, k: int = 0) -> tuple[np.ndarray, int, int]:
        """q [G, dim] (one group) -> candidate ids [C] (duplicates possible), build queries scored, 0 keys.

        Candidates come in order of preference: the lists of the heads' nearest
        build queries first (rank by rank across the group), each list best key first."""
        if self.qindex is None:
            raise RuntimeError("search before build: the qq selector holds no build queries")
        self.qindex.hnsw.efSearch = max(self.ef, self.n_neighbors)
        stats = faiss.cvar.hnsw_stats
        stats.reset()
        with single_thread(len(q) <= SMALL_BATCH):
            _, near = self.qindex.search(_unit(q), min(self.n_neighbors, len(self.queries)))  # [G, nn]
        # nearest build queries of all heads first, each list best key first
        near = near.T.reshape(-1)
        near = near[near >= 0]
        return self.lists[near].reshape(-1).astype(np.int64), int(stats.ndis), 0


def _row_scores(queries: np.ndarray, keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """scores[i, j] = queries[i] · keys[ids[i, j]], in row chunks to bound the gathered copy."""
    out = np.empty(ids.shape, np.float32)
    for s in range(0, len(ids), 2048):
        out[s : s + 2048] = np.einsum("nd,nmd->nm", queries[s : s + 2048], keys[ids[s : s + 2048]])
    return out
