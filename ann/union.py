"""Union of selectors: candidates merged, deduplicated and reranked exactly.

No single selector wins on every head (block landmarks miss scattered keys,
query->query lists miss keys that no prefill query attended); their union
does. All selectors share one key store, which the union owns and the exact
rerank reads: keys are never copied per selector.
"""

from __future__ import annotations

import numpy as np

from ann.base import GrowableKeys, as_vectors
from ann.selector import Selector


def group_candidates(index, q: np.ndarray, k: int) -> tuple[np.ndarray, int, int]:
    """Candidates [C] of any index for one group q [G, dim], other vectors scored, keys scored.

    Selectors choose jointly; a plain KeyIndex is searched per query head and
    its top-k lists are unioned."""
    if hasattr(index, "candidates"):
        return index.candidates(q, k)
    res = index.search(q, min(k, len(index)))
    return res.ids.reshape(-1), res.scanned - res.keys_scored, res.keys_scored


class UnionIndex(Selector):
    """selectors: indexes built with `store=` this union's store (see `make_index`), or any KeyIndex."""

    def __init__(self, dim: int, selectors: list, store: GrowableKeys | None = None):
        if not selectors:
            raise ValueError("a union needs at least one selector")
        self.dim = dim
        self.selectors = list(selectors)
        self.store = store if store is not None else GrowableKeys(dim)

    def __len__(self) -> int:
        return len(self.store)

    @property
    def nbytes(self) -> int:
        return self.store.nbytes + sum(s.nbytes for s in self.selectors)

    def build(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        """keys [N, dim]; queries [Nq, dim] go to every selector."""
        keys = as_vectors(keys, self.dim, "keys")
        self.store.reset(keys)
        try:
            for s in self.selectors:
                s.build(keys, queries)
        except BaseException:
            # The selectors built so far index the new keys, the rest the old: the union holds no keys
            # until a build succeeds (searches and adds refuse), rather than ids past its store's end.
            self.store.reset(keys[:0])
            raise

    def add(self, keys: np.ndarray) -> None:
        keys = as_vectors(keys, self.dim, "keys")
        if len(self.store) == 0:
            raise RuntimeError("add before build: build the union first")
        self.store.append(keys)
        for s in self.selectors:
            s.add(keys)

    def candidates(self, q: np.ndarray, k: int = 100) -> tuple[np.ndarray, int, int]:
        """q [G, dim] -> merged candidates [C] (duplicates possible), other vectors and keys the selectors scored."""
        if len(self.store) == 0:
            raise RuntimeError("search before build: the union holds no keys")
        parts, aux, found = [], 0, 0
        for s in self.selectors:
            c, a, f = group_candidates(s, q, k)
            parts.append(c)
            aux += a
            found += f
        return np.concatenate(parts), aux, found
