"""The host side of a decode step in one native call (`engine.native.ops.host_step`): for every
sequence of a batch and every KV head, the candidates, their rating, the gather-attend of those
read and the reads per block, with the GIL released and threads over (sequence, KV head) and,
with fewer KV heads than threads, over chunks of each one's candidates.

The device prepares what the call needs (`prepare`: the chosen blocks, the query->query list
rows, the rating's denominators), hands it over in one copy, and takes back the host part's
(o, lse) and the reads per block, which the block estimate needs (`read`).

`engine.decode.select` stays the reference this call is held to (the same ids for the same
inputs: tests/test_host_step.py). The call serves candidates from the query->query lists
and/or the block index, with a fixed budget or an adaptive one rated on the exact keys and no
`neighbours`; a faiss or graph key index, a key sketch (`sketch_rank`), `neighbours` and an
evaluation's own selection rule take the Python path (`serves`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ann.block import choose_blocks
from engine.decode.rate import rating_lse, read_threshold
from engine.decode.select import always_read, block_choices, block_count, key_budget, recent_range, select_host_ids
from engine.index.heads import proposal_rows
from engine.native import ops


class HostInputs(NamedTuple):
    """One sequence's part of the call: device tensors (`rows`, `blocks`, `lse`) and host ones."""

    rows: torch.Tensor  # [Hkv, P] the query->query list rows proposed, best first
    blocks: torch.Tensor  # [Hkv, T] the chosen blocks
    lse: torch.Tensor  # [Hkv, G] the rating's log-denominators (resident only: completed on the host)
    lists: torch.Tensor  # [Hkv, rows, L] int32 the lists (rows 0 without a key index)
    ranges: list  # the tail, recent and forced ranges (ops.RANGES), (begin, end) each
    threshold: float  # -inf: every candidate read, unrated
    qq_limit: int
    qq_prefix: int


def python_selection(layer, q, q_host, scale, lse_resident, blocks=None):
    """`engine.decode.select.select_host_ids` under another name: a decode step given it as its
    selection rule takes the Python path, which benchmarks and tests set beside the native call."""
    return select_host_ids(layer, q, q_host, scale, lse_resident, blocks)


def serves(layer, select) -> bool:
    """Whether the native call serves this layer's decode steps with this selection rule."""
    cfg = layer.cfg
    exact_rating = cfg.sketch_rank == 0 or cfg.sketch_rank >= layer.head_dim  # engine.decode.sketch.make_scorer
    rule = cfg.budget == "fixed" or (cfg.neighbours == 0 and exact_rating)
    fits = layer.group <= ops.MAX_RATE_GROUP  # the call's rating holds a group's query heads in fixed arrays
    return (
        ops.HAS_EXT
        and select is select_host_ids
        and rule
        and fits
        and (not cfg.uses_key_index or cfg.key_index == "qq")
    )


def groups(layers, stack: bool) -> list[list[int]]:
    """The sequences (positions in `layers`) whose device parts run as one set of kernels over
    stacked operands (`prepare`, engine.decode.step.native_step): with `stack`, those alike in
    what decides the kernels (`_kernels`), else each alone."""
    if not stack:
        return [[i] for i in range(len(layers))]
    out: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        out.setdefault(_kernels(layer), []).append(i)
    return list(out.values())


def _kernels(layer) -> tuple:
    """What decides which kernels a sequence's device part runs: a summary scored in one or two
    levels, blocks chosen among all (more than the summary scores one by one) or among those it
    scored, and query->query lists or none."""
    summary = layer.summary
    two_level = summary is not None and summary.two_level()
    all_blocks = two_level and layer.blocks is not None and block_count(layer) > summary.scored_blocks()
    return summary is None, two_level, all_blocks, layer.cfg.uses_key_index and layer.n_indexed > 0


