"""Block landmark index (device side, torch, any device), batched over KV heads.

Keys are grouped in blocks of `block_size` consecutive tokens. Each full block
gets a landmark: its mean key (Landmark Attention / InfLLM representative), or
per-channel min and max (Quest's upper bound of q · k over the block). A step
scores every landmark of every KV head in one batched matmul and returns the
tokens of the best blocks plus the partial tail block, which has no landmark
yet and is always returned so recently added tokens are never invisible.

GQA: the G query heads of a group choose blocks jointly. Each head's block
scores are shifted by that head's best score, then the max over heads is
taken: a block is chosen when it is near the top for any head, and a head with
larger logits cannot crowd out the blocks another head needs.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ann.base import GrowableKeys, as_vectors, check_counts
from ann.selector import Selector

LANDMARKS = ("mean", "minmax")


def head_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., H, m, k] @ b [..., H, k, n] -> [..., H, m, n], also for operands whose heads lie apart
    in memory (views of buffers with spare capacity). On the CPU a batched product of such views
    falls off oneDNN's fast path: half-precision ones are packed first (a copy costs less than
    a product per head, which is slow in half precision too), fp32 ones go head by head; packed
    ones (e.g. gathered rows) take one batched product, as everywhere else (docs/method.md)."""
    if a.dim() > 3:  # sequences x heads: one batch of heads
        lead = a.shape[:-2]
        return head_matmul(a.flatten(0, -3), b.flatten(0, -3)).view(*lead, a.shape[-2], b.shape[-1])
    if a.device.type != "cpu" or (_packed(a) and _packed(b)):
        return torch.bmm(a, b)
    if a.element_size() < 4:
        return torch.bmm(_pack(a), _pack(b))
    out = torch.empty(a.shape[0], a.shape[1], b.shape[2], dtype=torch.promote_types(a.dtype, b.dtype))
    for h in range(a.shape[0]):
        torch.mm(a[h], b[h], out=out[h])
    return out


