"""Selectors: indexes that propose candidate keys, then rerank them exactly.

A selector defines `candidates(q [G, dim], k) -> (ids [C] int64, other vectors
scored, keys scored)` for one group of query heads (the counts cover the work
of finding the candidates, not their exact rerank) and holds `store` (the keys, shared, never copied
per selector). This base class turns that into the `KeyIndex` search calls.
"""

from __future__ import annotations

import numpy as np

from ann.base import SearchResult, as_vectors, check_k, rerank


def _pad_rows(rows: list[np.ndarray]) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows)), -1, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


class Selector:
    dim: int

    def candidates(self, q: np.ndarray, k: int) -> tuple[np.ndarray, int, int]:
        raise NotImplementedError

    def search(self, q: np.ndarray, k: int) -> SearchResult:
        """q [n_q, dim], each query alone -> exact top-k of its own candidates: ids [n_q, k]."""
        k = check_k(k, len(self))
        q = as_vectors(q, self.dim, "queries")
        rows, aux, found = [], 0, 0
        for i in range(len(q)):  # per query, not per key: the work inside is vectorised
            c, a, f = self.candidates(q[i : i + 1], k)
            rows.append(c)
            aux += a
            found += f
        ids, scores, scored = rerank(self.store.data, q, _pad_rows(rows), k)
        keys = int(scored) + found
        return SearchResult(ids, scores, scanned=keys + aux, keys_scored=keys)

    def search_group(self, q: np.ndarray, k: int) -> SearchResult:
        """GQA: q [G, dim], the G query heads of one KV head -> ids [G, k].

        One candidate set serves the whole group (chosen from all G queries at
        once), and each head gets the exact top-k of that set for its own
        query. A single jointly scored top-k would let the head with the
        largest logits crowd out keys another head attends to; per-head top-k
        over a shared set keeps every head exact on it, and the union of the
        rows of `ids` is the set the attention kernel gathers.
        scanned = G · C (each head scores the C distinct candidates) + vectors
        the selectors scored; keys_scored = G · C + keys the selectors scored
        while finding candidates (a graph's beam search, for instance)."""
        from ann._kernels import rerank_shared

        k = check_k(k, len(self))
        q = as_vectors(q, self.dim, "queries")
        cand, aux, found = self.candidates(q, k)
        ids, scores, scored = rerank_shared(self.store.data, q, np.ascontiguousarray(cand, dtype=np.int64), k)
        keys = int(scored) + found
        return SearchResult(ids, scores, scanned=keys + aux, keys_scored=keys)


def search_group(index, q: np.ndarray, k: int) -> SearchResult:
    """GQA search on any index: q [G, dim] -> ids [G, k] (see `Selector.search_group`).

    A plain KeyIndex is searched per query head; its per-head top-k lists
    already are exact for each head, and their union is the group's set."""
    if hasattr(index, "search_group"):
        return index.search_group(q, k)
    return index.search(q, k)
