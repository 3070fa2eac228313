"""Which host tokens a decode step reads: candidates from the host key index, the
device block index, or both (OffloadConfig.candidates_from), deduplicated per KV head; with an
adaptive budget only those rated likely (engine.decode.rate)."""

from __future__ import annotations

import numpy as np
import torch

from engine.decode.estimate import batch_of
from engine.decode.rate import neighbours, read_likely
from engine.index.build import build_key_index
from engine.index.distinct import unique_rows
from engine.index.heads import OVERSAMPLE, SKETCHED_OVERSAMPLE


def select_host_ids(
    layer, q: torch.Tensor, q_host: np.ndarray, scale: float, lse_resident: torch.Tensor, blocks=None
) -> torch.Tensor:
    """Host ids [Hkv, M] int64 on the CPU (-1 padded, unique per row) for the decode
    queries q [Hkv, G, D] (device) / q_host [Hkv * G, D] (float32).

    A fixed budget reads every candidate (`candidates`); an adaptive one reads those
    the key sketch rates likely (`read_likely`), given the resident tokens'
    log-sum-exp lse_resident [Hkv, G] and the step's block scores
    (engine.decode.estimate.BlockScores, None without a summary). The newest host tokens,
    which no index or summary covers yet, are always read. Sets the selection
    counters of layer.stats."""
    cfg = layer.cfg
    found = candidates(layer, q, q_host, blocks)
    rated = 0
    if found is not None and cfg.budget == "adaptive" and layer.sketch is not None:
        q_groups = torch.from_numpy(q_host).view(layer.n_kv_heads, layer.group, -1)
        proposed = found
        found, rated, lse = read_likely(layer, found, q_groups, scale, lse_resident, blocks)
        if cfg.neighbours:  # a needle's digits, a phrase: the indexes propose a run of heavy tokens only in part
            near = neighbours(found, cfg.neighbours, layer.host.n, rated=proposed)
            more, more_rated, _ = read_likely(layer, near, q_groups, scale, lse_resident, blocks, lse)
            found, rated = torch.cat([found, more], dim=1), rated + more_rated
    layer.stats.rated = rated
    parts = [] if found is None else [found]
    parts.append(torch.from_numpy(always_read(layer)).expand(layer.n_kv_heads, -1))
    return unique_rows(torch.cat(parts, dim=1))


def candidates(layer, q: torch.Tensor, q_host: np.ndarray, blocks=None) -> torch.Tensor | None:
    """The step's candidate host ids [Hkv, C] (-1 padded, unique per row; None: no source):
    the block index's blocks and/or the key index's proposals (OffloadConfig.candidates_from), and
    with an adaptive budget the keys added after the key index's build (the lists take
    in few of them). Sets layer.stats' scanned and keys_scored."""
    cfg = layer.cfg
    parts, scanned, keys_scored = [], 0, 0
    if layer.blocks is not None:
        parts.append(layer.blocks.select(q, *block_choice(layer, blocks)).cpu())
        scanned += layer.blocks.scanned
    if cfg.uses_key_index:
        if layer.key_index is None:
            build_key_index(layer)
        if layer.n_indexed:
            ids, vectors, keys = layer.key_index.candidates(
                q, q_host.reshape(layer.n_kv_heads, layer.group, -1), *key_budget(cfg, layer.n_seen)
            )
            parts.append(ids)
            scanned += vectors
            keys_scored += keys
            parts.append(torch.arange(*recent_range(layer)).expand(layer.n_kv_heads, -1))
    layer.stats.scanned, layer.stats.keys_scored = scanned, keys_scored
    return unique_rows(torch.cat(parts, dim=1)) if parts else None


def block_choice(layer, blocks=None) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """How a step asks the block index for its blocks (`BlockIndex.select`/`choose`): the number of
    blocks, the scores already computed (the summary's logits, when the block index is the summary's
    mean keys) and the blocks they score (two levels: those the summary expanded; None: all)."""
    counts, scores, scored, _ = block_choices([layer], batch_of(blocks))
    return counts[0], None if scores is None else scores[0], None if scored is None else scored[0]


def block_choices(layers, blocks=None) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None, list[int] | None]:
    """`block_choice` of B sequences alike (engine.decode.host.groups) given their stacked block
    scores (engine.decode.estimate.stacked_scores), as `ann.block.choose_blocks` takes it: the blocks
    per sequence, the scores [B, Hkv, G, F], the blocks they score [B, Hkv, F] and how many of
    those are each sequence's own."""
    first = layers[0]
    counts = [block_count(layer) for layer in layers]
    scored = None if blocks is None else blocks.fine
    scores = blocks.logits if blocks is not None and first.blocks is first.summary.keys else None
    n_scored = None if scored is None else [layer.summary.scored_blocks() for layer in layers]
    if scored is not None and counts[0] > n_scored[0]:  # more blocks than were scored: score them all
        return counts, None, None, None
    return counts, scores, scored, n_scored


def block_count(layer) -> int:
    """The blocks a decode step takes from the layer's block index."""
    return layer.cfg.blocks_per_step(layer.blocks.n_blocks, layer.n_seen)


def key_budget(cfg, n_tokens: int) -> tuple[int, int]:
    """(proposals per query head, oversample) the key index is asked for with n_tokens in the cache:
    an adaptive budget rates its candidates afterwards, so it takes `candidates` (grown with the
    context: OffloadConfig.growth) with less oversampling; a fixed one `top_k`."""
    if cfg.budget == "adaptive":
        return int(cfg.candidates * cfg.growth(n_tokens)), SKETCHED_OVERSAMPLE
    return cfg.top_k, OVERSAMPLE


def recent_range(layer) -> tuple[int, int]:
    """[begin, end) of the host keys added after the key index's build that an adaptive budget
    takes as candidates at every step (the lists take in few of them); empty otherwise."""
    cfg = layer.cfg
    if cfg.budget != "adaptive" or not cfg.recent:
        return layer.n_indexed, layer.n_indexed
    return max(layer.n_built, layer.n_indexed - cfg.recent), layer.n_indexed


def always_read(layer) -> np.ndarray:
    """Host ids [n] every step reads: the newest tokens, not yet in the key index, and
    (with an estimate) those of the block still filling, which has no summary yet."""
    start = layer.n_indexed if layer.cfg.uses_key_index else layer.host.n
    if layer.summary is not None:
        start = min(start, layer.summary.n_blocks * layer.cfg.block_size)
    return np.arange(start, layer.host.n)