def row_dots(q: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """q [..., G, D] . rows [..., N, D] -> [..., G, N], or with ids [..., M] (-1 reads row 0) . the rows
    they name -> [..., G, M] (`head_rows`, `head_matmul`): how a `BlockIndex` scores its landmarks unless
    it is given another product."""
    return head_matmul(q, (rows if ids is None else head_rows(rows, ids)).transpose(-1, -2))


def _pack(t: torch.Tensor) -> torch.Tensor:
    """t [H, x, y] with its heads packed (`_packed`), keeping which of rows or columns is contiguous
    (a transposed operand stays one for the product)."""
    if _packed(t):
        return t
    if t.stride(1) == 1 and t.stride(2) != 1:  # columns contiguous: a transposed view of rows
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.contiguous()


def _packed(t: torch.Tensor) -> bool:
    """Whether the heads of t [H, x, y] follow one another with no gap (rows or columns contiguous)."""
    return t.stride(0) == t.shape[1] * t.shape[2] and 1 in (t.stride(1), t.stride(2))


def head_rows(buffer: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """buffer [..., N, D] (rows contiguous, e.g. a store with spare capacity), ids [..., M] row ids per
    head (-1 reads row 0), whose leading dims broadcast to the buffer's (one set of ids for both
    landmarks of minmax) -> [..., M, D]: whole rows copied in one operation, which on the CPU is far
    faster than a gather along the rows with an expanded index. The rows move as integers of the
    element's size: the same bits, and on the CPU a bf16 gather takes about 3x as long as an int16 one."""
    N, D = buffer.shape[-2:]
    lead = buffer.shape[:-2]
    heads = math.prod(lead)
    stride = max(N, 1)  # a stride of 0 is refused; with no rows there is nothing to read anyway
    first = arange_on(ids.device, 0, heads * stride, stride).view(*lead, 1)  # each head's first row
    flat = ids.clamp_min(0) + first
    bits = buffer.reshape(heads * N, D).view(_SAME_SIZE_INT[buffer.element_size()])
    return bits.index_select(0, flat.view(-1)).view(buffer.dtype).view(*flat.shape, D)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@functools.lru_cache(maxsize=64)
def arange_on(device: torch.device, *args: int) -> torch.Tensor:
    """torch.arange(*args) on `device`, made once and kept (never written to): every layer's
    decode step asks for the same few ranges, and on a GPU each one made is a kernel launched."""
    return torch.arange(*args, device=device)


def stack_rows(buffers: list[torch.Tensor], lengths: list[int], dim: int = 0) -> torch.Tensor:
    """Per sequence a buffer [..., capacity, D] whose first lengths[b] rows hold data -> the sequences'
    buffers stacked at `dim` (0: [B, ..., N, D]), N >= max(lengths), zero beyond each one's length (a
    product with them adds nothing, masked or weighted 0). One sequence's buffer is returned as it is,
    as a view (its spare rows are then N - lengths[0])."""
    if len(buffers) == 1:
        return buffers[0].unsqueeze(dim)
    first = buffers[0]
    if all(buffer.shape == first.shape and buffer.shape[-2] == n for buffer, n in zip(buffers, lengths)):
        return torch.stack(buffers, dim)  # no spare rows and no padding: one copy
    shape = list(first.shape)
    shape[-2] = max(lengths)
    shape.insert(dim, len(buffers))
    out = first.new_zeros(shape)
    for b, (buffer, n) in enumerate(zip(buffers, lengths)):
        out.select(dim, b)[..., :n, :] = buffer[..., :n, :]
    return out


def masked(scores: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """scores [B, ..., N] of B sequences' stacked rows -> -inf where a column lies past the
    sequence's length; as they are where no sequence has fewer than N."""
    if all(n >= scores.shape[-1] for n in lengths):
        return scores
    return scores.masked_fill(beyond(lengths, scores.shape[-1], scores.device, scores.dim()), float("-inf"))


def to_device(values, device: torch.device) -> torch.Tensor:
    """Host values (a list or an array) as a tensor on `device`. They reach a GPU from pinned memory,
    their copy queued behind the kernels before it: from pageable memory it would first wait for
    all of them, a sync in the middle of a step."""
    host = torch.as_tensor(values)
    if device.type == "cuda" and host.device.type == "cpu":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def beyond(lengths: list[int], n: int, device: torch.device, dims: int) -> torch.Tensor:
    """[B, 1, ..., 1, n] bool (`dims` dims): True where column j lies at or past lengths[b]."""
    lengths_on = to_device(lengths, device).view(-1, *([1] * (dims - 1)))
    return torch.arange(n, device=device) >= lengths_on


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k highest scores [..., n] along the last dim, best first, equal scores in index order:
    the first j of them are the j highest whatever k is, so a sequence chooses alike alone and in a batch
    that asks for more (exact ties are common: every head's best block scores 0 in `group_block_scores`).
    topk over int64 keys that order as the scores and then the indices do."""
    bits = scores.float().contiguous().view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # the floats' order, as signed ints
    last = torch.arange(scores.shape[-1] - 1, -1, -1, device=scores.device)  # the lower index ranks higher
    return torch.topk(ordered.to(torch.int64) * 2**32 + last, k, dim=-1).indices


def group_block_scores(s: torch.Tensor) -> torch.Tensor:
    """Per-head block scores [..., H, G, nb] -> the group's [..., H, nb]: each head's scores shifted
    by its best one, then the max over heads (see the module doc)."""
    return (s - s.amax(dim=-1, keepdim=True)).amax(dim=-2)


class BlockIndex:
    """Landmarks for H KV heads. keys [H, n, D] are appended; token ids are positions in append order."""

    def __init__(
        self,
        n_heads: int,
        dim: int,
        block_size: int = 16,
        landmark: str = "mean",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        capacity: int = 4096,
        dots=row_dots,
    ):
        if landmark not in LANDMARKS:
            raise ValueError(f"unknown landmark {landmark!r}; known: {', '.join(LANDMARKS)}")
        check_counts(positive={"n_heads": n_heads, "dim": dim, "block_size": block_size})
        self.n_heads, self.dim, self.block_size, self.landmark = n_heads, dim, block_size, landmark
        self.device, self.dtype = torch.device(device), dtype
        self.dots = dots  # `row_dots` or a product of the same signature (e.g. one faster on the CPU at hand)
        n_lm = 2 if landmark == "minmax" else 1
        # the landmarks [1|2, H, blocks, D] lie packed at the front of an allocation for `capacity` tokens
        size = n_lm * n_heads * max(1, capacity // block_size) * dim
        self._store = torch.empty(size, device=self.device, dtype=dtype)
        self._lm = self._store[:0].view(n_lm, n_heads, 0, dim)
        self._tail = torch.empty(n_heads, block_size, dim, device=self.device, dtype=dtype)  # [H, B, D]
        self.n = 0
        self.scanned = 0  # landmarks scored by the last select (all heads and query heads)

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        return self._store.nbytes + self._tail.nbytes

    @property
    def n_blocks(self) -> int:
        """Full blocks (with a landmark)."""
        return self.n // self.block_size

    @property
    def landmarks(self) -> torch.Tensor:
        """[1|2, H, n_blocks, D]: the mean per full block, or its min and max, packed (`_grow`)."""
        return self._lm

    def rows(self, blocks: torch.Tensor) -> torch.Tensor:
        """The (first) landmarks of blocks [H, M] (each head its own) -> [H, M, D]."""
        return head_rows(self._lm[0], blocks)

    def add(self, keys: torch.Tensor) -> None:
        """keys [H, n, D]: append n tokens per head; blocks that fill up get landmarks."""
        if keys.dim() != 3 or keys.shape[0] != self.n_heads or keys.shape[2] != self.dim:
            raise ValueError(f"keys must have shape [{self.n_heads}, n, {self.dim}], got {list(keys.shape)}")
        if not keys.is_floating_point():
            raise TypeError(f"keys must be floating point, got {keys.dtype}")
        keys = keys.to(self.device, self.dtype)
        b = self.block_size
        filled = self.n % b
        if filled + keys.shape[1] < b:  # the block still filling takes them all (a decode step's token)
            self._tail[:, filled : filled + keys.shape[1]] = keys
            self.n += keys.shape[1]
            return
        # tail tokens and new ones, laid out as whole blocks plus a new tail
        seq = torch.cat([self._tail[:, :filled], keys], dim=1)  # [H, filled+n, D]
        full = seq.shape[1] // b
        if full:
            blocks = seq[:, : full * b].reshape(self.n_heads, full, b, self.dim)  # [H, full, B, D]
            self._grow(full)
            lo = self.n_blocks
            if self.landmark == "mean":
                self._lm[0, :, lo : lo + full] = blocks.mean(dim=2)
            else:
                self._lm[0, :, lo : lo + full] = blocks.amin(dim=2)
                self._lm[1, :, lo : lo + full] = blocks.amax(dim=2)
        rest = seq.shape[1] - full * b
        self._tail[:, :rest] = seq[:, full * b :]
        self.n += keys.shape[1]

    def mark(self) -> tuple[int, torch.Tensor]:
        """What `rewind` needs to take the index back to the tokens it holds now: their count and the
        block still filling (the full blocks' landmarks do not change as tokens are appended)."""
        return self.n, self._tail[:, : self.n % self.block_size].clone()

    def rewind(self, mark: tuple[int, torch.Tensor]) -> None:
        """Back to the tokens it held at `mark` (taken from this index, which has only grown since)."""
        n, tail = mark
        if n > self.n:
            raise ValueError(f"an index of {self.n} tokens cannot go back to {n}: it has never held them")
        nb = n // self.block_size
        kept = self._lm[:, :, :nb].clone()  # repacked: the heads' stride is the block count (`_grow`)
        n_lm, H, _, D = self._lm.shape
        self._lm = self._store[: n_lm * H * nb * D].view(n_lm, H, nb, D)
        self._lm.copy_(kept)
        self._tail[:, : tail.shape[1]] = tail
        self.n = n

    def state(self) -> dict[str, torch.Tensor]:
        """Its landmarks, the block still filling and the token count, as tensors: what `load_state`
        takes (engine.prefix_file keeps a prefix's indexes in a file this way)."""
        return {"landmarks": self._lm, "tail": self._tail[:, : self.n % self.block_size], "n": torch.tensor([self.n])}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """This empty index given the tokens of `state()`, taken of an index of the same heads, dim, block
        size and landmark (on any device)."""
        if self.n:
            raise ValueError(f"a state is loaded into an empty index, not one of {self.n} tokens")
        n = int(state["n"][0])
        lm, tail = state["landmarks"], state["tail"]
        n_lm = self._lm.shape[0]
        want = ((n_lm, self.n_heads, n // self.block_size, self.dim), (self.n_heads, n % self.block_size, self.dim))
        if (tuple(lm.shape), tuple(tail.shape)) != want or n < 0:
            raise ValueError(f"a block index of {n} tokens takes landmarks and tail of shapes {want}")
        self._grow(want[0][2])
        self._lm.copy_(lm)
        self._tail[:, : tail.shape[1]] = tail
        self.n = n

    def _grow(self, full: int) -> None:
        """Room for `full` more blocks. The landmarks stay packed, with no spare rows between the heads:
        on the CPU a product over a view with spare rows falls off oneDNN's fast path and would be
        packed at every step (`head_matmul`), where this lays them out anew once a block (every
        block_size decode steps), within the same allocation while its capacity lasts."""
        n_lm, H, nb, D = self._lm.shape
        size = n_lm * H * (nb + full) * D
        store = self._store
        if size > store.numel():
            store = store.new_empty(max(size, 2 * store.numel()))
        lm = store[:size].view(n_lm, H, nb + full, D)
        lm[:, :, :nb] = self._lm if store is not self._store else self._lm.clone()  # moved within: through a copy
        self._store, self._lm = store, lm

    def block_scores(self, q: torch.Tensor, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """q [H, G, D] -> group block scores [H, n_blocks] (see module doc for the GQA rule), or
        [H, F] of the blocks `blocks` [H, F] only (each head its own)."""
        blocks = None if blocks is None else blocks[None]
        return stacked_block_scores([self], q[None], blocks, None if blocks is None else [blocks.shape[2]])[0]

    def select(
        self, q: torch.Tensor, n_blocks: int, scores: torch.Tensor | None = None, scored: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q [H, G, D] -> token ids [H, M] int64 on the index's device, M = min(n_blocks, full blocks)·B + tail.

        The tokens of the n_blocks best blocks per KV head (`choose`), then the tail
        tokens. Every head holds the same number of tokens, so every row has
        the same M and needs no -1 padding; ids within a row are distinct."""
        b = self.block_size
        best = self.choose(q, n_blocks, scores, scored)  # [H, take]
        tail = torch.arange(self.n_blocks * b, self.n, device=self.device).expand(self.n_heads, -1)  # [H, tail]
        tok = (best.unsqueeze(2) * b + torch.arange(b, device=self.device)).reshape(self.n_heads, -1)
        return torch.cat([tok, tail], dim=1)

    def choose(
        self, q: torch.Tensor, n_blocks: int, scores: torch.Tensor | None = None, scored: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q [H, G, D] -> the n_blocks best full blocks per KV head [H, min(n_blocks, full blocks)], on the
        index's device, best first. `scores` [H, G, n_blocks], each head's q . landmark times any positive
        scale, may be passed when the caller has computed them already (mean landmarks only), or scores
        [H, G, F] of the blocks `scored` [H, F] only; with `scored` alone, only those blocks are scored (the
        others are not chosen either way). Sets `scanned` to the landmarks scored (H · G · blocks scored)."""
        if q.dim() != 3 or q.shape[0] != self.n_heads or q.shape[2] != self.dim:
            raise ValueError(f"q must have shape [{self.n_heads}, G, {self.dim}], got {list(q.shape)}")
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        scores = None if scores is None else scores[None]
        n_scored = None if scored is None else [scored.shape[1]]
        scored = None if scored is None else scored[None]
        return choose_blocks([self], q[None], [n_blocks], scores, scored, n_scored)[0]


def stacked_block_scores(
    indexes: list[BlockIndex], q: torch.Tensor, blocks: torch.Tensor | None = None, n_blocks: list[int] | None = None
) -> torch.Tensor:
    """`BlockIndex.block_scores` of B sequences' indexes (one configuration) in one set of products:
    q [B, H, G, D] -> [B, H, nb] (-inf past a sequence's blocks), or [B, H, F] of the blocks `blocks`
    [B, H, F] only, the first n_blocks[b] of them a sequence's own (-inf after them)."""
    first = indexes[0]
    q = q.to(first.device, first.dtype)
    lengths = [index.n_blocks for index in indexes]
    landmarks = stack_rows([index.landmarks for index in indexes], lengths, dim=1)  # [1|2, B, H, >= nb, D]
    if blocks is None:
        rows, ids = landmarks[..., : max(lengths), :], None
    else:  # the product reads the blocks' rows where they lie
        rows, ids, lengths = landmarks, blocks.to(first.device), n_blocks
    if first.landmark == "mean":
        s = first.dots(q, rows[0], ids)  # [B, H, G, nb | F]
    else:  # Quest: sum_d max(q_d * min_d, q_d * max_d) bounds q · k for every k in the block;
        # as min <= max it is q+ · max + q- · min: two products, no [H, G, nb, D] temporary
        s = first.dots(q.clamp_min(0), rows[1], ids) + first.dots(q.clamp_max(0), rows[0], ids)
    return group_block_scores(masked(s, lengths))


def choose_blocks(
    indexes: list[BlockIndex],
    q: torch.Tensor,
    counts: list[int],
    scores: torch.Tensor | None = None,
    scored: torch.Tensor | None = None,
    n_scored: list[int] | None = None,
) -> torch.Tensor:
    """`BlockIndex.choose` of B sequences' indexes (one configuration) at once: q [B, H, G, D], up to
    counts[b] blocks for sequence b, `scores` [B, H, G, F] (-inf past a sequence's blocks) or `scored`
    [B, H, F] (the first n_scored[b] a sequence's own) as `choose` takes them -> [B, H, T] best first,
    -1 after a sequence's own min(counts[b], blocks) blocks. Sets each index's `scanned`."""
    first, (B, H, G, _) = indexes[0], q.shape
    available = [index.n_blocks for index in indexes] if scored is None else n_scored
    take = [min(n, a) for n, a in zip(counts, available)]
    for index, a in zip(indexes, available):
        index.scanned = H * G * a
    if max(take) == 0:
        return torch.empty(B, H, 0, dtype=torch.int64, device=first.device)
    if scores is None:
        group = stacked_block_scores(indexes, q, scored, n_scored)
    else:
        group = group_block_scores(scores.to(first.device))
    best = top_indices(group, max(take))  # [B, H, T]
    best = best if scored is None else scored.to(first.device).gather(-1, best)
    if min(take) < max(take):
        best = best.masked_fill(beyond(take, max(take), best.device, 3), -1)
    return best


class BlockKeyIndex(Selector):
    """One KV head's block index behind the `KeyIndex` protocol (numpy in and out, CPU torch inside).

    The selected blocks' tokens are reranked exactly against the keys, so the
    result is a top-k. `n_blocks` is the blocks selected per search, or, when
    `frac` is given, that fraction of the full blocks (at least one)."""

    def __init__(
        self,
        dim: int,
        block_size: int = 16,
        landmark: str = "mean",
        n_blocks: int = 64,
        frac: float | None = None,
        store=None,
    ):
        check_counts(positive={"n_blocks": n_blocks})
        share = isinstance(frac, (int, float, np.integer, np.floating)) and not isinstance(frac, bool)
        if frac is not None and not (share and 0 < frac <= 1):
            raise ValueError(f"frac must be a share in (0, 1], got {frac!r}")
        self.dim, self.n_blocks, self.frac = dim, n_blocks, frac
        self.blocks = BlockIndex(1, dim, block_size=block_size, landmark=landmark)
        self.store = store if store is not None else GrowableKeys(dim)
        self._owns_store = store is None

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes + (self.store.nbytes if self._owns_store else 0)

    @staticmethod
    def estimate_bytes(n_keys: int, dim: int, n_queries: int = 0, landmark: str = "mean", store=None, **params) -> int:
        own_keys = 0 if store is not None else 4 * n_keys * dim
        return 4 * dim * (n_keys // params.get("block_size", 16)) * (2 if landmark == "minmax" else 1) + own_keys

    def build(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        """keys [N, dim]; queries ignored."""
        keys = as_vectors(keys, self.dim, "keys")
        self.blocks = BlockIndex(1, self.dim, self.blocks.block_size, self.blocks.landmark, capacity=len(keys) + 16)
        if self._owns_store:
            self.store.reset(keys)
        self.blocks.add(torch.from_numpy(keys)[None])

    def add(self, keys: np.ndarray) -> None:
        keys = as_vectors(keys, self.dim, "keys")
        if self._owns_store:
            self.store.append(keys)
        self.blocks.add(torch.from_numpy(keys)[None])

    def blocks_per_search(self) -> int:
        if self.frac is None:
            return self.n_blocks
        return max(1, round(self.frac * self.blocks.n_blocks))

    def candidates(self, q: np.ndarray, k: int = 0) -> tuple[np.ndarray, int, int]:
        """q [G, dim] (one group, chosen jointly) -> candidate ids [C] int64, landmarks scored, 0 keys."""
        ids = self.blocks.select(torch.from_numpy(q)[None], self.blocks_per_search())[0]
        return ids.numpy(), self.blocks.scanned, 0
