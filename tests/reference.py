"""Plain-torch reference implementations the fast paths are tested against.

They favour obviousness over speed: dense scores over the whole store, fp64.
"""

from __future__ import annotations

import torch


def gather_attend_ref(q, k_store, v_store, ids, scale):
    """Dense reference: every store row gets a multiplicity (how often its id is
    listed for that KV head), and attention is a softmax over all N rows with
    log(multiplicity) added to the scores. q [Hq, D], stores [Hkv, N, D], ids [Hkv, M].
    Returns (out [Hq, D], lse [Hq]) in float64."""
    Hkv, N, D = k_store.shape
    G = q.shape[0] // Hkv
    counts = torch.zeros(Hkv, N, dtype=torch.float64)
    for h in range(Hkv):
        for i in ids[h].tolist():
            if i >= 0:
                counts[h, i] += 1
    out = torch.zeros(q.shape[0], D, dtype=torch.float64)
    lse = torch.full((q.shape[0],), float("-inf"), dtype=torch.float64)
    for h in range(Hkv):
        if counts[h].sum() == 0:
            continue
        k, v = k_store[h].double(), v_store[h].double()
        for g in range(G):
            s = (k @ q[h * G + g].double()) * scale + counts[h].log()
            lse[h * G + g] = torch.logsumexp(s, 0)
            out[h * G + g] = torch.softmax(s, 0) @ v
    return out, lse


def full_attention_ref(q, k, v, scale, causal=True):
    """q [H, Q, D], k/v [H, T, D] with the queries at the last Q positions; float64."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if causal:
        Q, T = q.shape[-2], k.shape[-2]
        mask = torch.arange(T).view(1, T) > torch.arange(T - Q, T).view(Q, 1)
        s = s.masked_fill(mask, float("-inf"))
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)
