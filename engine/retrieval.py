"""Which host tokens a decode step reads: candidates from the host key index, the
device block index, or both (OffloadConfig.mode), deduplicated per KV head; with an
adaptive budget only those the key sketch rates likely (engine.sketch); and the
building of the host key index itself."""

from __future__ import annotations

import functools
import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.sketch import make_scorer

log = logging.getLogger(__name__)

OVERSAMPLE = 8  # proposals looked at per host token a step may take
# ... when the key sketch ranks the candidates afterwards (an adaptive budget): measured on the
# bundled model, half as many proposals lose little (attention error 0.036 against 0.034, at
# 4.5% against 4.8% of host tokens read) and halve the cost of finding the distinct ones
SKETCHED_OVERSAMPLE = 4


class BuildProgress:
    """One progress bar over the layers whose host index is being built."""

    def __init__(self, n_layers: int, *, enabled: bool = True):
        self.n_layers, self.enabled = n_layers, enabled
        self.bar = None
        self.seconds = 0.0

    def done(self, seconds: float) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=self.n_layers, desc="building host key index", unit="layer", leave=False, disable=not self.enabled
            )
        self.seconds += seconds
        self.bar.update(1)
        if self.bar.n >= self.n_layers:
            self.bar.close()
            log.info("host key indexes built in %.1f s", self.seconds)
            self.bar = None


class HeadIndexes:
    """One `ann` key index per KV head in host memory, searched head by head."""

    def __init__(self, method: str, n_heads: int, dim: int, params: dict):
        from ann import make_index

        self.indexes = [make_index(method, dim, **params) for _ in range(n_heads)]

    def build(self, keys: torch.Tensor, queries: torch.Tensor | None) -> None:
        """keys [H, N, D], queries [H, Nq, D] (or None), on the CPU."""
        for h, index in enumerate(self.indexes):
            index.build(keys[h].float().numpy(), None if queries is None else queries[h].float().numpy())

    def add(self, keys: torch.Tensor) -> None:
        for h, index in enumerate(self.indexes):
            index.add(keys[h].float().numpy())

    def candidates(
        self, q: torch.Tensor, q_host: np.ndarray, top_k: int, oversample: int = OVERSAMPLE
    ) -> tuple[torch.Tensor, int, int]:
        """Host ids [H, M] (-1 padded) for the query groups q_host [H, G, D]; vectors and keys scored.
        (`oversample` concerns selectors over proposals; a plain index returns its top-k.)"""
        rows, vectors, keys = [], 0, 0
        for h, index in enumerate(self.indexes):
            ids, v, k = host_candidates(index, q_host[h], top_k)
            rows.append(ids)
            vectors += v
            keys += k
        return torch.from_numpy(_pad(rows)), vectors, keys

    def nbytes(self) -> tuple[int, int]:
        """(device bytes, host bytes)"""
        return 0, sum(index.nbytes for index in self.indexes)


