"""numba kernels shared by the indexes: exact rerank of candidate lists,
best-first beam search over a fixed-width adjacency array, the top entries
of every row of a score matrix, and the distinct ids of every row of a
proposal matrix.

Graph layout: adj [cap, R] int32 (-1 = empty slot), deg [cap] int32 (filled
slots, always a prefix). A visited stamp [cap] int32 with a per-query epoch
avoids clearing an O(N) array for every query.
"""

from __future__ import annotations

import numba as nb
import numpy as np

_NEG = np.float32(-np.inf)


@nb.njit(cache=True, inline="always")
def _dot(keys, i, q):
    s = np.float32(0.0)
    for d in range(q.shape[0]):
        s += keys[i, d] * q[d]
    return s


# --- binary heaps over parallel (score, id) arrays ------------------------------
@nb.njit(cache=True, inline="always")
def _heap_push(hs, hi, n, s, i, sign):
    """Push into a heap of size n; sign=+1 keeps the max on top, -1 the min."""
    j = n
    hs[j] = s
    hi[j] = i
    while j > 0:
        p = (j - 1) >> 1
        if sign * hs[p] >= sign * hs[j]:
            break
        hs[p], hs[j] = hs[j], hs[p]
        hi[p], hi[j] = hi[j], hi[p]
        j = p
    return n + 1


@nb.njit(cache=True, inline="always")
def _heap_pop(hs, hi, n, sign):
    """Remove the top of a heap of size n; returns the new size."""
    n -= 1
    hs[0] = hs[n]
    hi[0] = hi[n]
    j = 0
    while True:
        a = 2 * j + 1
        if a >= n:
            break
        b = a + 1
        c = a
        if b < n and sign * hs[b] > sign * hs[a]:
            c = b
        if sign * hs[j] >= sign * hs[c]:
            break
        hs[c], hs[j] = hs[j], hs[c]
        hi[c], hi[j] = hi[j], hi[c]
        j = c
    return n


@nb.njit(cache=True)
def _sorted_topk(rs, ri, n, k, out_i, out_s):
    """Write the best min(n, k) of (rs, ri)[:n] to out in descending score order."""
    order = np.argsort(-rs[:n])
    m = min(n, k)
    for j in range(m):
        out_i[j] = ri[order[j]]
        out_s[j] = rs[order[j]]


@nb.njit(cache=True)
def beam_search_one(keys, adj, deg, q, seeds, ef, k, stamp, epoch, out_i, out_s):
    """Best-first search for the top-k of q · keys from `seeds`, beam width ef.

    Returns the number of keys scored. stamp[i] == epoch marks i as visited."""
    cs = np.empty(ef * 8 + seeds.shape[0] + adj.shape[1] + 1, np.float32)  # candidate max-heap
    ci = np.empty(cs.shape[0], np.int64)
    rs = np.empty(ef + 1, np.float32)  # result min-heap
    ri = np.empty(ef + 1, np.int64)
    nc = 0
    nr = 0
    scored = 0
    for t in range(seeds.shape[0]):
        e = seeds[t]
        if e < 0 or stamp[e] == epoch:
            continue
        stamp[e] = epoch
        s = _dot(keys, e, q)
        scored += 1
        nc = _heap_push(cs, ci, nc, s, e, 1)
        nr = _heap_push(rs, ri, nr, s, e, -1)
        if nr > ef:
            nr = _heap_pop(rs, ri, nr, -1)
    while nc > 0:
        s = cs[0]
        u = ci[0]
        if nr >= ef and s < rs[0]:
            break
        nc = _heap_pop(cs, ci, nc, 1)
        for j in range(deg[u]):
            v = adj[u, j]
            if stamp[v] == epoch:
                continue
            stamp[v] = epoch
            sv = _dot(keys, v, q)
            scored += 1
            if nr < ef or sv > rs[0]:
                if nc + 1 >= cs.shape[0]:
                    # candidate heap full: drop the whole heap's worst half lazily by rebuilding
                    nc = _shrink_max_heap(cs, ci, nc)
                nc = _heap_push(cs, ci, nc, sv, v, 1)
                nr = _heap_push(rs, ri, nr, sv, v, -1)
                if nr > ef:
                    nr = _heap_pop(rs, ri, nr, -1)
    _sorted_topk(rs, ri, nr, k, out_i, out_s)
    return scored


@nb.njit(cache=True)
def _shrink_max_heap(cs, ci, nc):
    """Keep the better half of a max-heap's entries (rebuilt as a heap)."""
    order = np.argsort(-cs[:nc])
    keep = nc // 2
    ts = cs[order[:keep]].copy()
    ti = ci[order[:keep]].copy()
    # a descending-sorted array is a valid max-heap
    cs[:keep] = ts
    ci[:keep] = ti
    return keep


@nb.njit(cache=True)
def beam_search(keys, adj, deg, qs, seeds, ef, k, stamp, epoch0):
    """Search each row of qs [n_q, D]; seeds [n_q, S] int64 (-1 = none).

    Returns ids [n_q, k] int64 (-1 padded), scores [n_q, k] float32, keys scored."""
    n_q = qs.shape[0]
    ids = np.full((n_q, k), -1, np.int64)
    scores = np.full((n_q, k), _NEG, np.float32)
    total = 0
    for t in range(n_q):
        total += beam_search_one(keys, adj, deg, qs[t], seeds[t], ef, k, stamp, epoch0 + t, ids[t], scores[t])
    return ids, scores, total


