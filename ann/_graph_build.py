"""numba kernels that build and extend the attention-aware key graph (see ann.graph)."""

from __future__ import annotations

import numba as nb
import numpy as np

from ann._kernels import beam_search_one


@nb.njit(cache=True)
def projection_edges(knn, window):
    """Project the query->key bipartite graph onto keys (RoarGraph-style).

    knn [Nq, M] int64: each build query's exact top-M keys, best first. Each
    key links, both ways, to the `window` keys ranked just below it by the same
    query, so the keys one query retrieves form a connected band whose links
    run between keys of similar score; `select_neighbors` then keeps, per key,
    the links that most queries agree on. Returns src, dst [E] int32."""
    nq, m = knn.shape
    src = np.empty(nq * 2 * window * m, np.int32)  # int32: this list is the build's largest array
    dst = np.empty_like(src)
    e = 0
    for r in range(nq):
        for i in range(m):
            a = knn[r, i]
            if a < 0:
                continue
            for j in range(i + 1, min(m, i + 1 + window)):
                b = knn[r, j]
                if b < 0 or b == a:
                    continue
                src[e] = a
                dst[e] = b
                src[e + 1] = b
                dst[e + 1] = a
                e += 2
    return src[:e], dst[:e]


@nb.njit(cache=True)
def select_neighbors(src, dst, weight, n, width, cap):
    """Per node, keep the `width` destinations of largest summed edge weight.

    Duplicate (src, dst) pairs add their weights, so an edge that many build
    queries co-retrieved outranks a one-off. Returns adj [cap, width] int32
    (-1 padded) and deg [cap] int32."""
    counts = np.zeros(n + 1, np.int64)
    for e in range(src.shape[0]):
        counts[src[e] + 1] += 1
    off = np.cumsum(counts)
    fill = off[:-1].copy()
    d_sorted = np.empty(src.shape[0], np.int64)
    w_sorted = np.empty(src.shape[0], np.float32)
    for e in range(src.shape[0]):
        u = src[e]
        d_sorted[fill[u]] = dst[e]
        w_sorted[fill[u]] = weight[e]
        fill[u] += 1
    adj = np.full((cap, width), -1, np.int32)
    deg = np.zeros(cap, np.int32)
    for u in range(n):
        a, b = off[u], off[u + 1]
        if a == b:
            continue
        seg = d_sorted[a:b]
        sw = w_sorted[a:b]
        order = np.argsort(seg)
        uniq = np.empty(b - a, np.int64)
        tot = np.zeros(b - a, np.float32)
        m = 0
        for j in range(b - a):
            v = seg[order[j]]
            if v == u:
                continue
            if m == 0 or uniq[m - 1] != v:
                uniq[m] = v
                m += 1
            tot[m - 1] += sw[order[j]]
        best = np.argsort(-tot[:m], kind="mergesort")
        c = min(m, width)
        for j in range(c):
            adj[u, j] = uniq[best[j]]
        deg[u] = c
    return adj, deg


@nb.njit(cache=True)
def _link(adj, deg, spare_next, u, v, spare):
    """Add edge u->v; when u is full, overwrite its spare slots round-robin."""
    width = adj.shape[1]
    for j in range(deg[u]):
        if adj[u, j] == v:
            return
    if deg[u] < width:
        adj[u, deg[u]] = v
        deg[u] += 1
    else:
        slot = width - spare + spare_next[u] % spare
        adj[u, slot] = v
        spare_next[u] += 1


@nb.njit(cache=True)
def insert_keys(keys, adj, deg, spare_next, stamp, epoch0, start, stop, seeds, ef, n_out, spare):
    """Insert keys[start:stop] (already stored) into the graph without a rebuild.

    Each new key links to its n_out best neighbours by inner product (a beam
    search from `seeds` with the key as query) and to the previous token, and
    those nodes link back, so a query that reaches the neighbourhood sees the
    new key. O(ef · width · D) per key. Returns keys scored."""
    out_i = np.empty(n_out, np.int64)
    out_s = np.empty(n_out, np.float32)
    scored = 0
    for t in range(start, stop):
        out_i[:] = -1
        if t > 0:
            # search only the graph built so far: hide t itself by pre-stamping it
            ep = epoch0 + (t - start)
            stamp[t] = ep
            scored += beam_search_one(keys, adj, deg, keys[t], seeds, ef, n_out, stamp, ep, out_i, out_s)
        deg[t] = 0
        if t > 0:
            _link(adj, deg, spare_next, t, t - 1, spare)
            _link(adj, deg, spare_next, t - 1, t, spare)
        for j in range(n_out):
            u = out_i[j]
            if u < 0 or u == t:
                continue
            _link(adj, deg, spare_next, t, u, spare)
            _link(adj, deg, spare_next, u, t, spare)
    return scored