class ListSelector:
    """Query->query lists of all KV heads (`ann.qq.QueryLists`), searched in one
    batched step on the device; proposals budgeted to top_k per query head."""

    def __init__(self, n_heads: int, dim: int, device, dtype, params: dict):
        from ann.qq import QueryLists

        self.lists = QueryLists(n_heads, dim, device=device, dtype=dtype, **params)

    def build(self, keys: torch.Tensor, queries: torch.Tensor | None) -> None:
        if queries is None:
            raise ValueError("method 'qq' builds from prefill queries: prefill through the model first")
        self.lists.build(keys, queries)

    def add(self, keys: torch.Tensor) -> None:
        self.lists.add(keys)

    def candidates(
        self, q: torch.Tensor, q_host: np.ndarray, top_k: int, oversample: int = OVERSAMPLE
    ) -> tuple[torch.Tensor, int, int]:
        limit = q.shape[1] * top_k
        # only the first oversample * limit proposals are looked at: merge no more lists than fill them
        n_lists = -(-oversample * top_k // self.lists.m_keys)  # per query head
        proposals = self.lists.candidates(q, min(n_lists, self.lists.n_neighbors))  # [H, C]
        return first_distinct_rows(proposals, limit, oversample), self.lists.scanned, 0

    def nbytes(self) -> tuple[int, int]:
        device = self.lists.queries.nbytes
        return device, self.lists.nbytes - device

    def __len__(self) -> int:
        return len(self.lists)


def build_key_index(layer) -> bool:
    """Build the layer's host key index from its host keys and the sampled queries of
    each head's query group (the attention-aware indexes use those). A host store of
    less than a block is left unindexed (those tokens are read at every step) and the
    build waits, collecting decode queries, until it holds one: a short prompt starts
    offloading during decode. Returns whether the index was built."""
    cfg = layer.cfg
    if layer.host.n < cfg.block_size:
        if layer.progress is not None and not layer.build_waiting:
            layer.progress.done(0.0)  # counted now; the build itself is a block of keys, later
        layer.build_waiting = True
        return False
    t0 = time.perf_counter()
    layer.wait_for_host_store()
    Hkv, D = layer.n_kv_heads, layer.head_dim
    queries = None
    if len(layer.query_sample):
        queries = layer.query_sample.queries().reshape(Hkv, -1, D)  # [Hkv, G * nq, D]: a group's heads stacked
    if cfg.method == "qq":
        index = ListSelector(Hkv, D, layer.device, layer.dtype, cfg.index_params)
        keys = layer.host.keys.to(layer.device)  # exact top-M lists: one batched product per query chunk
    else:
        index = HeadIndexes(cfg.method, Hkv, D, cfg.index_params)
        keys = layer.host.keys
    index.build(keys, queries)
    if cfg.budget == "adaptive":
        layer.sketch = make_scorer(cfg.sketch_rank, layer.host, cfg.host_threads)
        layer.sketch.build(keys, queries)  # on the device when the keys went there for the lists
    layer.key_index = index
    layer.n_indexed = layer.n_built = layer.host.n
    layer.query_sample.clear()
    if layer.progress is not None and not layer.build_waiting:
        layer.progress.done(time.perf_counter() - t0)
    return True


def select_host_ids(
    layer, q: torch.Tensor, q_host: np.ndarray, scale: float, lse_resident: torch.Tensor, blocks=None
) -> torch.Tensor:
    """Host ids [Hkv, M] int64 on the CPU (-1 padded, unique per row) for the decode
    queries q [Hkv, G, D] (device) / q_host [Hkv * G, D] (float32).

    A fixed budget reads every candidate (`candidates`); an adaptive one reads those
    the key sketch rates likely (`read_likely`), given the resident tokens'
    log-sum-exp lse_resident [Hkv, G] and the step's block scores
    (engine.estimate.BlockScores, None without a summary). The newest host tokens,
    which no index or summary covers yet, are always read. Sets the selection
    counters of layer.stats."""
    cfg = layer.cfg
    found = candidates(layer, q, q_host, blocks)
    sketched = 0
    if found is not None and cfg.budget == "adaptive" and layer.sketch is not None:
        q_groups = torch.from_numpy(q_host).view(layer.n_kv_heads, layer.group, -1)
        found, sketched, lse = read_likely(layer, found, q_groups, scale, lse_resident, blocks)
        if cfg.neighbours:  # a needle's digits, a phrase: the indexes propose a run of heavy tokens only in part
            near = neighbours(found, cfg.neighbours, layer.host.n)
            more, rated, _ = read_likely(layer, near, q_groups, scale, lse_resident, blocks, lse)
            found, sketched = torch.cat([found, more], dim=1), sketched + rated
    layer.stats.sketched = sketched
    parts = [] if found is None else [found]
    parts.append(torch.from_numpy(always_read(layer)).expand(layer.n_kv_heads, -1))
    return unique_rows(torch.cat(parts, dim=1))


def candidates(layer, q: torch.Tensor, q_host: np.ndarray, blocks=None) -> torch.Tensor | None:
    """The step's candidate host ids [Hkv, C] (-1 padded, unique per row; None: no source):
    the block index's blocks and/or the key index's proposals (OffloadConfig.mode), and
    with an adaptive budget the keys added after the key index's build (the lists take
    in few of them). Sets layer.stats' scanned and keys_scored."""
    cfg = layer.cfg
    parts, scanned, keys_scored = [], 0, 0
    if layer.blocks is not None:
        n = cfg.blocks_per_step(layer.blocks.n_blocks)
        scored = None if blocks is None else blocks.fine  # two levels: the blocks the summary expanded
        scores = blocks.logits if blocks is not None and layer.blocks is layer.summary.keys else None  # computed
        if scored is not None and n > scored.shape[1]:  # more blocks than were scored: score them all
            scores, scored = None, None
        parts.append(layer.blocks.select(q, n, scores, scored).cpu())
        scanned += layer.blocks.scanned
    if cfg.uses_key_index:
        if layer.key_index is None:
            build_key_index(layer)
        if layer.n_indexed:
            adaptive = cfg.budget == "adaptive"
            ids, vectors, keys = layer.key_index.candidates(
                q,
                q_host.reshape(layer.n_kv_heads, layer.group, -1),
                cfg.candidates if adaptive else cfg.top_k,
                SKETCHED_OVERSAMPLE if adaptive else OVERSAMPLE,
            )
            parts.append(ids)
            scanned += vectors
            keys_scored += keys
            if adaptive and cfg.recent:
                recent = torch.arange(max(layer.n_built, layer.n_indexed - cfg.recent), layer.n_indexed)
                parts.append(recent.expand(layer.n_kv_heads, -1))
    layer.stats.scanned, layer.stats.keys_scored = scanned, keys_scored
    return unique_rows(torch.cat(parts, dim=1)) if parts else None


def always_read(layer) -> np.ndarray:
    """Host ids [n] every step reads: the newest tokens, not yet in the key index, and
    (with an estimate) those of the block still filling, which has no summary yet."""
    start = layer.n_indexed if layer.cfg.uses_key_index else layer.host.n
    if layer.summary is not None:
        start = min(start, layer.summary.n_blocks * layer.cfg.block_size)
    return np.arange(start, layer.host.n)


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
        lse = torch.logaddexp(lse_resident.float(), layer.summary.log_mass(blocks)).cpu()
    elif lse is None:
        lse = torch.logaddexp(lse_resident.float().cpu(), torch.logsumexp(s, dim=-1))
    p = torch.exp(s - lse.unsqueeze(-1)).mean(dim=1)  # [Hkv, C]
    keep = (sketchable >= 0) & (p >= read_threshold(layer.cfg, layer.n_seen))
    return torch.where(keep, candidates, -1), int((sketchable >= 0).sum()), lse


def neighbours(ids: torch.Tensor, r: int, n: int) -> torch.Tensor:
    """ids [H, M] (-1 padded) -> [H, M'] per row the host ids in [0, n) within r positions of one
    of its ids and not among them, ascending, -1 padded."""
    offsets = torch.tensor([d for d in range(-r, r + 1) if d])
    near = ids.unsqueeze(-1) + offsets  # [H, M, 2r]
    near = torch.where((ids >= 0).unsqueeze(-1) & (near >= 0) & (near < n), near, -1).flatten(1)
    rows = torch.arange(ids.shape[0]).unsqueeze(1)
    taken = torch.isin(rows * n + near, (rows * n + ids)[ids >= 0])  # the row's own ids are read already
    return unique_rows(torch.where(taken, -1, near))


def read_threshold(cfg, n_tokens: int) -> float:
    """The estimated attention probability a candidate needs to be read among n_tokens:
    cfg.min_prob, and at short contexts cfg.min_ratio times the uniform share, since a
    token no likelier than the average is what its block's estimate already stands for."""
    return max(cfg.min_prob, cfg.min_ratio / max(1, n_tokens))


def host_candidates(index, q: np.ndarray, k: int) -> tuple[np.ndarray, int, int]:
    """Host tokens for one KV head's query group q [G, D]: at most G * k ids, the
    vectors the index scored, and how many of those were keys.

    A selector's proposals (in its order of preference, first G * k distinct
    ones) go to the gather-attend as they are: it scores every gathered key
    exactly anyway, so a separate rerank would only read those keys twice.
    A plain index gives each query head its own top-k."""
    if len(index) == 0:
        return np.empty(0, np.int64), 0, 0
    k = min(k, len(index))
    if hasattr(index, "candidates"):
        cand, vectors, keys = index.candidates(q, k)
        return first_distinct(cand, len(q) * k), vectors + keys, keys
    res = index.search(q, k)
    return res.ids.reshape(-1), res.scanned, res.keys_scored


def first_distinct(ids: np.ndarray, limit: int) -> np.ndarray:
    """The first `limit` distinct non-negative ids of `ids`, in order of first appearance."""
    ids = ids[ids >= 0]
    n = min(len(ids), 2 * limit)
    while True:  # the answer lies in a short prefix: deduplicate only that much
        uniq, first = np.unique(ids[:n], return_index=True)
        if len(uniq) >= limit or n == len(ids):
            return uniq[np.argsort(first, kind="stable")[:limit]]
        n = min(len(ids), 4 * n)


def first_distinct_rows(ids: torch.Tensor, limit: int, oversample: int = OVERSAMPLE) -> torch.Tensor:
    """ids [H, C] -> [H, <= limit]: in each row the first `limit` distinct non-negative
    ids among its first oversample * limit entries (earlier entries are preferred),
    in ascending order, -1 padded. Proposals overlap, but not that much in practice;
    looking no further bounds the work."""
    return distinct_rows(ids[:, : oversample * limit], limit)


def unique_rows(ids: torch.Tensor) -> torch.Tensor:
    """ids [H, M] -> [H, M'] the distinct non-negative ids of each row in ascending order,
    -1 after them, M' the longest row's count (sorted ids make the kernel's gather walk
    memory in order; dropping the padding keeps later per-candidate work proportional to
    the candidates, not to the proposals they were chosen from)."""
    return distinct_rows(ids, ids.shape[1])


def distinct_rows(ids: torch.Tensor, limit: int) -> torch.Tensor:
    """ids [H, C] (CPU, -1 = none) -> [H, M'] each row's first `limit` distinct ids in
    ascending order, -1 after them, M' the most any row keeps. numba's linear pass
    (ann._kernels.distinct_rows) where it is installed, else sorts in torch."""
    if ids.shape[1] == 0 or limit == 0:
        return ids.new_full((ids.shape[0], 0), -1, dtype=torch.int64)
    kernel = _distinct_kernel()
    if kernel is None:
        return _distinct_rows_torch(ids, limit)
    ids = ids.to(torch.int64).contiguous()
    out, width = kernel(ids.numpy(), limit, max(int(ids.max()) + 1, 1))  # marks for the ids present only
    return torch.from_numpy(np.ascontiguousarray(out[:, :width]))


@functools.cache
def _distinct_kernel():
    """numba's `distinct_rows`, or None without numba (the `ann` extra; the block index alone
    needs only torch). Looked up once: a failed import would be retried at every step."""
    try:
        from ann._kernels import distinct_rows
    except ImportError:
        return None
    return distinct_rows


def _distinct_rows_torch(ids: torch.Tensor, limit: int) -> torch.Tensor:
    """`distinct_rows` with torch's sort: one stable sort finds each id's first appearance."""
    sorted_ids, order = ids.sort(dim=1, stable=True)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    first &= sorted_ids >= 0
    keep = torch.zeros_like(first).scatter_(1, order, first)  # back in the original order
    keep &= keep.cumsum(dim=1) <= limit
    return compact_rows(sorted_ids, keep.gather(1, order))


def compact_rows(ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """ids [H, M] and keep [H, M] -> [H, M'] each row's kept ids in their order, -1 after
    them, M' the most any row keeps (a scatter, not a sort)."""
    kept = keep.sum(dim=1)
    width = int(kept.max()) if ids.numel() else 0
    out = torch.full((ids.shape[0], width + 1), -1, dtype=ids.dtype)  # column `width`: the dropped
    slot = torch.where(keep, keep.cumsum(dim=1) - 1, width)
    return out.scatter_(1, slot, torch.where(keep, ids, -1))[:, :width]


def _pad(rows: list[np.ndarray]) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows)), -1, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
