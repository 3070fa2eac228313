"""Estimation of the host tokens a decode step does not read.

Per full host block (`block_size` consecutive host tokens) the device keeps the
mean key and the mean value. At a decode step the tokens of a block that were
not gathered contribute, per query head, the estimated log-weight

    log(n_left) + scale * q . mean_key        with value  mean_value

where n_left = block_size - (tokens of the block that were gathered). The
estimated blocks form one more partial attention state `(o, lse)`, merged by
log-sum-exp with the exact parts. Every host token is thus either read exactly
(once) or counted in its block's estimate (once); a block read in full has
n_left = 0 and contributes nothing, so budgets that read everything stay exact.

Why the whole block's mean key, also for a partly read block: the mean-key
weight exp(q . mean_k) underestimates the block's mass (Jensen), and the
mean over all its tokens (the read ones attract attention, so they raise it)
offsets part of that (docs/method.md has the measurements).

The tokens of the block still filling (the tail) have no summary yet: the
decode step always reads them.

Scoring every block's mean key grows with the context (32K blocks per KV
head at a million tokens), so long contexts are scored in two levels: every
`GROUP` consecutive full blocks form a superblock with its own mean key and
value; a step scores the superblocks, expands the `EXPAND` best of each KV
head (the GQA rule of `ann.block`) and the full blocks after the last whole
superblock into their blocks, and estimates each other superblock as one: its
unread tokens at its mean key's logit with its mean value. Every full block is
thus counted once, in its own block or in its superblock, and up to
GROUP x EXPAND blocks (32K tokens at the defaults) nothing changes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ann.block import BlockIndex, arange_on, group_block_scores, head_matmul, head_rows, masked, stack_rows
from engine.native import ops

GROUP = 32  # blocks per superblock
EXPAND = 32  # superblocks per KV head a step expands into their blocks


class BlockScores(NamedTuple):
    """One decode step's view of the full blocks, per query head: logits [Hkv, G, F] fp32
    (scale * q . mean key) of the blocks `fine` [Hkv, F] (None: all nb blocks, in order),
    the max `peak` [Hkv, G] of every logit (0 without blocks), rel = exp(logits - peak),
    and coarse_rel [Hkv, G, n_superblocks] for the superblocks not expanded (0 at the
    expanded ones; None when every block is scored), computed once for the mass and the
    estimate. Of B sequences at once (`stacked_scores`), each field has a leading [B] and runs
    to the longest sequence's: past a sequence's own, logits are -inf, rel and coarse_rel 0,
    fine 0."""

    logits: torch.Tensor
    peak: torch.Tensor
    rel: torch.Tensor
    fine: torch.Tensor | None = None
    coarse_rel: torch.Tensor | None = None


def batch_of(scores: BlockScores | None) -> BlockScores | None:
    """One sequence's BlockScores as a batch of one (`stacked_scores`'s form)."""
    return None if scores is None else BlockScores(*(None if t is None else t[None] for t in scores))


def sequence_of(scores: BlockScores) -> BlockScores:
    """A batch of one's BlockScores as its sequence's."""
    return BlockScores(*(None if t is None else t[0] for t in scores))


class BlockSummary:
    """Mean key and mean value [Hkv, n_blocks, D] of every full host block, and of every
    superblock of `group` blocks, on the device.

    All four are kept by `ann.block.BlockIndex` with mean landmarks, so appending,
    growth and the filling tail are shared; the block keys double as the block
    selection index when the configuration selects blocks by mean key."""

    def __init__(
        self, n_heads: int, dim: int, block_size: int, *, device, dtype, capacity: int, group=None, expand=None
    ):
        self.block_size, self.group, self.expand = block_size, group or GROUP, expand or EXPAND
        self.keys = BlockIndex(
            n_heads, dim, block_size, "mean", device=device, dtype=dtype, capacity=capacity, dots=block_dots
        )
        self.values = BlockIndex(n_heads, dim, block_size, "mean", device=device, dtype=dtype, capacity=capacity)
        coarse = dict(device=device, dtype=dtype, capacity=capacity // block_size)
        self.coarse_keys = BlockIndex(n_heads, dim, self.group, "mean", **coarse)  # fed with block means
        self.coarse_values = BlockIndex(n_heads, dim, self.group, "mean", **coarse)

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [Hkv, n, D]: the next n host tokens."""
        before = self.n_blocks
        self.keys.add(k)
        self.values.add(v)
        if self.n_blocks > before:  # superblocks take the new blocks' means (equal counts: the mean of means)
            self.coarse_keys.add(self.keys.landmarks[0][:, before:])
            self.coarse_values.add(self.values.landmarks[0][:, before:])

    def mark(self) -> tuple:
        """What `rewind` needs to take the summaries back to the tokens they hold now."""
        return tuple(index.mark() for index in self._indexes())

    def rewind(self, mark: tuple) -> None:
        for index, one in zip(self._indexes(), mark):
            index.rewind(one)

    def state(self) -> dict[str, torch.Tensor]:
        """Its four indexes' `BlockIndex.state()`, under their names."""
        return {f"{name}.{k}": t for name, index in self._named() for k, t in index.state().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, index in self._named():
            index.load_state({k: state[f"{name}.{k}"] for k in ("landmarks", "tail", "n")})

    def consistent(self) -> bool:
        """Whether keys and values summarise the same tokens, and the superblocks their blocks."""
        blocks = self.keys.n_blocks
        return self.values.n == self.keys.n and self.coarse_keys.n == self.coarse_values.n == blocks

    def _named(self) -> tuple[tuple[str, BlockIndex], ...]:
        return tuple(zip(("keys", "values", "coarse_keys", "coarse_values"), self._indexes()))

    def _indexes(self) -> tuple[BlockIndex, ...]:
        return self.keys, self.values, self.coarse_keys, self.coarse_values

    @property
    def n_blocks(self) -> int:
        return self.keys.n_blocks

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._indexes())

    def scores(self, q: torch.Tensor, scale: float) -> BlockScores:
        """q [Hkv, G, D] -> the step's BlockScores: every block's logit, or beyond `expand`
        superblocks the superblocks' and the expanded ones' blocks'."""
        return sequence_of(stacked_scores([self], q[None], scale))

    def scored_blocks(self) -> int:
        """The blocks a step scores one by one (`scores`): every one, or beyond `expand` superblocks
        those of the expanded ones and those after the last whole superblock."""
        if not self.two_level():
            return self.n_blocks
        return self.expand * self.group + self.n_blocks - self.coarse_keys.n_blocks * self.group

    def two_level(self) -> bool:
        """Whether a step scores superblocks first (more than `expand` of them), then the expanded ones' blocks."""
        return self.coarse_keys.n_blocks > self.expand

    def log_mass(self, scores: BlockScores) -> torch.Tensor:
        """Estimated log of the attention mass of all full blocks [Hkv, G] (before any is read)."""
        mass = self.block_size * scores.rel.sum(dim=-1)
        if scores.coarse_rel is not None:
            mass = mass + self.group * self.block_size * scores.coarse_rel.sum(dim=-1)
        return scores.peak + mass.log()

    def estimate(self, scores: BlockScores, read: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unread tokens' state, given read [Hkv, nb] tokens gathered per block ->
        (o [Hkv, G, D] fp32, lse [Hkv, G] fp32); lse = -inf when none is left."""
        o, lse = stacked_estimate([self], batch_of(scores), read[None])
        return o[0], lse[0]

    def read_per_block(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [Hkv, M] host ids gathered (-1 padded, distinct per row) -> tokens read per full block [Hkv, nb]."""
        nb, B = self.n_blocks, self.block_size
        ids = ids.to(self.keys.device)
        in_block = (ids >= 0) & (ids < nb * B)
        counts = torch.zeros(ids.shape[0], nb + 1, dtype=torch.int64, device=ids.device)  # column nb: the rest
        counts.scatter_add_(1, torch.where(in_block, ids // B, nb), in_block.long())
        return counts[:, :nb]


def block_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`head_matmul` for the blocks' scores and estimate. On a CPU without bf16 dot-product
    instructions (`ops.bf16_dots_available`) torch's half-precision products of these shapes (a few
    query heads against a thousand landmarks) run 3 to 17 times slower than fp32 ones
    (docs/results.md, "Operations a step launches"): there the operands are widened and the product
    rounded back to their dtype, which is what a half-precision product returns, up to the order of
    its fp32 sums."""
    if a.device.type == "cpu" and a.element_size() < 4 and not ops.bf16_dots_available():
        return head_matmul(a.float(), b.float()).to(a.dtype)
    return head_matmul(a, b)


def block_dots(q: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """`ann.block.row_dots` for the blocks' scores, q [..., G, D] . rows [..., N, D] -> [..., G, N], or
    . the rows ids [..., M] name -> [..., G, M]: bf16 ones on the CPU through `ops.query_dots`, which
    reads the rows where they lie and runs 2 to 4 times as fast as torch's product of these shapes
    (docs/results.md), else `block_matmul` (after `head_rows` gathers the rows ids name)."""
    if q.device.type == "cpu" and q.dtype == rows.dtype == torch.bfloat16 and ops.query_dots_native(rows):
        (G, D), N = q.shape[-2:], rows.shape[-2]
        flat_ids = None if ids is None else ids.reshape(-1, ids.shape[-1])
        out = ops.query_dots(q.reshape(-1, G, D), rows.reshape(-1, N, D), flat_ids)
        return out.view(*q.shape[:-2], G, out.shape[-1])
    return block_dots_torch(q, rows, ids)


def block_dots_torch(q: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """`block_dots` in torch: the rows ids name gathered (`head_rows`), then `block_matmul`."""
    return block_matmul(q, (rows if ids is None else head_rows(rows, ids)).transpose(-1, -2))


def block_sums(w: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The rows summed by weights, w [..., G, N] @ rows [..., N, D] -> [..., G, D] in the rows' dtype, or
    w [..., G, M] weighing the rows ids [..., M] name: the estimate's weighted mean values. bf16 ones on
    the CPU through `ops.weighted_rows` (the rows read where they lie), else `block_matmul`."""
    w = w.to(rows.dtype)
    if w.device.type == "cpu" and rows.dtype == torch.bfloat16 and ops.HAS_EXT:
        (G, M), (N, D) = w.shape[-2:], rows.shape[-2:]
        flat_ids = None if ids is None else ids.reshape(-1, M)
        out = ops.weighted_rows(w.reshape(-1, G, M), rows.reshape(-1, N, D), flat_ids)
        return out.view(*w.shape[:-2], G, D)
    return block_sums_torch(w, rows, ids)


def block_sums_torch(w: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """`block_sums` in torch: the rows ids name gathered (`head_rows`), then `block_matmul`."""
    return block_matmul(w.to(rows.dtype), rows if ids is None else head_rows(rows, ids))


def stacked_scores(summaries: list[BlockSummary], q: torch.Tensor, scale: float) -> BlockScores:
    """`BlockSummary.scores` of B sequences' summaries (one configuration, all scored in one or all
    in two levels: `BlockSummary.two_level`) in one set of products: q [B, Hkv, G, D] -> BlockScores
    with a leading [B]."""
    first = summaries[0]
    n_blocks = [s.n_blocks for s in summaries]
    mean_k = stack_rows([s.keys.landmarks[0] for s in summaries], n_blocks)  # [B, Hkv, >= nb, D]
    qs = (q * scale).to(mean_k.dtype)
    if not first.two_level():
        logits = masked(block_dots(qs, mean_k[:, :, : max(n_blocks)]).float(), n_blocks)
        peak = logits.amax(dim=-1) if logits.shape[-1] else logits.new_zeros(logits.shape[:-1])
        if min(n_blocks) == 0 < max(n_blocks):  # a sequence without a block among others: no logit, peak 0
            peak = peak.masked_fill(peak == float("-inf"), 0.0)
        return BlockScores(logits, peak, torch.exp(logits - peak.unsqueeze(-1)))
    B, H, G, _ = q.shape
    group, device = first.group, q.device
    n_super = [s.coarse_keys.n_blocks for s in summaries]
    coarse_k = stack_rows([s.coarse_keys.landmarks[0] for s in summaries], n_super)
    coarse = block_dots(qs, coarse_k[:, :, : max(n_super)]).float()  # [B, Hkv, G, n_super]
    coarse = masked(coarse, n_super)
    # ascending: the expanded blocks' rows are then gathered in memory order (several times faster on a CPU)
    best = torch.topk(group_block_scores(coarse), first.expand, dim=-1).indices.sort(dim=-1).values  # [B, Hkv, E]
    inside = (best.unsqueeze(-1) * group + arange_on(device, group)).flatten(-2)
    # the full blocks after the last whole superblock, a sequence's own first (block 0 after them); made
    # on the device, as a copy from host memory would wait there for every kernel queued before it
    after = [nb - ns * group for nb, ns in zip(n_blocks, n_super)]
    own = [torch.arange(ns * group, nb, device=device)[:, None] for ns, nb in zip(n_super, n_blocks)]
    after_ids = stack_rows(own, after)[..., 0]  # [B, the most after any superblock]
    fine = torch.cat([inside, after_ids.unsqueeze(1).expand(B, H, -1)], dim=-1)  # [B, Hkv, F] block ids
    logits = block_dots(qs, mean_k, fine).float()
    logits = masked(logits, [inside.shape[-1] + a for a in after])
    coarse.scatter_(-1, best.unsqueeze(-2).expand(-1, -1, G, -1), float("-inf"))  # expanded
    peak = torch.maximum(logits.amax(dim=-1), coarse.amax(dim=-1))
    rel = torch.exp(logits - peak.unsqueeze(-1))
    return BlockScores(logits, peak, rel, fine, torch.exp(coarse - peak.unsqueeze(-1)))


def stacked_estimate(
    summaries: list[BlockSummary], scores: BlockScores, read: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`BlockSummary.estimate` of B sequences' summaries at once, given their `stacked_scores` and
    read [B, Hkv, nb] (nb: the most blocks of any; 0 past a sequence's own) -> (o [B, Hkv, G, D],
    lse [B, Hkv, G]) fp32."""
    first = summaries[0]
    n_blocks = [s.n_blocks for s in summaries]
    values = stack_rows([s.values.landmarks[0] for s in summaries], n_blocks)  # [B, Hkv, >= nb, D]
    if scores.fine is None:
        mean_v, read_fine = values[:, :, : scores.rel.shape[-1]], read
    else:  # the expanded blocks' mean values, read where they lie
        mean_v, read_fine = values, read.gather(-1, scores.fine)
    left = (first.block_size - read_fine).clamp_min(0)  # a block read in full adds nothing
    w = scores.rel * left.unsqueeze(-2)  # [B, Hkv, G, F]
    total = w.sum(dim=-1)  # [B, Hkv, G]
    if scores.coarse_rel is not None:  # superblocks not expanded: their unread tokens, at their mean
        n_super = scores.coarse_rel.shape[-1]
        read_super = read[..., : n_super * first.group].unflatten(-1, (n_super, first.group)).sum(dim=-1)
        left = (first.group * first.block_size - read_super).clamp_min(0)
        w_super = scores.coarse_rel * left.unsqueeze(-2)  # 0 at the expanded ones
        total = total + w_super.sum(dim=-1)
    # weights that sum to 1 before the half-precision products: counts of unread tokens overflow fp16
    norm = total.clamp_min(1e-30).unsqueeze(-1)
    o = block_sums(w / norm, mean_v, scores.fine).float()
    if scores.coarse_rel is not None:
        coarse = [s.coarse_values for s in summaries]
        coarse_v = stack_rows([c.landmarks[0] for c in coarse], [c.n_blocks for c in coarse])
        o = o + block_sums(w_super / norm, coarse_v[:, :, :n_super])  # fp32 + half: fp32, converted exactly
    return o, scores.peak + total.log()
