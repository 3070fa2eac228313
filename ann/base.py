"""The key-index protocol, its result type and the input checks every index shares.

A key index holds the keys of one (layer, KV head) and answers "which keys have
the largest inner product with this query" (attention logits), reporting how
many vectors it had to score so that cost is measured, not guessed.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class SearchResult:
    """ids [n_q, k] int64 (-1 padded), scores [n_q, k] float32 (-inf where padded),
    scanned: vectors whose inner product with a query was computed, summed over
    the n_q queries (keys, plus centroids, landmarks or build queries where an
    index scores those), keys_scored: the key vectors among them."""

    ids: np.ndarray
    scores: np.ndarray
    scanned: int
    keys_scored: int = -1

    def __post_init__(self):
        if self.keys_scored < 0:
            self.keys_scored = self.scanned


@runtime_checkable
class KeyIndex(Protocol):
    def build(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None: ...
    def add(self, keys: np.ndarray) -> None: ...
    def search(self, q: np.ndarray, k: int) -> SearchResult: ...
    def __len__(self) -> int: ...


def as_vectors(x, dim: int, what: str, *, allow_empty: bool = False) -> np.ndarray:
    """Validate `x` [n, dim] (or [dim]) and return it as C-contiguous float32 [n, dim]."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"{what} must be float32 or float16, got dtype {x.dtype}")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must have shape [n, {dim}], got {list(x.shape)}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{what} is empty")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return x


def check_k(k, n: int) -> int:
    """k must be an integer in [1, n] (n = keys in the index)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if n == 0:
        raise RuntimeError("search before build: the index holds no keys")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if k > n:
        raise ValueError(f"k = {k} exceeds the {n} keys in the index")
    return int(k)


def check_counts(*, positive: dict | None = None, non_negative: dict | None = None, seeds: dict | None = None) -> None:
    """Each named parameter must be an int (not a bool): those in `positive` > 0, those in `non_negative` >= 0,
    those in `seeds` in [0, 2**31) (faiss's clustering takes a C int)."""
    groups = ((positive or {}, 1, "positive"), ({**(non_negative or {}), **(seeds or {})}, 0, "non-negative"))
    for values, low, word in groups:
        for name, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
            if v < low:
                raise ValueError(f"{name} must be {word}, got {v}")
    for name, v in (seeds or {}).items():
        if v >= 2**31:
            raise ValueError(f"{name} must be below 2**31, got {v}")


class GrowableKeys:
    """Key store with amortised O(1) append: a capacity-doubling buffer [cap, dim] float32.

    Selectors that rerank exactly share one store instead of copying keys."""

    def __init__(self, dim: int, capacity: int = 1024):
        self.dim = dim
        self._buf = np.empty((max(capacity, 1), dim), dtype=np.float32)
        self.n = 0

    def __len__(self) -> int:
        return self.n

    @property
    def data(self) -> np.ndarray:
        """[n, dim] view of the stored keys (invalidated by a later append that grows the buffer)."""
        return self._buf[: self.n]

    def reset(self, keys: np.ndarray) -> None:
        self._buf = np.array(keys, dtype=np.float32, copy=True, order="C")
        if len(self._buf) == 0:
            self._buf = np.empty((1, self.dim), dtype=np.float32)
        self.n = len(keys)

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes

    def append(self, keys: np.ndarray) -> None:
        need = self.n + len(keys)
        if need > len(self._buf):
            grown = np.empty((max(need, 2 * len(self._buf)), self.dim), dtype=np.float32)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n : need] = keys
        self.n = need


class FaissBacked:
    """Length and bytes of an index kept in `self.index`, a faiss index (None before build)."""

    index = None

    def __len__(self) -> int:
        return 0 if self.index is None else self.index.ntotal

    @property
    def nbytes(self) -> int:
        """Read as the serialised size (its vectors and links dominate both)."""
        if self.index is None:
            return 0
        import faiss

        return int(faiss.serialize_index(self.index).nbytes)


def hnsw_bytes(n: int, dim: int, M: int) -> int:
    """Estimated bytes of a faiss HNSW over n vectors: the vectors, 2M base-layer links
    plus about M/(M-1) more on upper layers, and per-node offsets and levels."""
    return int(n * (4 * dim + 4 * (2 * M + M / max(M - 1, 1)) + 12))


def topk_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k per row of scores [n_q, n] -> (ids [n_q, k] int64, scores [n_q, k] float32), best first."""
    n = scores.shape[1]
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), scores.shape).copy()
    s = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1).astype(np.int64), np.take_along_axis(s, order, axis=1).astype(
        np.float32
    )


def rerank(keys: np.ndarray, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact top-k of candidate ids per query.

    keys [N, D]; q [n_q, D]; cand [n_q, C] int64 (-1 padded, duplicates allowed).
    Returns ids [n_q, k] (-1 padded), scores [n_q, k], keys scored (distinct valid ids)."""
    from ann._kernels import rerank_candidates  # numba: only the indexes that rerank need it

    return rerank_candidates(keys, q, np.ascontiguousarray(cand, dtype=np.int64), k)


@contextmanager
def single_thread(on: bool = True):
    """Run faiss on one thread while inside (a no-op when `on` is false).

    Used for builds whose result depends on thread timing, and for searches of
    a few queries: there threads cost more than they give, and faiss's OpenMP
    pool spins next to torch's, slowing small searches of both (docs/method.md)."""
    import faiss

    if not on:
        yield
        return
    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(n)


SMALL_BATCH = 32  # queries per search below which faiss runs single-threaded

# faiss's search counters (hnsw_stats, indexIVF_stats) are the process's: a search resets, runs and reads
# them holding this lock, so that searches of two indexes on two threads do not count each other's
FAISS_COUNTERS = threading.Lock()
