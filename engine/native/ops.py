"""Host kernels: gather-attend over the host KV store, the scores of listed rows, the whole
host side of a decode step (`host_step`), the log-sum-exp merge, and the bf16 products of a few
vectors with many rows that the query lists' search, the blocks' scores and their estimate take
(`query_dots`, `weighted_rows`).

The C++ extension `engine.native._C` does the work; this module turns torch CPU
tensors and numpy arrays into zero-copy buffers for it. When the extension is
missing (or HYBRIDATTN_NO_EXT=1), a plain-torch version runs instead and
`HAS_EXT` says so; the test suite fails in that case unless told otherwise.
"""

from __future__ import annotations

import logging
import math
import os
from typing import NamedTuple

import numpy as np
import torch

from engine.decode.merge import merge_states

log = logging.getLogger(__name__)

try:
    if os.environ.get("HYBRIDATTN_NO_EXT") == "1":
        raise ImportError("disabled by HYBRIDATTN_NO_EXT=1")
    from engine.native import _C

    HAS_EXT = True
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    HAS_EXT = False
    log.warning("hybridattn C++ extension not loaded (%s); using the plain-torch gather-attend", exc)

STORE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NUMPY_DTYPES = {np.dtype(t) for t in (np.float64, np.float32, np.float16)}  # bf16 has no numpy dtype
_FLT_MAX = float(np.finfo(np.float32).max)


def _as_cpu_tensor(x, name: str) -> torch.Tensor:
    """A torch view of `x` (no copy); rejects non-CPU tensors and non-numeric input."""
    if isinstance(x, np.ndarray):
        if x.dtype not in _NUMPY_DTYPES and not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"{name} has unsupported dtype {x.dtype} (numpy has no bfloat16: pass a torch tensor)")
        return torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor or a numpy array, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got a tensor on {x.device}")
    return x.detach()


def _buffer(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view; bf16 travels as its int16 bit pattern."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _check_ids(ids: torch.Tensor) -> torch.Tensor:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor (int64), got {ids.dtype}")
    if ids.dtype == torch.uint64:  # its ids from 2**63 on would turn negative (-1 is padding)
        raise ValueError("ids must be int64 (or a narrower integer type), got torch.uint64")
    return ids.to(torch.int64).contiguous()  # [Hkv, M] ids are small: converting them is cheap


def _check_store_pair(k: torch.Tensor, v: torch.Tensor, k_name: str, v_name: str) -> None:
    if k.dtype != v.dtype:
        raise ValueError(f"{k_name} and {v_name} must have the same dtype, got {k.dtype} and {v.dtype}")
    if k.dtype not in STORE_DTYPES:
        raise ValueError(f"store dtype {k.dtype} is not supported (supported: float32, float16, bfloat16)")
    if k.shape != v.shape:
        raise ValueError(f"{k_name} and {v_name} differ in shape: {tuple(k.shape)} vs {tuple(v.shape)}")


def _check_heads(q_shape, store_shape, ids_rows: int) -> None:
    """q [Hq, D] against a store [Hkv, N, D] and its ids' rows."""
    if store_shape[0] == 0:
        raise ValueError("the store has no KV heads (expected [Hkv, N, D] with Hkv >= 1)")
    if q_shape[1] != store_shape[2]:
        raise ValueError(f"q has head dim {q_shape[1]} but the store has {store_shape[2]}")
    if q_shape[0] % store_shape[0] != 0:
        raise ValueError(f"Hq = {q_shape[0]} is not a multiple of Hkv = {store_shape[0]}")
    if ids_rows != store_shape[0]:
        raise ValueError(f"ids must have one row per KV head ({store_shape[0]}), got {ids_rows}")


def _check_call(
    q: torch.Tensor, scale: float | None, n_threads: int, check_finite: bool = True
) -> tuple[torch.Tensor, float]:
    """q as fp32 contiguous (it is small: a copy costs nothing) and the scale as the kernel takes it;
    q's values are checked finite unless the kernel checks them itself (`check_finite` False)."""
    if not q.dtype.is_floating_point:
        raise ValueError(f"q must be a float tensor, got {q.dtype}")
    q = q.float().contiguous()
    if check_finite and not bool(torch.isfinite(q).all()):
        raise ValueError("q contains NaN or inf")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not (math.isfinite(scale) and abs(scale) <= _FLT_MAX):  # the kernel takes it as a float32
        raise ValueError(f"scale must be a finite float32 number, got {scale!r}")
    if not 0 <= n_threads < 2**31:
        raise ValueError(f"n_threads must be in [0, 2**31) (0: all cores), got {n_threads}")
    return q, scale


