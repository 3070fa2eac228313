"""Plain-torch reference implementations the fast paths are tested against.

They favour obviousness over speed: dense scores over the whole store, fp64.
"""

from __future__ import annotations

from typing import NamedTuple

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


class HostUnitRef(NamedTuple):
    """One (sequence, KV head) of `host_step` as the reference sees it."""

    candidates: list[int]  # in the kernel's order, each once
    scores: torch.Tensor  # [G, C] fp64 scale * q . k of the candidates
    lse: torch.Tensor  # [G] fp64 the rating's log-denominators
    p: torch.Tensor  # [C] fp64 mean_g exp(scores - lse): the candidates' ratings
    read: list[int]  # ascending: the candidates rated >= threshold (all without a rating) and the forced range
    n_rated: int


def host_candidates_ref(lists, near, blocks, ranges, n_tokens, *, qq_limit, qq_prefix, block_size) -> list[int]:
    """A unit's candidates, each once, in order: the first qq_limit distinct ids among the first
    qq_prefix entries of the list rows `near` names (-1 rows skipped, -1 entries counted), the
    tokens of the full blocks `blocks` (-1 = none), the tail and recent ranges. lists [rows, L],
    near [P], blocks [T], ranges [3, 2] (tail, recent, forced). Raises IndexError naming the first
    list row, list entry or block it reaches outside its store (a bad one never reached is ignored)."""
    lists, near, blocks = lists.tolist(), near.tolist(), blocks.tolist()
    seen, order = set(), []

    def add(i):
        if i not in seen:
            seen.add(i)
            order.append(i)

    walked = found = 0
    for r in near:
        if walked >= qq_prefix or found >= qq_limit:
            break
        if not -1 <= r < len(lists):
            raise IndexError(f"list row {r} is outside [-1, {len(lists)})")
        for i in lists[r] if r >= 0 else []:
            if walked >= qq_prefix or found >= qq_limit:
                break
            walked += 1
            if not -1 <= i < n_tokens:
                raise IndexError(f"list entry {i} is outside [-1, {n_tokens})")
            if i >= 0 and i not in seen:
                add(i)
                found += 1
    for blk in blocks:
        if blk < -1 or (blk >= 0 and (blk + 1) * block_size > n_tokens):
            raise IndexError(f"block {blk} is not a full block of the store")
        for i in range(blk * block_size, (blk + 1) * block_size) if blk >= 0 else []:
            add(i)
    for begin, end in ranges.tolist()[:2]:
        for i in range(begin, end):
            add(i)
    return order


def host_unit_ref(q, k, candidates, forced, lse, scale, threshold, lse_from_candidates) -> HostUnitRef:
    """The rating and the ids read of one unit: q [G, D], k [N, D] its KV head's keys, the
    candidates (host_candidates_ref), the forced [begin, end), lse [G] the given log-denominators,
    completed with the candidates' own scores when lse_from_candidates. A candidate is read when
    p = mean_g exp(scale * q[g] . k - lse[g]) >= threshold; with threshold -inf every one, unrated."""
    ids = torch.tensor(candidates, dtype=torch.int64)
    scores = (q.double() @ k[ids].double().T) * scale  # [G, C]
    lse = lse.double()
    if lse_from_candidates:
        lse = torch.logaddexp(lse, torch.logsumexp(scores, dim=1))
    p = torch.exp(scores - lse.unsqueeze(1)).mean(dim=0)  # [C]
    rated = threshold != float("-inf")
    read = {i for i, pi in zip(candidates, p.tolist()) if not rated or pi >= threshold}
    read |= set(range(*forced))
    return HostUnitRef(candidates, scores, lse, p, sorted(read), len(candidates) if rated else 0)
