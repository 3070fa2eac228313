"""The host key index of a layer, one `ann` index per KV head (`HeadIndexes`) or the
query->query lists of all KV heads at once (`ListSelector`): both give a decode step
its candidate host ids per KV head."""

from __future__ import annotations

import copy

import numpy as np
import torch

from ann.qq import bmm_dots
from engine.index.distinct import _pad, distinct_rows
from engine.native import ops

OVERSAMPLE = 8  # proposals looked at per host token a step may take


# ... when the adaptive budget rates the candidates afterwards: half as many lose little
# and halve the cost of finding the distinct ones (docs/method.md)
SKETCHED_OVERSAMPLE = 4


def check_index_params(method: str, dim: int, params: dict) -> None:
    """Refuses `index_params` the key index of `method` does not take (a name it does not know or one the
    engine gives it, a value it refuses), before a prefill rather than at the index build after it: an
    empty index of one head is made with them, as ListSelector and HeadIndexes make theirs."""
    try:
        if method == "qq":
            ListSelector(1, dim, "cpu", torch.float32, params)
        else:
            HeadIndexes(method, 1, dim, params)
    except (TypeError, ValueError) as error:
        raise ValueError(f"index_params {params} do not fit the key index {method!r}: {error}") from error


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

    def mark(self) -> list:
        """What `rewind` needs to take the indexes back to the keys they hold now: a copy of them."""
        return copy.deepcopy(self.indexes)

    def rewind(self, mark: list) -> None:
        self.indexes = copy.deepcopy(mark)  # the mark stays as it was, for the next rewind

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
        self.lists.add(keys, dots=build_query_dots)

    def mark(self) -> tuple:
        return self.lists.mark()

    def rewind(self, mark: tuple) -> None:
        self.lists.rewind(mark)

    def state(self) -> dict[str, torch.Tensor]:
        return self.lists.state()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.lists.load_state(state)

    def candidates(
        self, q: torch.Tensor, q_host: np.ndarray, top_k: int, oversample: int = OVERSAMPLE
    ) -> tuple[torch.Tensor, int, int]:
        rows, limit = self.proposal_rows(q, top_k, oversample)
        heads = torch.arange(rows.shape[0]).unsqueeze(1)
        proposals = self.lists.lists[heads, rows.cpu()].reshape(rows.shape[0], -1).long()  # [H, C]
        return first_distinct_rows(proposals, limit, oversample), self.lists.scanned, 0

    def proposal_rows(self, q: torch.Tensor, top_k: int, oversample: int = OVERSAMPLE) -> tuple[torch.Tensor, int]:
        """The list rows q [H, G, D] proposes [H, P] (on the device, in order of preference) and the
        distinct proposals a step takes from them, limit = G * top_k, among their first
        oversample * limit entries."""
        rows, limits = proposal_rows([self], q[None], [top_k], oversample)
        return rows[0], limits[0]

    def nbytes(self) -> tuple[int, int]:
        device = self.lists.queries.nbytes
        return device, self.lists.nbytes - device

    def __len__(self) -> int:
        return len(self.lists)


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


def proposal_rows(
    selectors: list[ListSelector], q: torch.Tensor, top_k: list[int], oversample: int = OVERSAMPLE
) -> tuple[torch.Tensor, list[int]]:
    """`ListSelector.proposal_rows` of B sequences' selectors (one configuration) in one search:
    q [B, H, G, D] -> (rows [B, H, P], -1 after a sequence's own; limits)."""
    from ann.qq import stacked_nearest

    G = q.shape[2]
    # only the first oversample * limit proposals are looked at: merge no more lists than fill them
    n_lists = [min(-(-oversample * k // s.lists.m_keys), s.lists.n_neighbors) for s, k in zip(selectors, top_k)]
    return stacked_nearest([s.lists for s in selectors], q, n_lists, dots=build_query_dots), [G * k for k in top_k]


def build_query_dots(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The query lists' product q [X, G, D] . build queries [X, N, D]: bf16 ones in host memory through the
    project's kernel (`ops.query_dots`: the same scores up to the order of their sums, in well under torch's
    time for a product of so few rows), else torch's."""
    if rows.device.type == "cpu" and rows.dtype == torch.bfloat16:  # where the kernel has no path, torch's serves
        return ops.query_dots(q, rows)
    return bmm_dots(q, rows)