def _outputs(q: torch.Tensor, out, lse) -> tuple[torch.Tensor, torch.Tensor]:
    """out like q [.., Hq, D] and lse [.., Hq], float32: the caller's or new ones."""
    for name, x in (("out", out), ("lse", lse)):
        if isinstance(x, np.ndarray) and not x.flags.writeable:  # torch.from_numpy would drop the flag
            raise ValueError(f"{name} is a read-only array")
    out = torch.empty(q.shape, dtype=torch.float32) if out is None else _as_cpu_tensor(out, "out")
    lse = torch.empty(q.shape[:-1], dtype=torch.float32) if lse is None else _as_cpu_tensor(lse, "lse")
    return out, lse


def gather_attend(q, k_store, v_store, ids, scale=None, *, out=None, lse=None, n_threads=0, scalar=False):
    """Attend each query head to the host-store rows listed for its KV head.

    q [Hq, D] (any float dtype, used in fp32); k_store, v_store [Hkv, N, D]
    float32/float16/bfloat16 on the CPU, rows contiguous (heads may be strided,
    as in a store with spare capacity); ids [Hkv, M] int64, -1 = padding; a
    repeated id is attended as often as listed. Hq must be a multiple of Hkv.
    Returns `(out [Hq, D] float32, lse [Hq] float32)`, torch tensors when q is
    one, else numpy arrays. An id list with no valid id gives out = 0, lse = -inf.
    Bad input raises ValueError (IndexError for an id outside [-1, N)); q and
    `scale` must be finite. Scores are fp32: a dot product beyond +-3.4e38
    overflows (a row at -inf weighs nothing, one at +inf makes the head NaN).
    The stores are never copied: a store in the wrong layout is rejected.
    `n_threads` = 0 uses all cores; `scalar` runs the kernel's plain scalar
    loops instead of its 16-lane path (to test one against the other).
    """
    as_numpy = isinstance(q, np.ndarray)
    q, k, v = _as_cpu_tensor(q, "q"), _as_cpu_tensor(k_store, "k_store"), _as_cpu_tensor(v_store, "v_store")
    ids = _check_ids(_as_cpu_tensor(ids, "ids"))
    if q.dim() != 2 or k.dim() != 3 or v.dim() != 3 or ids.dim() != 2:
        raise ValueError(
            f"expected q [Hq, D], stores [Hkv, N, D], ids [Hkv, M]; got q {tuple(q.shape)}, "
            f"k_store {tuple(k.shape)}, v_store {tuple(v.shape)}, ids {tuple(ids.shape)}"
        )
    _check_store_pair(k, v, "k_store", "v_store")
    _check_heads(q.shape, k.shape, ids.shape[0])
    q, scale = _check_call(q, scale, n_threads)  # [Hq, D] fp32
    out, lse = _outputs(q, out, lse)
    if HAS_EXT:
        _C.gather_attend(
            _buffer(q),
            _buffer(k),
            _buffer(v),
            _buffer(ids),
            _buffer(out),
            _buffer(lse),
            STORE_DTYPES[k.dtype],
            scale,
            n_threads,
            scalar,
        )
    else:
        o, l = gather_attend_torch(q, k, v, ids, scale)
        out.copy_(o)
        lse.copy_(l)
    return (out.numpy(), lse.numpy()) if as_numpy else (out, lse)


def _store_list(stores, name: str, n_seqs: int) -> list[torch.Tensor]:
    """B stores [Hkv, N_b, D] from a sequence of tensors or arrays (a [B, Hkv, N, D] tensor is one too)."""
    try:
        stores = list(stores)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of B stores, got {type(stores).__name__}") from None
    if len(stores) != n_seqs:
        raise ValueError(f"{name} must hold one store per sequence (B = {n_seqs}), got {len(stores)}")
    stores = [_as_cpu_tensor(s, f"{name}[{b}]") for b, s in enumerate(stores)]
    for b, s in enumerate(stores):
        if s.dim() != 3:
            raise ValueError(f"{name}[{b}] must be a store [Hkv, N, D], got shape {tuple(s.shape)}")
    return stores