def prepare(layers, q: torch.Tensor, lse_resident: torch.Tensor, scores) -> list[HostInputs]:
    """What the call needs of B sequences alike (`groups`) for their queries q [B, Hkv, G, D]
    (device), the resident tokens' lse_resident [B, Hkv, G] and the step's block scores
    (engine.decode.estimate.stacked_scores; None without a summary), as
    `engine.decode.select.candidates` and `read_likely` choose them, one set of kernels for all.
    Sets each layer.stats' scanned and keys_scored."""
    first, B, Hkv = layers[0], q.shape[0], q.shape[1]
    cfg, device = first.cfg, q.device
    none = torch.empty(Hkv, 0, dtype=torch.int64, device=device)
    blocks, scanned = [none] * B, [0] * B
    if first.blocks is not None:
        chosen = choose_blocks([layer.blocks for layer in layers], q, *block_choices(layers, scores))
        blocks = list(chosen)
        scanned = [n + layer.blocks.scanned for n, layer in zip(scanned, layers)]
    rows, limits, recent = [none] * B, [0] * B, [(0, 0)] * B
    lists = [torch.empty(Hkv, 0, 1, dtype=torch.int32)] * B
    oversample = 0
    if cfg.uses_key_index and first.n_indexed:
        budgets = [key_budget(cfg, layer.n_seen) for layer in layers]
        oversample = budgets[0][1]  # the configuration's, alike for every sequence
        proposed, limits = proposal_rows([layer.key_index for layer in layers], q, [k for k, _ in budgets], oversample)
        rows, lists = list(proposed), [layer.key_index.lists.lists for layer in layers]
        scanned = [n + layer.key_index.lists.scanned for n, layer in zip(scanned, layers)]
        recent = [recent_range(layer) for layer in layers]
    rating = cfg.budget == "adaptive" and first.sketch is not None
    # the blocks' estimated mass completes the denominator; without a summary the call completes it
    lse = rating_lse(first, lse_resident, scores) if rating and scores is not None else lse_resident.float()
    out = []
    for b, layer in enumerate(layers):
        layer.stats.scanned, layer.stats.keys_scored = scanned[b], 0
        forced = always_read(layer)
        tail = (layer.host.n, layer.host.n)
        if layer.blocks is not None:
            tail = (layer.blocks.n_blocks * layer.blocks.block_size, layer.blocks.n)
        ranges = [tail, recent[b], (int(forced[0]), layer.host.n) if len(forced) else (0, 0)]
        threshold = read_threshold(cfg, layer.n_seen) if rating else float("-inf")
        prefix = oversample * limits[b]
        out.append(HostInputs(rows[b], blocks[b], lse[b], lists[b], ranges, threshold, limits[b], prefix))
    return out


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors on the CPU: from a GPU as one asynchronous copy (into pinned memory) and one
    wait, rather than a copy and a wait each."""
    if all(t.device.type == "cpu" for t in tensors):
        return tensors
    out = packed_copy(tensors, lambda flat: flat.to("cpu", non_blocking=True))
    torch.cuda.current_stream(next(t.device for t in tensors if t.is_cuda)).synchronize()
    return out


def packed_copy(tensors: list[torch.Tensor], copy) -> list[torch.Tensor]:
    """`copy` applied once, to the tensors' bytes laid end to end (the widest elements first, so
    that every part stays aligned for its type); the result cut back into the tensors' dtypes and
    shapes, in their order."""
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
    ordered = [tensors[i] for i in order]
    flat = copy(torch.cat([t.reshape(-1).view(torch.uint8) for t in ordered]))
    out = [None] * len(tensors)
    for i, part in zip(order, ops.split_like(flat, ordered)):
        out[i] = part
    return out


def _padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """[Hkv, n_b] tensors -> [B, Hkv, max n_b] contiguous, -1 padded (one: a view of it where it is contiguous)."""
    if len(rows) == 1:
        return rows[0].unsqueeze(0).contiguous()
    out = torch.full((len(rows), rows[0].shape[0], max(r.shape[1] for r in rows)), -1, dtype=torch.int64)
    for b, r in enumerate(rows):
        out[b, :, : r.shape[1]] = r
    return out


def read(layers, q: torch.Tensor, inputs: list[HostInputs], scale: float) -> ops.HostStepResult:
    """The native call for sequences `layers` with queries q [B, Hkv, G, D] (any device) and
    their `prepare`d inputs. Sets each layer's step counters."""
    B, Hkv, G, D = q.shape
    q_host, *moved = to_host([q.reshape(B, Hkv * G, D).float().contiguous()] + [t for i in inputs for t in i[:3]])
    rows, blocks, lse = (moved[k::3] for k in range(3))
    first = layers[0]
    summarized = [layer.summary.n_blocks if layer.summary is not None else 0 for layer in layers]
    widths = [
        min(layer.host.n, i.qq_limit + b.shape[1] * layer.cfg.block_size + sum(end - begin for begin, end in i.ranges))
        for layer, i, b in zip(layers, inputs, blocks)
    ]
    res = ops.host_step_prepared(  # every input below is made in the kernel's types and layouts
        q_host,
        [layer.host.keys for layer in layers],
        [layer.host.values for layer in layers],
        [i.lists for i in inputs],
        _padded(rows),
        _padded(blocks),
        torch.tensor([i.ranges for i in inputs]),
        torch.stack(lse).view(B, Hkv * G),
        np.array([i.threshold for i in inputs], dtype=np.float32),
        scale=scale,
        qq_limit=np.array([i.qq_limit for i in inputs], dtype=np.int64),  # each its own: 0 without a key index yet
        qq_prefix=np.array([i.qq_prefix for i in inputs], dtype=np.int64),
        block_size=first.cfg.block_size,
        cap=max(widths),
        n_count_blocks=max(summarized),
        lse_from_candidates=first.summary is None,
        pin=first.device.type == "cuda",
        n_threads=first.cfg.host_threads,
    )
    n_read, n_rated, block_reads = res.n_read.tolist(), res.n_rated.tolist(), res.block_reads.numpy()
    for b, layer in enumerate(layers):
        st = layer.stats
        st.host_tokens, st.read_ids = layer.host.n, res.ids[b, :, : max(n_read[b])]
        st.gathered, st.rated = sum(n_read[b]), sum(n_rated[b])
        st.estimated = Hkv * summarized[b] * layer.cfg.block_size - int(block_reads[b, :, : summarized[b]].sum())
    return res
