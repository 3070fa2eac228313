"""Attention-aware key graph: built from prefill queries, searched by beam search.

Decode queries lie far from the keys they attend to, so a graph built on
key–key proximity (HNSW) routes badly for them. Here the build queries say
which keys belong together. Each build query's exact top-M keys are linked
to the keys ranked next to them (the query->key bipartite graph projected onto
the keys, as in RoarGraph), and every key keeps the links that most build
queries agree on. Two kinds of links fill the remaining slots: each key's
neighbours in position (attention is local in the sequence) and a few
cosine key–key neighbours, which give in-links to keys that queries rarely
retrieved. Search scores k-means centroids of the build queries, starts
from the top keys of the best centroids and the most retrieved "hub" keys,
and runs a best-first beam search.
"""

from __future__ import annotations

import faiss
import numpy as np

from ann._graph_build import insert_keys, projection_edges, select_neighbors
from ann._kernels import beam_search
from ann.base import GrowableKeys, SearchResult, as_vectors, check_counts, check_k


def exact_topk(queries: np.ndarray, keys: np.ndarray, m: int) -> np.ndarray:
    """Exact top-m keys per query by inner product: [Nq, m] int64, best first."""
    _, ids = faiss.knn(queries, keys, m, metric=faiss.METRIC_INNER_PRODUCT)
    return ids.astype(np.int64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def key_neighbors(unit: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Approximate cosine k-NN among keys [N, dim] (unit rows) -> [N, k] int64.

    They only give rarely retrieved keys in-links, so an IVF pass that scores
    ~3% of the pairs serves as well as the exact O(N²) one."""
    n, dim = unit.shape
    if n <= 4096:
        _, ids = faiss.knn(unit, unit, k, metric=faiss.METRIC_INNER_PRODUCT)
        return ids.astype(np.int64)
    nlist = int(4 * np.sqrt(n))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.niter = 8
    index.cp.min_points_per_centroid = 1
    index.train(unit[np.linspace(0, n - 1, min(n, 64 * nlist)).astype(np.int64)])
    index.add(unit)
    index.nprobe = 8
    _, ids = index.search(unit, k)
    return ids.astype(np.int64)


class GraphIndex:
    """Query-guided key graph.

    degree: links per node (the last `spare` slots take links from keys added
    later); m_build: top-M keys per build query; max_queries: build queries
    kept (evenly strided; their exact top-M is most of the build time);
    window: rank neighbours linked per retrieved key; n_pos: position
    neighbours on each side; n_knn: cosine key–key links per key; n_centroids
    (default ~sqrt(N)/3), n_probe, entries_per_centroid, n_hubs: entry-point
    selection; ef: beam width;
    store: a key store shared with other selectors (the graph then only reads it).

    Searches share a visited-stamp array: one index must not be searched from
    two threads at once (separate indexes may).
    """

    def __init__(
        self,
        dim: int,
        degree: int = 48,
        m_build: int = 64,
        max_queries: int = 32768,
        window: int = 8,
        n_knn: int = 8,
        n_pos: int = 1,
        n_centroids: int | None = None,
        n_probe: int = 16,
        entries_per_centroid: int = 4,
        n_hubs: int = 8,
        ef: int = 256,
        ef_add: int = 48,
        n_add_links: int = 12,
        spare: int = 8,
        seed: int = 0,
        store: GrowableKeys | None = None,
    ):
        check_counts(
            positive={
                "degree": degree,
                "spare": spare,
                "m_build": m_build,
                "max_queries": max_queries,
                "n_centroids": 1 if n_centroids is None else n_centroids,
                "n_probe": n_probe,
                "entries_per_centroid": entries_per_centroid,
                "ef": ef,
                "ef_add": ef_add,
            },
            non_negative={
                "window": window,
                "n_knn": n_knn,
                "n_pos": n_pos,
                "n_hubs": n_hubs,
                "n_add_links": n_add_links,
            },
            seeds={"seed": seed},
        )
        if degree <= spare:
            raise ValueError(f"need degree > spare, got degree={degree}, spare={spare}")
        self.dim, self.degree, self.m_build, self.max_queries = dim, degree, m_build, max_queries
        self.n_knn, self.n_centroids, self.n_probe = n_knn, n_centroids, n_probe
        self.window, self.n_pos = window, n_pos
        self.entries_per_centroid, self.n_hubs, self.ef = entries_per_centroid, n_hubs, ef
        self.ef_add, self.n_add_links, self.spare, self.seed = ef_add, n_add_links, spare, seed
        self.store = store if store is not None else GrowableKeys(dim)
        self._owns_store = store is None
        self.adj = np.empty((0, degree), np.int32)
        self.deg = np.empty(0, np.int32)
        self.spare_next = np.empty(0, np.int32)
        self.stamp = np.empty(0, np.int32)
        self._epoch = 1
        self.centroids = np.empty((0, dim), np.float32)  # [C, dim] unit build-query directions
        self.entries = np.empty((0, entries_per_centroid), np.int64)  # [C, E] top keys of each centroid
        self.hubs = np.empty(0, np.int64)  # most retrieved keys at build

    def __len__(self) -> int:
        return len(self.store)

    @property
    def nbytes(self) -> int:
        arrays = (self.adj, self.deg, self.spare_next, self.stamp, self.centroids, self.entries, self.hubs)
        return sum(a.nbytes for a in arrays) + (self.store.nbytes if self._owns_store else 0)

    @staticmethod
    def estimate_bytes(
        n_keys: int,
        dim: int,
        n_queries: int = 0,
        degree: int = 48,
        entries_per_centroid: int = 4,
        store: GrowableKeys | None = None,
        **params,
    ) -> int:
        """Links and per-key counters, entry points, and the keys unless the store is shared."""
        n_c = int(np.clip(np.sqrt(n_keys) / 3, 16, 256))
        own_keys = 0 if store is not None else 4 * n_keys * dim
        return n_keys * (4 * degree + 12) + n_c * (4 * dim + 8 * entries_per_centroid) + own_keys

    # --- build ------------------------------------------------------------------
    def build(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        """keys [N, dim]; queries [Nq, dim] prefill queries of the group's query
        heads (all heads stacked). Without queries the keys stand in for them."""
        keys = as_vectors(keys, self.dim, "keys")
        queries = keys if queries is None or len(queries) == 0 else as_vectors(queries, self.dim, "queries")
        if len(queries) > self.max_queries:
            queries = queries[np.linspace(0, len(queries) - 1, self.max_queries).astype(np.int64)]
        n = len(keys)
        if self._owns_store:
            self.store.reset(keys)
        m = min(self.m_build, n)
        knn = exact_topk(queries, keys, m)  # [Nq, m]

        src, dst = projection_edges(knn, self.window)
        w = np.ones(len(src), np.float32)
        if self.n_knn > 0 and n > 1:
            kk = key_neighbors(_unit(keys), min(self.n_knn + 1, n), self.seed)
            ks = np.repeat(np.arange(n, dtype=np.int32), kk.shape[1])
            kd = kk.reshape(-1).astype(np.int32)
            ks, kd = ks[kd >= 0], kd[kd >= 0]
            # both directions, weighted below any co-retrieval link: they only fill free slots
            src = np.concatenate([src, ks, kd])
            dst = np.concatenate([dst, kd, ks])
            w = np.concatenate([w, np.full(2 * len(ks), 1e-3, np.float32)])
        if self.n_pos > 0:
            # neighbours in position: attention is local in the sequence, and these
            # links give rarely retrieved keys in-edges from their retrieved neighbours
            base = np.arange(n, dtype=np.int32)
            for d in range(1, self.n_pos + 1):
                a, b = base[:-d], base[d:]
                src = np.concatenate([src, a, b])
                dst = np.concatenate([dst, b, a])
                w = np.concatenate([w, np.full(2 * len(a), 1e3, np.float32)])
        cap = max(n, 16)
        self.adj, self.deg = select_neighbors(src, dst, w, n, self.degree - self.spare, cap)
        self.adj = np.pad(self.adj, ((0, 0), (0, self.spare)), constant_values=-1)
        self.spare_next = np.zeros(cap, np.int32)
        self.stamp = np.zeros(cap, np.int32)

        hits = np.bincount(knn[:, : min(8, m)].reshape(-1), minlength=n)
        self.hubs = np.argsort(-hits, kind="stable")[: min(self.n_hubs, n)].astype(np.int64)
        self._build_entries(queries, keys)

    def _build_entries(self, queries: np.ndarray, keys: np.ndarray) -> None:
        # centroids are scored by every search: ~sqrt(N)/3 of them cost ~0.2% of N at 32K
        # keys (more did not pay for themselves, docs/method.md)
        want = self.n_centroids or int(np.clip(np.sqrt(len(keys)) / 3, 16, 256))
        n_c = min(want, len(queries))
        km = faiss.Kmeans(self.dim, n_c, niter=10, seed=self.seed, spherical=True, min_points_per_centroid=1)
        km.train(_unit(queries))
        self.centroids = km.centroids.astype(np.float32)
        self.entries = exact_topk(self.centroids, keys, min(self.entries_per_centroid, len(keys)))
        self._add_seeds = np.unique(np.concatenate([self.hubs, self.entries.reshape(-1)]))  # where inserts start

    # --- add --------------------------------------------------------------------
    def add(self, keys: np.ndarray) -> None:
        """keys [n, dim] get ids len(self)...; linked in place, no rebuild."""
        keys = as_vectors(keys, self.dim, "keys")
        if len(self) == 0:
            raise RuntimeError("add before build: build the graph index first (it needs build queries)")
        if self._owns_store:
            self.store.append(keys)
        stop = len(self)
        start = stop - len(keys)  # a shared store already holds them
        if stop > len(self.deg):
            self._grow(stop)
        epoch = self._next_epochs(stop - start)
        insert_keys(
            self.store.data,
            self.adj,
            self.deg,
            self.spare_next,
            self.stamp,
            epoch,
            start,
            stop,
            self._add_seeds,
            self.ef_add,
            self.n_add_links,
            self.spare,
        )

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * len(self.deg))
        extra = cap - len(self.deg)
        self.adj = np.concatenate([self.adj, np.full((extra, self.degree), -1, np.int32)])
        self.deg = np.concatenate([self.deg, np.zeros(extra, np.int32)])
        self.spare_next = np.concatenate([self.spare_next, np.zeros(extra, np.int32)])
        self.stamp = np.concatenate([self.stamp, np.zeros(extra, np.int32)])

    def _next_epochs(self, count: int) -> int:
        if self._epoch + count >= np.iinfo(np.int32).max:
            self.stamp[:] = 0
            self._epoch = 1
        e = self._epoch
        self._epoch += count
        return e

    # --- search -----------------------------------------------------------------
    def seeds_for(self, q: np.ndarray) -> np.ndarray:
        """Entry keys per query [n_q, S] int64: the hubs and the top keys of the
        n_probe centroids nearest to each query's direction."""
        sims = q @ self.centroids.T  # [n_q, C]
        p = min(self.n_probe, len(self.centroids))
        best = np.argpartition(-sims, p - 1, axis=1)[:, :p]
        ent = self.entries[best].reshape(len(q), -1)  # [n_q, p*E]
        return np.concatenate([np.broadcast_to(self.hubs, (len(q), len(self.hubs))), ent], axis=1)

    def search(self, q: np.ndarray, k: int) -> SearchResult:
        """q [n_q, dim] -> approximate top-k per query (beam width max(ef, k));
        scanned counts keys scored plus the centroids scored."""
        k = check_k(k, len(self))
        q = as_vectors(q, self.dim, "queries")
        seeds = np.ascontiguousarray(self.seeds_for(q))
        epoch = self._next_epochs(len(q))
        ids, scores, keys_scored = beam_search(
            self.store.data, self.adj, self.deg, q, seeds, max(self.ef, k), k, self.stamp, epoch
        )
        aux = len(q) * len(self.centroids)
        return SearchResult(ids, scores, scanned=int(keys_scored) + aux, keys_scored=int(keys_scored))