def gather_attend_batch(q, k_stores, v_stores, ids, scale=None, *, out=None, lse=None, n_threads=0, scalar=False):
    """`gather_attend` for the B sequences of one layer in one kernel call.

    q [B, Hq, D]; k_stores, v_stores: B stores [Hkv, N_b, D] each, one per
    sequence (N_b may differ; one dtype, Hkv and D for all; same layout rules as
    `gather_attend`); ids [B, Hkv, M] int64, -1 = padding, where sequence b's
    ids index its own stores. Returns `(out [B, Hq, D] float32, lse [B, Hq]
    float32)`, numpy arrays when q is one. The kernel's threads share all
    (sequence, KV head) units, and each sequence's result is bit-identical to
    `gather_attend` on it alone with the same `n_threads` and `scalar`. Bad
    input raises ValueError; an id outside [-1, N_b) raises IndexError naming
    its sequence, KV head and position, before any work is done.
    """
    as_numpy = isinstance(q, np.ndarray)
    q, ids = _as_cpu_tensor(q, "q"), _check_ids(_as_cpu_tensor(ids, "ids"))
    if q.dim() != 3 or ids.dim() != 3:
        raise ValueError(f"expected q [B, Hq, D] and ids [B, Hkv, M]; got q {tuple(q.shape)}, ids {tuple(ids.shape)}")
    B = q.shape[0]
    if ids.shape[0] != B:
        raise ValueError(f"ids must have one [Hkv, M] list per sequence (B = {B}), got {ids.shape[0]}")
    ks, vs = _store_list(k_stores, "k_stores", B), _store_list(v_stores, "v_stores", B)
    for b in range(B):
        _check_store_pair(ks[b], vs[b], f"k_stores[{b}]", f"v_stores[{b}]")
        if (ks[b].dtype, ks[b].shape[0], ks[b].shape[2]) != (ks[0].dtype, ks[0].shape[0], ks[0].shape[2]):
            raise ValueError(
                f"all stores must share one dtype, Hkv and D: k_stores[0] is {ks[0].dtype} {tuple(ks[0].shape)}, "
                f"k_stores[{b}] is {ks[b].dtype} {tuple(ks[b].shape)}"
            )
    if B:
        _check_heads(q.shape[1:], ks[0].shape, ids.shape[1])
    q, scale = _check_call(q, scale, n_threads)  # [B, Hq, D] fp32
    out, lse = _outputs(q, out, lse)
    if HAS_EXT:
        _C.gather_attend_batch(
            _buffer(q),
            [_buffer(k) for k in ks],
            [_buffer(v) for v in vs],
            _buffer(ids),
            _buffer(out),
            _buffer(lse),
            STORE_DTYPES[ks[0].dtype] if B else "float32",
            scale,
            n_threads,
            scalar,
        )
    else:
        results = [_torch_sequence(b, q[b], ks[b], vs[b], ids[b], scale) for b in range(B)]  # all checked first
        for b, (o, l) in enumerate(results):
            out[b].copy_(o)
            lse[b].copy_(l)
    return (out.numpy(), lse.numpy()) if as_numpy else (out, lse)


def _torch_sequence(b: int, q, k_store, v_store, ids, scale):
    try:
        return gather_attend_torch(q, k_store, v_store, ids, scale)
    except IndexError as exc:
        raise IndexError(f"sequence {b}: {exc}") from None


