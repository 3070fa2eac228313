"""A low-rank sketch of the host keys, to rank candidate tokens without reading their keys.

Each host key k [D] is kept projected to r dimensions (k P_k), and a decode
query q to the same r dimensions (q P_q), so that (q P_q) . (k P_k)
approximates q . k. With the prefill queries at hand the projection is fitted
to both sides: for query and key second moments C_q and C_k, the rank-r M that
minimises E[(q^T (I - M) k)^2] is C_q^{-1/2} U_r U_r^T C_q^{1/2}, where U_r are
the top left singular vectors of C_q^{1/2} C_k^{1/2}; it splits into
P_q = C_q^{-1/2} U_r and P_k = C_q^{1/2} U_r. Without queries, P_q = P_k = the
top principal directions of the keys. At r = D both give q . k exactly.

The sketch lives in host memory next to the KV store. But a projection
fitted to the prefill's queries misses directions a decode query takes that
those did not (a question about a needle in a repetitive haystack), so the
default scores candidates on their keys in the host store (`ExactKeys`: no
copy, exact, one key read per candidate, in the host kernel
`ops.gather_scores`); a sketch remains for machines where reading those keys
costs too much. docs/method.md has what each measured.
"""

from __future__ import annotations

import torch

from ann.block import head_rows
from engine.cache.store import host_empty
from engine.native import ops