@nb.njit(cache=True)
def rerank_candidates(keys, qs, cand, k):
    """Exact top-k among the distinct valid ids of each row of cand [n_q, C].

    Returns ids [n_q, k] (-1 padded), scores [n_q, k], distinct keys scored (summed)."""
    n_q = qs.shape[0]
    ids = np.full((n_q, k), -1, np.int64)
    scores = np.full((n_q, k), _NEG, np.float32)
    total = 0
    for t in range(n_q):
        row = np.sort(cand[t])
        m = 0
        for j in range(row.shape[0]):  # compact the distinct valid ids to the front
            if row[j] >= 0 and (m == 0 or row[j] != row[m - 1]):
                row[m] = row[j]
                m += 1
        sc = np.empty(m, np.float32)
        for j in range(m):
            sc[j] = _dot(keys, row[j], qs[t])
        total += m
        order = np.argsort(-sc, kind="mergesort")
        for j in range(min(m, k)):
            ids[t, j] = row[order[j]]
            scores[t, j] = sc[order[j]]
    return ids, scores, total


@nb.njit(cache=True)
def rerank_shared(keys, qs, cand, k):
    """Exact top-k for each query of qs [G, D] over ONE candidate list cand [C]
    (deduplicated once for the group). Returns ids [G, k], scores [G, k], G · distinct."""
    row = np.sort(cand)
    m = 0
    for j in range(row.shape[0]):
        if row[j] >= 0 and (m == 0 or row[j] != row[m - 1]):
            row[m] = row[j]
            m += 1
    g_n = qs.shape[0]
    ids = np.full((g_n, k), -1, np.int64)
    scores = np.full((g_n, k), _NEG, np.float32)
    sc = np.empty(m, np.float32)
    for g in range(g_n):
        for j in range(m):
            sc[j] = _dot(keys, row[j], qs[g])
        order = np.argsort(-sc, kind="mergesort")
        for j in range(min(m, k)):
            ids[g, j] = row[order[j]]
            scores[g, j] = sc[order[j]]
    return ids, scores, g_n * m


@nb.njit(cache=True, parallel=True)
def top_rows(scores, k, out_s, out_i):
    """The k largest entries of every row of scores [R, N] (1 <= k <= N), best first
    (ties by position), written to out_s [R, k] and out_i [R, k].

    A row's k-th largest entry is at least the k-th largest of the maxima of 4k
    strided groups, so only entries reaching that bound (a few more than k on
    real scores) are sorted, where a heap or a full sort handles every entry."""
    n_rows, n = scores.shape
    n_groups = min(n, 4 * k)
    for r in nb.prange(n_rows):
        row = scores[r]
        gmax = row[:n_groups].copy()
        for base in range(n_groups, n, n_groups):
            for g in range(min(n_groups, n - base)):
                gmax[g] = max(gmax[g], row[base + g])
        bound = np.partition(gmax, n_groups - k)[n_groups - k]
        cand = np.empty(n, np.int64)
        m = 0
        for j in range(n):
            cand[m] = j
            m += row[j] >= bound
        if m < k:  # only NaN scores fall short of the bound: sort the whole row (NaN last)
            m = n
            for j in range(n):
                cand[j] = j
        vals = np.empty(m, np.float32)
        for t in range(m):
            vals[t] = -row[cand[t]]
        order = np.argsort(vals, kind="mergesort")
        for t in range(k):
            out_i[r, t] = cand[order[t]]
            out_s[r, t] = -vals[order[t]]


@nb.njit(cache=True)
def distinct_rows(ids, limit, n_ids):
    """Each row of ids [H, C] (int64, -1 = none, the others below n_ids) -> its first
    `limit` distinct ids in order of appearance, ascending, -1 after them: out [H, min(C,
    limit)], and the most any row kept. A mark per id, set and cleared per row: linear
    in C, where a stable sort of the proposals (to find first appearances) is not."""
    H, C = ids.shape
    out = np.full((H, min(C, limit)), -1, np.int64)
    seen = np.zeros(n_ids, np.bool_)
    width = 0
    for h in range(H):
        m = 0
        for c in range(C):
            if m == limit:
                break
            i = ids[h, c]
            if i >= 0 and not seen[i]:
                seen[i] = True
                out[h, m] = i
                m += 1
        for j in range(m):
            seen[out[h, j]] = False
        out[h, :m].sort()
        width = max(width, m)
    return out, width


@nb.njit(cache=True)
def enter_lists(lists, list_scores, raw, keys, near, first_id):
    """Keys [H, n, D] (fp32), given ids first_id.., enter in order the lists [H, Nq, M], best first, of
    the build queries near[h, i] [H, n, A] each one points at: where the key's logit (raw [H, Nq, D]
    . key) beats the list's last entry, that entry drops out and the key takes its place in the order,
    after the entries its logit equals (list_scores keeps the logits beside them), so that the lists stay
    best first, as the proposals' cut to a budget takes them. Key by key: two keys never take one slot."""
    H, n, A = near.shape
    M = lists.shape[2]
    for h in range(H):
        for i in range(n):
            for a in range(A):
                r = near[h, i, a]
                logit = np.float32(0.0)
                for d in range(keys.shape[2]):
                    logit += raw[h, r, d] * keys[h, i, d]
                if not logit > list_scores[h, r, M - 1]:
                    continue
                j = M - 1
                while j > 0 and list_scores[h, r, j - 1] < logit:
                    list_scores[h, r, j] = list_scores[h, r, j - 1]
                    lists[h, r, j] = lists[h, r, j - 1]
                    j -= 1
                list_scores[h, r, j] = logit
                lists[h, r, j] = first_id + i