def gather_attend_torch(
    q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, ids: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same computation in plain torch (gather, batched matmul, softmax): the
    fallback when the extension is missing and the baseline the kernel is measured against.
    q [Hq, D] fp32, stores [Hkv, N, D], ids [Hkv, M] int64 -> (out [Hq, D], lse [Hq]) fp32."""
    Hkv, D = ids.shape[0], q.shape[-1]
    _check_rows(ids, k_store.shape[1])
    if k_store.shape[1] == 0:  # nothing stored (all ids are padding): there is no row 0 to gather
        return torch.zeros(q.shape), torch.full(q.shape[:1], float("-inf"))
    k, v = _rows(k_store, ids).float(), _rows(v_store, ids).float()  # [Hkv, M, D]
    s = torch.bmm(q.view(Hkv, -1, D), k.transpose(1, 2)).mul_(scale)  # [Hkv, G, M]
    s.masked_fill_((ids < 0).unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [Hkv, G]
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    return torch.bmm(p, v).view(-1, D), lse.view(-1)


def gather_scores(q, k_store, ids, *, n_threads: int = 0, scalar: bool = False) -> torch.Tensor:
    """q . k of the host-store rows listed for each KV head: q [Hq, D] (used in fp32),
    k_store [Hkv, N, D] float32/float16/bfloat16 on the CPU (rows contiguous, heads may be
    strided), ids [Hkv, M] int64, -1 = padding -> scores [Hq, M] float32 torch tensor, row
    h * G + g scoring KV head h's ids for query head g, -inf at padding (unscaled). Bad input
    raises ValueError, an id outside [-1, N) IndexError. `n_threads` and `scalar` as in
    `gather_attend`."""
    q, k = _as_cpu_tensor(q, "q"), _as_cpu_tensor(k_store, "k_store")
    ids = _check_ids(_as_cpu_tensor(ids, "ids"))
    if q.dim() != 2 or k.dim() != 3 or ids.dim() != 2:
        raise ValueError(
            f"expected q [Hq, D], k_store [Hkv, N, D], ids [Hkv, M]; got q {tuple(q.shape)}, "
            f"k_store {tuple(k.shape)}, ids {tuple(ids.shape)}"
        )
    if k.dtype not in STORE_DTYPES:
        raise ValueError(f"store dtype {k.dtype} is not supported (supported: float32, float16, bfloat16)")
    _check_heads(q.shape, k.shape, ids.shape[0])
    q, _ = _check_call(q, 1.0, n_threads)
    out = torch.empty(q.shape[0], ids.shape[1], dtype=torch.float32)
    if HAS_EXT:
        _C.gather_scores(_buffer(q), _buffer(k), _buffer(ids), _buffer(out), STORE_DTYPES[k.dtype], n_threads, scalar)
        return out
    _check_rows(ids, k.shape[1])
    if k.shape[1] == 0:  # nothing stored: every id is padding
        return out.fill_(float("-inf"))
    s = torch.bmm(q.view(k.shape[0], -1, k.shape[2]), _rows(k, ids).float().transpose(1, 2))  # [Hkv, G, M]
    return s.masked_fill_((ids < 0).unsqueeze(1), float("-inf")).view(q.shape[0], -1)


MAX_RATE_GROUP = _C.MAX_RATE_GROUP if HAS_EXT else 0  # query heads per KV head host_step rates (none without it)
_BF16_DOTS = HAS_EXT and _C.has_bf16_dots()  # asked once: the CPU does not change under a process


def bf16_dots_available() -> bool:
    """Whether `query_dots` runs the CPU's bf16 dot-product instructions here (AVX512-BF16)."""
    return _BF16_DOTS


def query_dots_native(rows: torch.Tensor) -> bool:
    """Whether `query_dots` over these rows (bf16, on the CPU) runs the kernel, not torch's product."""
    return HAS_EXT and rows.shape[-1] > 0 and rows.shape[-1] % 32 == 0


def query_dots(
    q: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor | None = None, *, n_threads: int = 0, widened: bool = False
) -> torch.Tensor:
    """q [X, G, D] . rows [X, N, D] -> [X, G, N], all bf16 on the CPU (D a multiple of 32): what
    torch.bmm(q, rows.transpose(1, 2)) gives, up to the order of its fp32 sums; with ids [X, M] (-1 reads
    row 0) the rows they name, -> [X, G, M]. The rows are read where they lie: a view of a buffer with
    spare rows (`_row_span`) is not copied, nor are the rows ids name gathered first. Through the CPU's
    bf16 dot-product instructions where it has them (`bf16_dots_available`), else (or `widened`) the
    bf16 values widened to fp32 in vector registers; torch's product where the kernel has no path
    (`query_dots_native`)."""
    q, rows = _as_cpu_tensor(q, "q"), _as_cpu_tensor(rows, "rows")
    if q.dtype != torch.bfloat16 or rows.dtype != torch.bfloat16:
        raise ValueError(f"query_dots takes bfloat16 q and rows, got {q.dtype} and {rows.dtype}")
    if q.dim() != 3 or rows.dim() != 3 or q.shape[0] != rows.shape[0] or q.shape[2] != rows.shape[2]:
        raise ValueError(f"expected q [X, G, D] and rows [X, N, D]; got q {tuple(q.shape)}, rows {tuple(rows.shape)}")
    ids = _row_ids(ids, rows)
    if not query_dots_native(rows):
        return torch.bmm(q, (rows if ids is None else _taken(rows, ids)).transpose(1, 2))
    out = torch.empty(q.shape[0], q.shape[1], rows.shape[1] if ids is None else ids.shape[1], dtype=torch.bfloat16)
    span, ids, n_rows, stride = _row_span(rows, ids)
    _C.query_dots(_buffer(q.contiguous()), span, ids, _buffer(out), n_rows, stride, n_threads, bool(widened))
    return out


def weighted_rows(w: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor | None = None, *, n_threads: int = 0):
    """w [X, G, N] @ rows [X, N, D] -> [X, G, D], all bf16 on the CPU (D a multiple of 8): what torch.bmm(w,
    rows) gives, up to the order of its fp32 sums; with ids [X, M] (-1 reads row 0) w [X, G, M] weighs the
    rows they name. The rows are read where they lie, as `query_dots` reads them."""
    w, rows = _as_cpu_tensor(w, "w"), _as_cpu_tensor(rows, "rows")
    if w.dtype != torch.bfloat16 or rows.dtype != torch.bfloat16:
        raise ValueError(f"weighted_rows takes bfloat16 w and rows, got {w.dtype} and {rows.dtype}")
    if w.dim() != 3 or rows.dim() != 3 or w.shape[0] != rows.shape[0]:
        raise _weights_mismatch(w, rows, ids)
    ids = _row_ids(ids, rows)
    if w.shape[2] != (rows.shape[1] if ids is None else ids.shape[1]):
        raise _weights_mismatch(w, rows, ids)
    if not HAS_EXT or rows.shape[2] == 0 or rows.shape[2] % 8:
        return torch.bmm(w, rows if ids is None else _taken(rows, ids))
    out = torch.empty(w.shape[0], w.shape[1], rows.shape[2], dtype=torch.bfloat16)
    span, ids, n_rows, stride = _row_span(rows, ids)
    _C.weighted_rows(_buffer(w.contiguous()), span, ids, _buffer(out), n_rows, stride, n_threads)
    return out


def _weights_mismatch(w: torch.Tensor, rows: torch.Tensor, ids) -> ValueError:
    taken = "" if ids is None else f", ids {tuple(ids.shape)}"
    return ValueError(
        f"expected w [X, G, M] and rows [X, N, D], M rows taken; got w {tuple(w.shape)}, "
        f"rows {tuple(rows.shape)}{taken}"
    )


def _row_ids(ids: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """ids [X, M] for rows [X, N, D] as the kernels take them (int64, contiguous; their range is checked by
    the kernel, or by `_taken`)."""
    if ids is None:
        return None
    ids = _check_ids(_as_cpu_tensor(ids, "ids"))
    if ids.dim() != 2 or ids.shape[0] != rows.shape[0]:
        raise ValueError(f"ids must have shape [{rows.shape[0]}, M], got {tuple(ids.shape)}")
    return ids


def _taken(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """rows [X, N, D] at ids [X, M] (-1 reads row 0) -> [X, M, D]."""
    _check_rows(ids, rows.shape[1])
    if rows.shape[1] == 0 and ids.numel():  # no row 0 for -1 to read
        raise IndexError(f"ids[0, 0] = {int(ids[0, 0])} is outside [-1, 0)")
    return _rows(rows, ids)


def _row_span(rows: torch.Tensor, ids: torch.Tensor | None) -> tuple:
    """rows [X, N, D] and ids as the kernels' RowSet takes them: (the memory from item 0's first row to item
    X - 1's last as [R, D], the ids as numpy or None, N, the rows from one item to the next). A view of a
    buffer with spare rows (rows packed, items a whole number of rows apart, not overlapping) is passed as
    it lies; anything else is packed first."""
    X, N, D = rows.shape
    if not (rows.stride(2) == 1 and rows.stride(1) == D and rows.stride(0) % D == 0 and rows.stride(0) >= N * D):
        rows = rows.contiguous()
    stride = rows.stride(0) // D if X > 1 else N
    span = rows.as_strided(((X - 1) * stride + N if X and N else 0, D), (D, 1))
    return _buffer(span), None if ids is None else ids.numpy(), N, stride


def _check_rows(ids: torch.Tensor, n: int) -> None:
    """IndexError naming the first of ids [Hkv, M] outside [-1, n), as the kernels do."""
    bad = ((ids < -1) | (ids >= n)).nonzero()
    if len(bad):
        h, j = (int(x) for x in bad[0])
        raise IndexError(f"ids[{h}, {j}] = {int(ids[h, j])} is outside [-1, {n})")


def _rows(store: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The rows ids [Hkv, M] (-1 reads row 0) of a store [Hkv, N, D] with N > 0 -> [Hkv, M, D], in its dtype."""
    return store[torch.arange(store.shape[0]).unsqueeze(1), ids.clamp_min(0)]


class HostStepResult(NamedTuple):
    """What `host_step` gives per sequence b and KV head h (CPU tensors)."""

    out: torch.Tensor  # [B, Hq, D] float32: attention over the ids read
    lse: torch.Tensor  # [B, Hq] float32 (-inf where nothing was read)
    ids: torch.Tensor  # [B, Hkv, cap] int64: the ids read, ascending, -1 after them
    n_read: torch.Tensor  # [B, Hkv] int64
    n_rated: torch.Tensor  # [B, Hkv] int64: candidates rated on their keys
    block_reads: torch.Tensor  # [B, Hkv, n_count_blocks] int32: ids read per block

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out, lse, block_reads) on `device`, asynchronously: in one copy where they lie end to end
        in one buffer, as `host_step_prepared` makes them (a decode step's three copies to a GPU
        become one per layer), else one copy each."""
        parts = (self.out, self.lse, self.block_reads)
        if self.out.device == torch.device(device):
            return parts
        if not _end_to_end(parts):
            return tuple(t.to(device, non_blocking=True) for t in parts)
        flat = self.out.as_strided((sum(t.numel() for t in parts),), (1,))  # fp32 bits, the reads' too
        return split_like(flat.to(device, non_blocking=True), parts)


def split_like(flat: torch.Tensor, parts) -> tuple[torch.Tensor, ...]:
    """flat, the parts' bytes end to end (in any dtype), cut into tensors of the parts' dtypes and
    shapes, in their order."""
    pieces = flat.view(torch.uint8).split([t.nbytes for t in parts])
    return tuple(piece.view(t.dtype).view(t.shape) for piece, t in zip(pieces, parts))


def _end_to_end(parts: tuple[torch.Tensor, ...]) -> bool:
    """Whether contiguous 4-byte tensors follow one another in one storage, with no gap."""
    storage = parts[0].untyped_storage().data_ptr()
    return all(
        t.is_contiguous() and t.element_size() == 4 and t.untyped_storage().data_ptr() == storage for t in parts
    ) and all(a.data_ptr() + a.nbytes == b.data_ptr() for a, b in zip(parts, parts[1:]))


RANGES = ("tail", "recent", "forced")  # the host-id ranges of a sequence, in `host_step`'s ranges[b]


def host_step(
    q,
    k_stores,
    v_stores,
    lists,
    near,
    blocks,
    ranges,
    lse,
    *,
    scale: float,
    threshold,
    qq_limit,
    qq_prefix,
    block_size: int,
    cap: int,
    n_count_blocks: int,
    lse_from_candidates: bool = False,
    pin: bool = False,
    n_threads: int = 0,
    min_chunk: int | None = None,
    scalar: bool = False,
) -> HostStepResult:
    """The host side of one layer's decode step for B sequences in one call (the C++ kernel's
    header, hybridattn/host_step.h, states it in full): per sequence and KV head, the candidates
    (query->query list proposals, chosen blocks' tokens, the tail and recent ranges) de-duplicated,
    rated on their keys, those that pass plus the forced range read by gather-attend.

    q [B, Hq, D] float; k_stores, v_stores: B stores [Hkv, N_b, D] (as `gather_attend_batch`);
    lists: B int32 query->query lists [Hkv, rows_b, L] (rows_b may be 0); near [B, Hkv, P] list
    rows, best first (-1 = none); blocks [B, Hkv, T] chosen block ids (-1 = none); ranges
    [B, 3, 2] the [begin, end) of `RANGES`; lse [B, Hq] the rating's log-denominators (with
    lse_from_candidates: the resident tokens', completed with the candidates' own scores).
    Sequence b's list proposals are the first qq_limit[b] distinct ids among the first qq_prefix[b]
    entries of its rows (each a number or [B] numbers). A candidate of sequence b is read when its
    probability averaged over the query group reaches threshold[b] (a number or [B] numbers; -inf:
    every candidate, unrated). `cap` bounds the ids
    read per row; `n_count_blocks` the blocks counted. `pin` puts the outputs in pinned memory
    (for asynchronous copies to a GPU). With fewer KV heads than twice the threads, a unit's
    candidates are rated and attended in chunks of `min_chunk` or more (None: the kernel's
    default, 2048) over several threads; the same ids are read either way.
    Bad input raises ValueError, an id, list row, block or range outside its store IndexError."""
    if not HAS_EXT:
        raise RuntimeError("host_step needs the C++ extension (engine.native._C)")
    q = _as_cpu_tensor(q, "q")
    if q.dim() != 3:
        raise ValueError(f"expected q [B, Hq, D], got {tuple(q.shape)}")
    q, scale = _check_call(q, scale, n_threads, check_finite=False)  # the kernel checks q and threshold
    B, Hq, D = q.shape
    ks, vs = _store_list(k_stores, "k_stores", B), _store_list(v_stores, "v_stores", B)
    for b in range(B):
        _check_store_pair(ks[b], vs[b], f"k_stores[{b}]", f"v_stores[{b}]")
    lists = [_int32_lists(_as_cpu_tensor(t, f"lists[{b}]"), f"lists[{b}]") for b, t in enumerate(_seq(lists, B))]
    near, blocks, ranges = (
        _check_ids(_as_cpu_tensor(t, name)) for t, name in ((near, "near"), (blocks, "blocks"), (ranges, "ranges"))
    )
    lse = _as_cpu_tensor(lse, "lse").float().contiguous()
    if cap < 0 or n_count_blocks < 0:
        raise ValueError(f"cap and n_count_blocks must be >= 0, got {cap} and {n_count_blocks}")
    threshold = _per_sequence(threshold, np.float32, "threshold", B)
    qq_limit, qq_prefix = (
        _per_sequence(x, np.int64, name, B) for x, name in ((qq_limit, "qq_limit"), (qq_prefix, "qq_prefix"))
    )
    return host_step_prepared(
        q,
        ks,
        vs,
        lists,
        near,
        blocks,
        ranges,
        lse,
        threshold,
        scale=scale,
        qq_limit=qq_limit,
        qq_prefix=qq_prefix,
        block_size=int(block_size),
        cap=cap,
        n_count_blocks=n_count_blocks,
        lse_from_candidates=bool(lse_from_candidates),
        pin=pin,
        n_threads=n_threads,
        min_chunk=None if min_chunk is None else int(min_chunk),
        scalar=scalar,
    )


def host_step_prepared(
    q: torch.Tensor,
    k_stores: list[torch.Tensor],
    v_stores: list[torch.Tensor],
    lists: list[torch.Tensor],
    near: torch.Tensor,
    blocks: torch.Tensor,
    ranges: torch.Tensor,
    lse: torch.Tensor,
    threshold: np.ndarray,
    *,
    scale: float,
    qq_limit: np.ndarray,
    qq_prefix: np.ndarray,
    block_size: int,
    cap: int,
    n_count_blocks: int,
    lse_from_candidates: bool = False,
    pin: bool = False,
    n_threads: int = 0,
    min_chunk: int | None = None,
    scalar: bool = False,
) -> HostStepResult:
    """`host_step` for inputs already in the kernel's types and layouts (CPU tensors: q and lse fp32,
    near, blocks and ranges int64, lists int32, all contiguous; threshold a float32 array [B], qq_limit
    and qq_prefix int64 arrays [B]), as a
    decode step prepares them (engine.decode.host.read): no conversion and no check in Python, where
    each small torch call costs the step more than it would save; the kernel itself checks every
    shape, dtype, id and value (q finite, no threshold NaN)."""
    B, Hq, D = q.shape
    Hkv = k_stores[0].shape[0] if B else near.shape[1] if near.dim() == 3 else 0  # no store: near [0, Hkv, P] says
    sizes = [B * Hq * D, B * Hq, B * Hkv * n_count_blocks]  # what goes back to the device, in one buffer
    out, lse_out, reads = torch.empty(sum(sizes), pin_memory=pin).split(sizes)
    res = HostStepResult(
        out.view(B, Hq, D),
        lse_out.view(B, Hq),
        torch.empty(B, Hkv, cap, dtype=torch.int64),
        torch.empty(B, Hkv, dtype=torch.int64),
        torch.empty(B, Hkv, dtype=torch.int64),
        reads.view(torch.int32).view(B, Hkv, n_count_blocks),
    )
    _C.host_step(
        _buffer(q),
        [_buffer(k) for k in k_stores],
        [_buffer(v) for v in v_stores],
        [_buffer(t) for t in lists],
        *(_buffer(t) for t in (near, blocks, ranges, lse, *res)),
        threshold,
        STORE_DTYPES[k_stores[0].dtype] if B else "float32",
        scale,
        qq_limit,
        qq_prefix,
        block_size,
        lse_from_candidates,
        n_threads,
        _C.HOST_MIN_CHUNK if min_chunk is None else min_chunk,
        scalar,
    )
    return res


def _per_sequence(x, dtype, name: str, B: int) -> np.ndarray:
    """A number, or one number per sequence (a list, an array, a tensor), as a contiguous [B] array of dtype."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    values = np.asarray(x)
    if values.size and (values.dtype.kind not in "biuf" or (np.dtype(dtype).kind == "i" and values.dtype.kind == "f")):
        raise ValueError(f"{name} must hold {np.dtype(dtype).name} numbers, got {values.dtype}")
    values = values.astype(dtype).reshape(-1)
    values = np.repeat(values, B) if values.size == 1 else np.ascontiguousarray(values)
    if values.shape != (B,):
        raise ValueError(f"{name} must hold one number per sequence (B = {B}); got {x}")
    return values


def _int32_lists(t: torch.Tensor, name: str) -> torch.Tensor:
    """Query->query lists as contiguous int32 (what the kernel reads); ids beyond int32 raise."""
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (int32), got {t.dtype}")
    if t.dtype != torch.int32 and t.numel() and (int(t.max()) >= 2**31 or int(t.min()) < -(2**31)):
        raise ValueError(f"{name} holds ids beyond int32")
    return t.to(torch.int32).contiguous()


def _seq(items, n: int) -> list:
    items = list(items)
    if len(items) != n:
        raise ValueError(f"expected one item per sequence (B = {n}), got {len(items)}")
    return items


def merge_attention(o_a, lse_a, o_b, lse_b):
    """Exact merge of two host-side partial states `(o [H, D], lse [H])`, float32.
    Returns `(o, lse)` of the same kind as the inputs (torch or numpy)."""
    as_numpy = isinstance(o_a, np.ndarray)
    ts = [_as_cpu_tensor(x, n) for x, n in zip((o_a, lse_a, o_b, lse_b), ("o_a", "lse_a", "o_b", "lse_b"))]
    for t, n in zip(ts, ("o_a", "lse_a", "o_b", "lse_b")):
        if t.dtype != torch.float32:
            raise ValueError(f"{n} must be float32, got {t.dtype}")
    ts = [t.contiguous() for t in ts]  # [H, D] / [H]: small
    out, lse = torch.empty_like(ts[0]), torch.empty_like(ts[1])
    if HAS_EXT:
        _C.merge_attention(*(_buffer(t) for t in ts), _buffer(out), _buffer(lse))
    else:
        o, l = merge_states(*ts)
        out.copy_(o)
        lse.copy_(l)
    return (out.numpy(), lse.numpy()) if as_numpy else (out, lse)