def _sqrt_and_inverse(c: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of PSD matrices c [H, D, D] and its pseudo-inverse (fp64)."""
    w, u = torch.linalg.eigh(c)
    w = w.clamp_min(0)
    keep = w > eps * w.amax(dim=-1, keepdim=True)
    root = torch.where(keep, w.sqrt(), torch.zeros_like(w))
    inv = torch.where(keep, 1 / root.clamp_min(1e-300), torch.zeros_like(w))
    ut = u.transpose(1, 2)
    return u @ (root.unsqueeze(-1) * ut), u @ (inv.unsqueeze(-1) * ut)


FIT_SAMPLE = 16384  # keys (evenly strided) the second moment is estimated from


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """x [H, N, D] -> E[x x^T] [H, D, D] fp64 on the CPU, from at most FIT_SAMPLE rows."""
    x = x[:, :: max(1, -(-x.shape[1] // FIT_SAMPLE))].float()
    return (x.transpose(1, 2) @ x / max(1, x.shape[1])).double().cpu()


def fit_projection(keys: torch.Tensor, queries: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [H, N, D], queries [H, Nq, D] or None (any device) -> (P_q, P_k) [H, D, r] fp32
    on the CPU (see the module doc)."""
    c_k = second_moment(keys)  # [H, D, D]
    if queries is None or queries.shape[1] == 0:
        p = torch.linalg.eigh(c_k)[1][:, :, -rank:].flip(-1)
        return p.float(), p.float()
    q_root, q_inv = _sqrt_and_inverse(second_moment(queries))
    k_root, _ = _sqrt_and_inverse(c_k)
    u = torch.linalg.svd(q_root @ k_root)[0][:, :, :rank]  # [H, D, r]
    return (q_inv @ u).float(), (q_root @ u).float()


class KeySketch:
    """Projected keys [H, n, r] of one layer's host store (ids as in the store)."""

    def __init__(self, n_heads: int, dim: int, rank: int, dtype: torch.dtype = torch.float32):
        if not 1 <= rank <= dim:
            raise ValueError(f"sketch rank must lie in [1, head dim {dim}], got {rank}")
        self.n_heads, self.dim, self.rank, self.dtype = n_heads, dim, rank, dtype
        self.p_q = self.p_k = None  # [H, D, r]
        self.n = 0
        self._k = host_empty((n_heads, 0, rank), dtype)

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        return self._k.nbytes

    def build(self, keys: torch.Tensor, queries: torch.Tensor | None) -> None:
        """keys [H, N, D] (the host store's, on the host or a copy on the device: the projection
        runs where they are), queries [H, Nq, D] (a group's prefill queries)."""
        self.p_q, self.p_k = fit_projection(keys, queries, self.rank)
        self.n = 0
        self._k = host_empty((self.n_heads, keys.shape[1], self.rank), self.dtype)
        self.add(keys)

    def add(self, keys: torch.Tensor) -> None:
        """keys [H, n, D] on any device: projected and appended in host memory (the capacity
        grows by half again when full)."""
        n = keys.shape[1]
        if self.n + n > self._k.shape[1]:
            grown = host_empty((self.n_heads, max(self.n + n, self._k.shape[1] * 3 // 2, 256), self.rank), self.dtype)
            grown[:, : self.n] = self._k[:, : self.n]
            self._k = grown
        projected = torch.bmm(keys.float(), self.p_k.to(keys.device))  # [H, n, r]
        self._k[:, self.n : self.n + n] = projected.to("cpu", self.dtype)
        self.n += n

    def state(self) -> dict[str, torch.Tensor]:
        """Its projections and projected keys as tensors: what `load_state` takes (engine.prefix_file)."""
        return {"p_q": self.p_q, "p_k": self.p_k, "keys": self._k[:, : self.n]}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """This sketch as a `state()` left it, taken of a sketch of the same heads, dim and rank."""
        projection, keys = (self.n_heads, self.dim, self.rank), state["keys"]
        if tuple(state["p_q"].shape) != projection or tuple(state["p_k"].shape) != projection:
            raise ValueError(f"a key sketch takes projections of shape {list(projection)}")
        if keys.ndim != 3 or (keys.shape[0], keys.shape[2]) != (self.n_heads, self.rank):
            raise ValueError(f"a key sketch takes projected keys of shape [{self.n_heads}, n, {self.rank}]")
        self.p_q, self.p_k = state["p_q"].float(), state["p_k"].float()
        self._k = host_empty(tuple(keys.shape), self.dtype)
        self._k.copy_(keys)
        self.n = keys.shape[1]

    def scores(self, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """q [H, G, D] fp32, ids [H, C] host ids (-1 padded) -> approximate q . k [H, G, C] (-inf at padding)."""
        rows = head_rows(self._k, ids).float()  # [H, C, r]
        s = torch.bmm(torch.bmm(q.float(), self.p_q), rows.transpose(1, 2))  # [H, G, C]
        return s.masked_fill_((ids < 0).unsqueeze(1), float("-inf"))


class ExactKeys:
    """The candidates' exact q . k, read from the host store's keys by the host kernel
    (`ops.gather_scores`): what `KeySketch` gives at full rank, without a projected copy."""

    rank = 0

    def __init__(self, host, threads: int = 0):
        self.host = host  # engine.cache.store.HostKV
        self.threads = threads  # the host kernel's (0: all cores)

    @property
    def n(self) -> int:
        return self.host.n

    def __len__(self) -> int:
        return self.host.n

    nbytes = 0

    def build(self, keys: torch.Tensor, queries: torch.Tensor | None) -> None:
        pass  # nothing to fit: the store's keys are the scores' own

    def add(self, keys: torch.Tensor) -> None:
        pass  # the store has them already

    def scores(self, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """q [H, G, D] fp32, ids [H, C] host ids (-1 padded) -> q . k [H, G, C] (-inf at padding)."""
        H, G, D = q.shape
        return ops.gather_scores(q.reshape(H * G, D), self.host.keys, ids, n_threads=self.threads).view(H, G, -1)


def make_scorer(rank: int, host, threads: int = 0) -> KeySketch | ExactKeys:
    """The adaptive budget's candidate scorer for a layer's host store `host`: a rank-`rank`
    `KeySketch`, or with rank 0 (or the head dim and above: no smaller) `ExactKeys`, which
    scores on `threads` host threads (0: all cores)."""
    if rank == 0 or rank >= host.dim:
        return ExactKeys(host, threads)
    return KeySketch(host.n_heads, host.dim, rank, dtype=host.dtype)
