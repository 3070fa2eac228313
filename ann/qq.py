"""Query->query selector: decode queries look like prefill queries, not like keys.

Build keeps, for each build query (a prefill query of the group's heads), its
exact top-M keys. A decode query finds its nearest build queries by cosine
(an in-distribution search, done exactly with one matrix product) and proposes
the union of their key lists. Keys added after build enter the lists of the
build queries that point their way, replacing each list's weakest entry.

`QueryLists` holds this for H KV heads at once in torch, on any device, so the
engine runs one batched step per layer (like `ann.block.BlockIndex`);
`QQIndex` is one head of it behind the `KeyIndex` protocol.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from ann.base import GrowableKeys, as_vectors, check_counts
from ann.block import beyond, masked, stack_rows
from ann.selector import Selector


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


SCORE_BUFFER = 1 << 26  # scores (fp32) a build holds at once: 256 MiB
# On the CPU, the scores of a query chunk are ranked right after the product: 2 MiB of them stay in
# the cache for `top_rows`, where a buffer of 256 MiB goes through memory twice (about 2x the time at 8K keys)
CPU_SCORE_CHUNK = 1 << 19
# ... but a product reads every key, and with fewer query rows than this the keys' reads set its
# time: at 131K keys 8 rows a product took 0.66 ms per query, 128 rows 0.30 (within SCORE_BUFFER)
CPU_PRODUCT_ROWS = 128
# numba's fallback thread pool (workqueue) aborts the process if two threads enter it at once
_PARALLEL_KERNEL = threading.Lock()


def topk_keys(queries: torch.Tensor, keys: torch.Tensor, m: int, chunk: int | None = None):
    """Exact top-m keys per query, per head: queries [H, Nq, D], keys [H, N, D] ->
    (scores [H, Nq, m] fp32, ids [H, Nq, m] int64), best first. In query chunks,
    so the score buffer stays within SCORE_BUFFER (at 128K keys and 8 heads, 64
    queries at a time). On the CPU the product runs head by head, in chunks of
    CPU_SCORE_CHUNK scores or CPU_PRODUCT_ROWS queries, whichever is more (within
    SCORE_BUFFER), and the rows' top-m come from `ann._kernels.top_rows`
    (torch.topk and faiss's heap cost as much as the product again there);
    elsewhere one batched product and torch.topk."""
    keys_t = keys.float().transpose(1, 2)  # [H, D, N], converted once
    if queries.device.type == "cpu":
        return _topk_keys_cpu(queries.float(), keys_t, m, chunk or cpu_query_rows(keys.shape[1]))
    chunk = chunk or max(1, min(1024, SCORE_BUFFER // max(1, keys.shape[0] * keys.shape[1])))
    scores, ids = [], []
    for s in range(0, queries.shape[1], chunk):
        sim = torch.bmm(queries[:, s : s + chunk].float(), keys_t)
        top = torch.topk(sim, m, dim=2)
        scores.append(top.values)
        ids.append(top.indices)
    return torch.cat(scores, 1), torch.cat(ids, 1)


def cpu_query_rows(n_keys: int) -> int:
    """Build queries per product on the CPU against n_keys keys: CPU_SCORE_CHUNK scores or
    CPU_PRODUCT_ROWS queries, whichever is more, within SCORE_BUFFER; at least 8 (for the threads)."""
    n = max(1, n_keys)
    return max(8, CPU_SCORE_CHUNK // n, min(CPU_PRODUCT_ROWS, SCORE_BUFFER // n))


def _topk_keys_cpu(queries: torch.Tensor, keys_t: torch.Tensor, m: int, chunk: int):
    import numba

    from ann._kernels import top_rows

    threads = torch.get_num_threads()
    H, n_q = queries.shape[:2]
    scores = torch.empty(H, n_q, m)
    ids = torch.empty(H, n_q, m, dtype=torch.int64)
    for h in range(H):
        for s in range(0, n_q, chunk):
            sim = torch.mm(queries[h, s : s + chunk], keys_t[h])
            with _PARALLEL_KERNEL:
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # torch's setting rules
                try:
                    top_rows(sim.numpy(), m, scores[h, s : s + chunk].numpy(), ids[h, s : s + chunk].numpy())
                finally:  # numba's OpenMP pool resets the process's OpenMP thread count, torch's included
                    torch.set_num_threads(threads)
    return scores, ids


class QueryLists:
    """Query->query lists of H KV heads.

    m_keys: keys kept per build query; n_neighbors: build queries whose lists a
    query head proposes; max_queries: build queries kept per head (evenly
    strided); n_add: build queries (nearest by direction) an added key may enter.
    Build queries live on `device` (a search is one batched product there);
    the lists live in host memory, where the proposals are used.
    """

    def __init__(
        self,
        n_heads: int,
        dim: int,
        m_keys: int = 64,
        n_neighbors: int = 32,
        max_queries: int = 32768,
        n_add: int = 16,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        check_counts(
            positive={"m_keys": m_keys, "n_neighbors": n_neighbors, "max_queries": max_queries},
            non_negative={"n_add": n_add},
        )
        self.n_heads, self.dim, self.m_keys, self.n_neighbors = n_heads, dim, m_keys, n_neighbors
        self.max_queries, self.n_add = max_queries, n_add
        self.device, self.dtype = torch.device(device), dtype
        self.queries = torch.empty(n_heads, 0, dim, device=self.device, dtype=dtype)  # [H, Nq, D] unit rows
        self.lists = torch.empty(n_heads, 0, m_keys, dtype=torch.int32)  # [H, Nq, M] key ids, best first
        self.list_scores = torch.empty(n_heads, 0, m_keys)  # [H, Nq, M] their logits (raw q . k)
        self.raw = torch.empty(n_heads, 0, dim)  # [H, Nq, D] build queries, for the logits of added keys
        self.n_keys = 0
        self.scanned = 0  # build queries scored by the last candidates() call

    def __len__(self) -> int:
        return self.n_keys

    @property
    def n_queries(self) -> int:
        return self.queries.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.queries, self.lists, self.list_scores, self.raw))

    @staticmethod
    def estimate_bytes(
        n_heads: int,
        n_keys: int,
        dim: int,
        n_queries: int,
        m_keys: int = 64,
        max_queries: int = 32768,
        query_bytes: int = 4,
    ) -> tuple[int, int]:
        """(device bytes, host bytes) for n_queries build queries per head."""
        nq = min(n_queries, max_queries)
        return n_heads * nq * dim * query_bytes, n_heads * nq * (8 * m_keys + 4 * dim)

    def build(self, keys: torch.Tensor, queries: torch.Tensor) -> None:
        """keys [H, N, D] and build queries [H, Nq, D] (the group's query heads, stacked)."""
        if keys.dim() != 3 or keys.shape[0] != self.n_heads or keys.shape[2] != self.dim:
            raise ValueError(f"keys must have shape [{self.n_heads}, N, {self.dim}], got {list(keys.shape)}")
        if queries is None or queries.shape[1] == 0:
            raise ValueError("the qq selector needs build queries (prefill queries of the group's heads)")
        if queries.dim() != 3 or queries.shape[0] != self.n_heads or queries.shape[2] != self.dim:
            raise ValueError(f"queries must have shape [{self.n_heads}, Nq, {self.dim}], got {list(queries.shape)}")
        if queries.shape[1] > self.max_queries:
            pick = torch.linspace(0, queries.shape[1] - 1, self.max_queries, device=queries.device).long()
            queries = queries[:, pick]
        keys, queries = keys.to(self.device), queries.to(self.device)
        m = min(self.m_keys, keys.shape[1])
        scores, ids = topk_keys(queries, keys, m)
        shape = (self.n_heads, queries.shape[1], self.m_keys)
        try:  # into new tensors, put in place at the end: a build that fails leaves the lists as they were
            lists = torch.full(shape, -1, dtype=torch.int32)
            list_scores = torch.full(shape, float("-inf"))
        except (RuntimeError, MemoryError) as error:  # the allocator's bare message names no option
            raise ValueError(
                f"the query lists of m_keys = {self.m_keys} keys for {shape[1]} build queries x {shape[0]} heads "
                f"({8 * math.prod(shape) / 2**30:.1f} GiB) could not be allocated: lower m_keys (or max_queries)"
            ) from error
        lists[:, :, :m] = ids.to(torch.int32).cpu()
        list_scores[:, :, :m] = scores.cpu()
        raw = queries.float().cpu().contiguous()  # contiguous: the kernel adds take it in (ann.precompile)
        if raw.untyped_storage().data_ptr() == queries.untyped_storage().data_ptr():
            raw = raw.clone()  # the caller's own queries: theirs to change after the build
        self.lists, self.list_scores, self.raw = lists, list_scores, raw
        self.queries = _unit(queries.float()).to(self.dtype)
        self.n_keys = keys.shape[1]

    def mark(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """What `rewind` needs to take the lists back to the keys they hold now (`add` changes them in place)."""
        return self.lists.clone(), self.list_scores.clone(), self.n_keys

    def rewind(self, mark: tuple[torch.Tensor, torch.Tensor, int]) -> None:
        """Back to the lists at `mark` (taken from these lists, with no `build` since); the mark stays as it was."""
        lists, scores, n_keys = mark
        self.lists.copy_(lists)
        self.list_scores.copy_(scores)
        self.n_keys = n_keys

    def state(self) -> dict[str, torch.Tensor]:
        """Its build queries and lists as tensors: what `load_state` takes (engine.prefix_file)."""
        names = ("queries", "lists", "list_scores", "raw")
        return {**{name: getattr(self, name) for name in names}, "n_keys": torch.tensor([self.n_keys])}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """These lists as a `state()` left them, taken of lists of the same heads, dim and m_keys. The lists
        take the tensors over where they can (`add` changes them in place): state() of live lists is no
        state to load into others."""
        n_queries = state["raw"].shape[1]
        for name, width in (
            ("queries", self.dim),
            ("lists", self.m_keys),
            ("list_scores", self.m_keys),
            ("raw", self.dim),
        ):
            if tuple(state[name].shape) != (self.n_heads, n_queries, width):
                raise ValueError(f"query lists take {name} of shape {[self.n_heads, n_queries, width]}")
        self.queries = state["queries"].to(self.device, self.dtype)
        self.lists = state["lists"].to(torch.int32).contiguous()
        self.list_scores = state["list_scores"].float().contiguous()
        self.raw = state["raw"].float().contiguous()  # contiguous: the kernel adds take it in (ann.precompile)
        self.n_keys = int(state["n_keys"][0])

    def add(self, keys: torch.Tensor, dots=None) -> None:
        """keys [H, n, D] get ids len(self)...; each enters the lists (among the n_add
        build queries nearest its direction) whose weakest entry it beats, at its place: best first.
        `dots` finds the nearest (`bmm_dots`'s signature; the engine passes its native product for bf16
        build queries on the CPU, as `stacked_nearest` takes it)."""
        if self.n_queries == 0:
            raise RuntimeError("add before build: the qq selector needs build queries first")
        n = keys.shape[1]
        if self.n_add > 0 and n:
            from ann._kernels import enter_lists

            near = (dots or bmm_dots)(_unit(keys.to(self.device, self.dtype)), self.queries)  # [H, n, Nq]
            near = torch.topk(near, min(self.n_add, self.n_queries), dim=2).indices  # [H, n, n_add]
            keys = keys.float().cpu().contiguous()
            args = self.lists.numpy(), self.list_scores.numpy(), self.raw.numpy(), keys.numpy(), near.cpu().numpy()
            enter_lists(*args, self.n_keys)
        self.n_keys += n

    def candidates(self, q: torch.Tensor, n_neighbors: int | None = None) -> torch.Tensor:
        """q [H, G, D] (each KV head's query group) -> key ids [H, C] int64 on the
        CPU (duplicates possible, -1 where a list is short): the lists of the
        heads' nearest build queries (`nearest`), each list best key first."""
        heads = torch.arange(self.n_heads).unsqueeze(1)
        return self.lists[heads, self.nearest(q, n_neighbors).cpu()].reshape(self.n_heads, -1).long()

    def nearest(self, q: torch.Tensor, n_neighbors: int | None = None) -> torch.Tensor:
        """q [H, G, D] -> the rows of the lists each KV head's group proposes [H, nn * G] int64, on the
        build queries' device: the heads' nearest build queries by direction, rank by rank across the
        group. Sets `scanned` (build queries scored)."""
        return stacked_nearest([self], q[None], [n_neighbors or self.n_neighbors])[0]


def bmm_dots(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """q [X, G, D] . rows [X, N, D] -> [X, G, N], in q's dtype."""
    return torch.bmm(q, rows.transpose(1, 2))


def stacked_nearest(lists: list[QueryLists], q: torch.Tensor, n_neighbors: list[int], dots=bmm_dots) -> torch.Tensor:
    """`QueryLists.nearest` of B sequences' lists (built, one configuration) in one product: q [B, H, G, D],
    up to n_neighbors[b] build queries per query head of sequence b -> [B, H, nn * G] int64, nn the most
    of any; a sequence's rows rank by rank, -1 past its own nn. Sets each one's `scanned`. `dots` is the
    product (`bmm_dots`'s signature; the engine passes its native one for bf16 build queries on the CPU)."""
    first, (B, H, G, _) = lists[0], q.shape
    n_queries = [one.n_queries for one in lists]
    if not min(n_queries):
        raise RuntimeError("search before build: the qq selector holds no build queries")
    queries = stack_rows([one.queries for one in lists], n_queries)
    unit = _unit(q.to(first.device, first.dtype)).flatten(0, 1)
    sims = dots(unit, queries.flatten(0, 1)).view(B, H, G, -1)  # [B, H, G, Nq]
    nn = [min(n, one.n_queries) for n, one in zip(n_neighbors, lists)]
    for one in lists:
        one.scanned = G * one.n_queries * H
    rows = torch.topk(masked(sims, n_queries), max(nn), dim=-1).indices  # [B, H, G, nn]
    if min(nn) < max(nn):
        rows = rows.masked_fill(beyond(nn, max(nn), rows.device, 4), -1)
    return rows.transpose(-1, -2).reshape(B, H, -1)  # rank by rank


class QQIndex(Selector):
    """One KV head's query lists behind the `KeyIndex` protocol (numpy in and out,
    CPU torch inside); searches rerank the proposals exactly against the keys."""

    def __init__(
        self,
        dim: int,
        m_keys: int = 64,
        n_neighbors: int = 32,
        max_queries: int = 32768,
        n_add: int = 16,
        store: GrowableKeys | None = None,
    ):
        self.dim = dim
        self.lists = QueryLists(1, dim, m_keys, n_neighbors, max_queries, n_add)
        self.store = store if store is not None else GrowableKeys(dim)
        self._owns_store = store is None

    def __len__(self) -> int:
        return len(self.store)

    @property
    def n_neighbors(self) -> int:
        return self.lists.n_neighbors

    @n_neighbors.setter
    def n_neighbors(self, value: int) -> None:
        check_counts(positive={"n_neighbors": value})
        self.lists.n_neighbors = value

    @property
    def nbytes(self) -> int:
        return self.lists.nbytes + (self.store.nbytes if self._owns_store else 0)

    @staticmethod
    def estimate_bytes(
        n_keys: int,
        dim: int,
        n_queries: int = 0,
        m_keys: int = 64,
        max_queries: int = 32768,
        store: GrowableKeys | None = None,
        **params,
    ) -> int:
        device, host = QueryLists.estimate_bytes(1, n_keys, dim, n_queries, m_keys, max_queries)
        return device + host + (0 if store is not None else 4 * n_keys * dim)

    def build(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        """keys [N, dim]; queries [Nq, dim] (required: this selector is made of them)."""
        keys = as_vectors(keys, self.dim, "keys")
        if queries is None:
            raise ValueError("the qq selector needs build queries (prefill queries of the group's heads)")
        queries = as_vectors(queries, self.dim, "queries")
        self.lists.build(torch.from_numpy(keys)[None], torch.from_numpy(queries)[None])
        if self._owns_store:  # after the lists, which do not read it: a build they refuse leaves both as they were
            self.store.reset(keys)

    def add(self, keys: np.ndarray) -> None:
        keys = as_vectors(keys, self.dim, "keys")
        if self.lists.n_queries == 0:
            raise RuntimeError("add before build: the qq selector needs build queries first")
        if self._owns_store:
            self.store.append(keys)
        self.lists.add(torch.from_numpy(keys)[None])

    def candidates(self, q: np.ndarray, k: int = 0) -> tuple[np.ndarray, int, int]:
        """q [G, dim] (one group) -> candidate ids [C] (in order of preference, duplicates
        possible), build queries scored, 0 keys."""
        ids = self.lists.candidates(torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))[None])[0]
        return ids.numpy(), self.lists.scanned, 0
