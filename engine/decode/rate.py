"""The adaptive budget's rating of candidates: each candidate's attention probability,
estimated from its key (or a key sketch, engine.decode.sketch) against the resident
tokens' log-sum-exp and the blocks' estimated mass, decides whether it is read."""

from __future__ import annotations

import torch

from engine.index.distinct import unique_rows


def read_likely(layer, candidates, q, scale, lse_resident, blocks, lse=None) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The candidates [Hkv, C] (-1 padded) worth reading: those whose attention probability,
    estimated from the key sketch and averaged over the query group q [Hkv, G, D], reaches
    `read_threshold`. The softmax denominator `lse` [Hkv, G] is the resident tokens' exact mass
    plus the block summary's estimate of the host tokens' (without a summary: the candidates'
    sketched mass); a later pass over more candidates passes the first pass's in.
    Returns (ids [Hkv, C], sketch rows scored, lse)."""
    sketchable = torch.where(candidates < layer.sketch.n, candidates, -1)  # newer ones are read anyway
    s = layer.sketch.scores(q, sketchable).mul_(scale)  # [Hkv, G, C]
    if lse is None and blocks is not None:
        lse = rating_lse(layer, lse_resident, blocks).cpu()
    elif lse is None:
        lse = torch.logaddexp(lse_resident.float().cpu(), torch.logsumexp(s, dim=-1))
    p = torch.exp(s - lse.unsqueeze(-1)).mean(dim=1)  # [Hkv, C]
    keep = (sketchable >= 0) & (p >= read_threshold(layer.cfg, layer.n_seen))
    return torch.where(keep, candidates, -1), int((sketchable >= 0).sum()), lse


def rating_lse(layer, lse_resident: torch.Tensor, blocks) -> torch.Tensor:
    """The rating's softmax denominator [Hkv, G] (fp32, where lse_resident is): the resident tokens'
    exact log-mass and the block summary's estimate of the host tokens' (blocks: the step's scores)."""
    return torch.logaddexp(lse_resident.float(), layer.summary.log_mass(blocks))


def neighbours(ids: torch.Tensor, r: int, n: int, rated: torch.Tensor | None = None) -> torch.Tensor:
    """ids [H, M] (-1 padded) -> [H, M'] per row the host ids in [0, n) within r positions of one
    of its ids and not among them, nor among the row's `rated` [H, M''] (those rated already, which
    a second rating against the same lse would turn away again), ascending, -1 padded."""
    r = min(r, n)  # no id lies farther off: a larger r would only build offsets to throw away
    offsets = torch.tensor([d for d in range(-r, r + 1) if d], dtype=torch.int64)
    near = ids.unsqueeze(-1) + offsets  # [H, M, 2r]
    near = torch.where((ids >= 0).unsqueeze(-1) & (near >= 0) & (near < n), near, -1).flatten(1)
    rows = torch.arange(ids.shape[0]).unsqueeze(1)
    known = ids if rated is None else torch.cat([ids, rated], dim=1)
    taken = torch.isin(rows * n + near, (rows * n + known)[known >= 0])  # read already, or rated
    return unique_rows(torch.where(taken, -1, near))


def read_threshold(cfg, n_tokens: int) -> float:
    """The estimated attention probability a candidate needs to be read among n_tokens:
    cfg.min_prob (lowered as the budget grows with the context: OffloadConfig.growth), and at
    short contexts cfg.min_ratio times the uniform share, since a token no likelier than the
    average is what its block's estimate already stands for."""
    return max(cfg.min_prob / cfg.growth(n_tokens), cfg.min_ratio / max(1, n_tokens))
