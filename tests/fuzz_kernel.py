"""Fuzzing of the host kernels `gather_attend`, `gather_attend_batch`, `gather_scores`, `host_step`,
`merge_attention` and `query_dots` against references.

    python tests/fuzz_kernel.py --calls 100000 [--seed 0] [--ext build/sanitize]

draws random cases from a seeded RNG, checks every kernel call and prints one
summary line; the exit status is 1 if any call disagreed or raised the wrong
error. `--ext DIR` loads `engine.native._C` from DIR instead of the installed
extension (`make sanitize` passes its ASan/UBSan build). tests/test_fuzz.py
runs the same checks on cases that hypothesis draws.

What is checked, per query head, against the fp64 reference of tests/reference.py:

* an id list with no valid id gives exactly out = 0 and lse = -inf;
* an id outside [-1, N) raises IndexError naming it (also an id that falls in
  a store's spare capacity), a scale that is not a finite float32 ValueError;
* when every fp32 intermediate is in range (dot products, scaled scores and
  the value accumulator below FLT_MAX / 4), out and lse are finite and agree
  with the reference within a bound that scales with the magnitudes: the
  rounding of length-D fp32 dot products, of M-term sums, and of |lse|;
* outside that range (huge q, k or v, huge scale) fp32 cannot carry the
  computation and the fp64 reference is not reproducible: an overflowed dot
  product becomes -inf (its row then weighs 0, so the result may even be finite
  and wrong) or +inf (NaN). There only the first rule is checked, and that the
  call returns; under `make sanitize` also that it stays within its buffers.

`gather_attend_batch` runs B sequences (0 to 5) that share Hkv, G, D, M, the
dtype and the scale, and differ in everything else: each sequence's out and
lse must be bit for bit those of `gather_attend` on it alone (same threads,
same path) and pass the checks above; a bad id in one sequence raises
IndexError naming that sequence.

`gather_scores` runs the gather-attend cases' q, K store and ids: every listed
row's score within (D + 4) eps sum_d |q_d k_d| of the fp64 product (plus a
subnormal floor) when those sums are below FLT_MAX / 4, -inf exactly at padding
always, and the same IndexError for a bad id.

`host_step` runs B sequences (0 to 3) that share Hkv, G, D, the dtype, the list length and the
call's settings (among them a `min_chunk` small enough that a unit's candidates are split over the
two threads' chunks). Per (sequence, KV head) unit the plain reference of tests/reference.py walks the
lists, blocks and ranges to the same candidates and rates them in fp64: the ids read must be the
reference's but for candidates whose rating lies within a rounding bound of the threshold
(`rating_bounds`; all of them where the scores are beyond fp32's range), each once, ascending, -1
after; n_read, n_rated and block_reads must be those of the ids; out and lse must pass the
gather-attend checks above for the ids read; in a batch each sequence's outputs must be the bits of
the same call on it alone. A list row, list entry or block out of range that a unit reaches raises
IndexError naming the sequence and KV head, a range outside [0, N] one naming the sequence, more
ids than `cap` one naming the unit that read them.

`query_dots` (bf16 q [X, G, D] and rows [X, N, D]) must give bf16 scores, each the bf16 rounding of an fp32
sum within (D + 4) eps sum_d |q_d k_d| of the fp64 product where those sums stay below FLT_MAX / 4, also
through the bf16 instructions (where the CPU has them) and widened to fp32 lanes (every CPU), and where
torch's product serves (a D that is no multiple of 32); fp32 rows or rows whose D differs from q's raise
ValueError. `weighted_rows` (bf16 weights [X, G, M] times the rows) is held to the same bound along its M
rows. Both read rows that are a view of a buffer with spare rows, every row or those ids [X, M] name (-1:
row 0); an id outside [-1, N), or any id where N = 0, raises IndexError.

`merge_attention` is checked against an fp64 merge (tight bound) and against
`engine.decode.merge.merge_states`, whose unnormalised weights lose about eps * |lse|,
so that bound grows with |lse|. A side with lse = -inf is exactly the identity,
and lse = +inf or NaN on either side must give a non-finite lse.
"""

from __future__ import annotations

import argparse
import functools
import glob
import importlib.util
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

if not __package__:  # run as a script: the repository root holds `tests`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.reference import HostUnitRef, gather_attend_ref, host_candidates_ref, host_unit_ref

EPS = 2.0**-24  # fp32 unit roundoff
FLT_MAX = float(np.finfo(np.float32).max)
DENORM_FLOOR = 2.0**-140  # absolute slack for results in the fp32 subnormal range
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VARIANTS = [(n_threads, scalar) for n_threads in (1, 2) for scalar in (False, True)]

Pick = Callable[[Sequence], object]  # chooses one element of a sequence


# ------------------------------------------------------------------ gather-attend


@dataclass(frozen=True)
class AttendCase:
    Hkv: int
    G: int
    N: int
    D: int
    M: int
    dtype: str
    spare_k: int  # tokens of spare capacity per head in the K store (strided heads)
    spare_v: int
    pad: float  # fraction of ids that are -1
    repeat: float  # fraction of ids that copy another id of the same row
    q_exp: int  # values are randn * 10**exp, clamped to the dtype's finite range
    k_exp: int
    v_exp: int
    scale: float | None  # None: the default 1 / sqrt(D)
    bad_id: str | None  # an id outside [-1, N) planted at one position
    dirty_out: bool  # pass out/lse buffers filled with NaN: every entry must be written
    seed: int


def draw_attend_case(pick: Pick) -> AttendCase:
    """Shapes around the kernel's edges: D below, at and above multiples of 16 and the vector
    limit 512, G at the vector limit 16, M around the 16-id tile and the 128-id chunk."""
    scales = (None,) * 7 + (1.0, 0.0, -0.7, 1e-3, 30.0, 1e-30, 1e-45, 1e30, 0.125) + (1e39, math.inf, math.nan)
    return AttendCase(
        Hkv=pick((1, 1, 2, 3, 4)),
        G=pick((1, 1, 2, 3, 4, 5, 8, 16, 17)),
        D=pick((1, 2, 7, 8, 15, 16, 17, 24, 32, 33, 48, 64, 64, 80, 96, 128, 128, 144, 512, 528)),
        M=pick((0, 1, 2, 5, 15, 16, 17, 31, 33, 100, 128, 129, 200, 257, 300, 600)),
        dtype=pick(tuple(DTYPES)),
        scale=pick(scales),
        dirty_out=pick((False, True)),
        **_sequence_fields(pick),
    )


def _sequence_fields(pick: Pick) -> dict:
    """The fields of an AttendCase that may differ between the sequences of a batched call."""
    magnitudes = (0, 0, 0, 0, 0, 0, -40, -20, -8, -3, 3, 8, 15, 30)
    return dict(
        N=pick((0, 1, 1, 2, 3, 5, 16, 17, 31, 64, 100, 127, 128, 129, 200, 300, 513, 1000)),
        spare_k=pick((0, 0, 1, 7, 64)),
        spare_v=pick((0, 0, 1, 7, 64)),
        pad=pick((0.0, 0.0, 0.1, 0.5, 0.9, 1.0)),
        repeat=pick((0.0, 0.0, 0.3, 0.9)),
        q_exp=pick(magnitudes),
        k_exp=pick(magnitudes),
        v_exp=pick(magnitudes),
        bad_id=pick((None,) * 30 + ("N", "capacity", "huge", "-2", "-huge")),
        seed=pick(range(2**31)),
    )


def _values(shape, exp: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """randn * 10**exp in fp32, clamped to dtype's finite range, then cast."""
    x = torch.randn(shape, generator=g) * 10.0**exp
    big = float(torch.finfo(dtype).max)
    return x.clamp(-big, big).to(dtype)


def make_attend_inputs(c: AttendCase):
    """q [Hkv * G, D] fp32; k, v [Hkv, N, D] views of [Hkv, N + spare, D] stores; ids [Hkv, M] int64."""
    g = torch.Generator().manual_seed(c.seed)
    dtype = DTYPES[c.dtype]
    q = _values((c.Hkv * c.G, c.D), c.q_exp, torch.float32, g)
    k = _values((c.Hkv, c.N + c.spare_k, c.D), c.k_exp, dtype, g)[:, : c.N]
    v = _values((c.Hkv, c.N + c.spare_v, c.D), c.v_exp, dtype, g)[:, : c.N]
    ids = torch.randint(0, max(c.N, 1), (c.Hkv, c.M), generator=g)
    if c.M > 1:  # copy ids across the row so that some are listed several times
        src = torch.randint(0, c.M, (c.Hkv, c.M), generator=g)
        copy = torch.rand(c.Hkv, c.M, generator=g) < c.repeat
        ids = torch.where(copy, ids.gather(1, src), ids)
    ids[torch.rand(c.Hkv, c.M, generator=g) < c.pad] = -1
    if c.N == 0:
        ids.fill_(-1)
    if c.bad_id is not None and c.M > 0:
        last_spare = c.N + max(c.spare_k, 1) - 1  # still inside the K store's memory when spare_k > 0
        bad = {"N": c.N, "capacity": last_spare, "huge": 2**62, "-2": -2, "-huge": -(2**62)}[c.bad_id]
        pos = int(torch.randint(0, c.Hkv * c.M, (1,), generator=g))
        ids.view(-1)[pos] = bad
    return q, k, v, ids


def effective_scale(c: AttendCase) -> float:
    """The scale as the kernel sees it: a float32."""
    return float(np.float32(1 / math.sqrt(c.D) if c.scale is None else c.scale))


@dataclass(frozen=True)
class Reference:
    """The fp64 result of one case, and bounds of the fp32 intermediates of computing it."""

    out: torch.Tensor  # [Hq, D] fp64
    lse: torch.Tensor  # [Hq] fp64
    ids: torch.Tensor  # [Hkv, M]
    scale: float  # as the kernel sees it
    P: float  # max over query heads and listed rows of sum_d |q_d k_d|
    V: float  # max |v| over listed rows

    @property
    def in_fp32_range(self) -> bool:
        """Dot products, scaled scores and the value accumulator (<= M * V) all below FLT_MAX / 4."""
        M = self.ids.shape[1]
        return max(self.P, abs(self.scale) * self.P, (M + 1) * self.V) < FLT_MAX / 4


def attend_reference(q, k, v, ids, scale: float) -> Reference:
    """q [Hkv * G, D], k/v [Hkv, N, D], ids [Hkv, M] -> the Reference of that call."""
    out, lse = gather_attend_ref(q, k, v, ids, scale)
    valid = ids >= 0
    if not bool(valid.any()):
        return Reference(out, lse, ids, scale, 0.0, 0.0)
    Hkv, D = k.shape[0], k.shape[2]
    heads = torch.arange(Hkv).unsqueeze(1)
    kr = k[heads, ids.clamp_min(0)].double().abs()  # [Hkv, M, D]
    vr = v[heads, ids.clamp_min(0)].double().abs()
    dots = torch.bmm(q.double().abs().view(Hkv, -1, D), kr.transpose(1, 2))  # [Hkv, G, M]
    P = float(dots.masked_fill(~valid.unsqueeze(1), 0).max()) if dots.numel() else 0.0
    return Reference(out, lse, ids, scale, P, float(vr[valid].max()))


def check_attend_result(out, lse, ref: Reference) -> str | None:
    """None if (out [Hq, D], lse [Hq]) from the kernel agrees with the reference under the
    rules in the module docstring, else a one-line description of the first disagreement."""
    D, (Hkv, M) = out.shape[1], ref.ids.shape
    G = out.shape[0] // Hkv
    err_s = (D + 4) * EPS * abs(ref.scale) * ref.P  # bound on the rounding of one fp32 score
    sum_err = 8 * EPS * (M + 16)  # the exp, the M-term sums, the chunk merge and the division
    out64, lse64 = out.double(), lse.double()
    empty = ~(ref.ids >= 0).any(dim=1)  # [Hkv]
    for hq in range(out.shape[0]):
        o, l, ro, rl = out64[hq], float(lse64[hq]), ref.out[hq], float(ref.lse[hq])
        if bool(empty[hq // G]):
            if not (bool((o == 0).all()) and l == -math.inf):
                return f"head {hq}: no valid id but out != 0 or lse = {l} != -inf"
            continue
        if not ref.in_fp32_range:
            continue  # fp32 cannot carry it: the values are unspecified, the call must only return
        if not (math.isfinite(l) and bool(torch.isfinite(o).all())):
            return f"head {hq}: non-finite result (lse {l}) although every intermediate fits fp32"
        tol_lse = 2 * err_s + sum_err + 2 * EPS * abs(rl) + 1e-6
        tol_out = ref.V * (4 * err_s + sum_err) + (M + 1) * DENORM_FLOOR
        err_lse, err_out = abs(l - rl), float((o - ro).abs().max())
        if not err_lse <= tol_lse:
            return f"head {hq}: |lse - ref| = {err_lse:.3g} > {tol_lse:.3g} (lse {l:.6g}, ref {rl:.6g})"
        if not err_out <= tol_out:
            return f"head {hq}: max |out - ref| = {err_out:.3g} > {tol_out:.3g}"
    return None


def _scale_error(c: AttendCase):
    """(ValueError, message part) when the scale is not a finite float32, else None."""
    scale = 1 / math.sqrt(c.D) if c.scale is None else c.scale
    return None if math.isfinite(scale) and abs(scale) <= FLT_MAX else (ValueError, "scale")


def _id_error(c: AttendCase, ids: torch.Tensor, lead: str = ""):
    """(IndexError, message part) naming the first id of ids [Hkv, M] outside [-1, N), else None;
    `lead` prefixes its index (the sequence of a batched call)."""
    bad = ((ids < -1) | (ids >= c.N)).view(-1).nonzero()
    if not len(bad):
        return None
    pos = int(bad[0])
    return IndexError, f"ids[{lead}{pos // c.M}, {pos % c.M}] = {int(ids.view(-1)[pos])} is outside [-1, {c.N})"


def _out_kw(c: AttendCase, q_shape, n_threads: int, scalar: bool) -> dict:
    """Keyword arguments of one call; dirty output buffers are NaN, so every entry must be written."""
    kw = {"n_threads": n_threads, "scalar": scalar}
    if c.dirty_out:
        kw["out"] = torch.full(q_shape, math.nan)
        kw["lse"] = torch.full(q_shape[:-1], math.nan)
    return kw


def _run_variants(name: str, call, expected, check) -> tuple[Counter, list[str]]:
    """call(n_threads, scalar) -> (out, lse) with 1 and 2 threads, vector and scalar paths. Each call
    must raise `expected` (type, message part) when given, else pass check(out, lse, n_threads,
    scalar) -> (outcome, problem or None). `expected` may also be a list of such outcomes, any of
    which is right (None in it: returning is one). Returns (calls by outcome, problems found)."""
    outcomes, problems = Counter(), []
    allowed = expected if isinstance(expected, list) else [expected]
    errors = [e for e in allowed if e is not None]
    for n_threads, scalar in VARIANTS:
        where = f"{name} n_threads={n_threads} scalar={scalar}"
        try:
            out, lse = call(n_threads, scalar)
        except Exception as exc:  # noqa: BLE001 - every exception is a finding unless expected
            if not any(isinstance(exc, kind) and part in str(exc) for kind, part in errors):
                outcomes["mismatch"] += 1
                problems.append(f"{where}: raised {type(exc).__name__}: {exc} (expected {_shown(expected)})")
            else:
                outcomes["raised"] += 1
            continue
        if None not in allowed:
            outcomes["mismatch"] += 1
            problems.append(f"{where}: returned instead of raising {_shown(expected)}")
            continue
        outcome, problem = check(out, lse, n_threads, scalar)
        outcomes[outcome] += 1
        if problem:
            problems.append(f"{where}: {problem}")
    return outcomes, problems


def _shown(expected) -> str:
    """An expected outcome or list of them, short: (type name, message part) each."""
    allowed = expected if isinstance(expected, list) else [expected]
    shown = [None if e is None else (e[0].__name__, e[1]) for e in allowed[:3]]
    return str(shown[0] if len(allowed) == 1 else shown + ["..."] * (len(allowed) > 3))


def _outcome(refs) -> str:
    return "compared" if all(r.in_fp32_range for r in refs) else "beyond fp32"


def run_attend_case(ops, c: AttendCase) -> tuple[Counter, list[str]]:
    """Runs the case with 1 and 2 threads, vector and scalar paths.
    Returns (calls by outcome, problems found)."""
    q, k, v, ids = make_attend_inputs(c)
    reference = functools.cache(lambda: attend_reference(q, k, v, ids, effective_scale(c)))

    def call(n_threads, scalar):
        return ops.gather_attend(q, k, v, ids, c.scale, **_out_kw(c, q.shape, n_threads, scalar))

    def check(out, lse, n_threads, scalar):
        return _outcome([reference()]), check_attend_result(out, lse, reference())

    return _run_variants(str(c), call, _scale_error(c) or _id_error(c, ids), check)


def check_scores_result(s, q, k, ids) -> tuple[str, str | None]:
    """(outcome, None or the first disagreement) for gather_scores' s [Hq, M] (see the module doc)."""
    Hkv, M = ids.shape
    D = k.shape[2]
    heads = torch.arange(Hkv).unsqueeze(1)
    rows = k[heads, ids.clamp_min(0)].double() if k.shape[1] else torch.zeros(Hkv, M, D, dtype=torch.float64)
    qd = q.double().view(Hkv, -1, D)
    ref = torch.bmm(qd, rows.transpose(1, 2)).reshape(q.shape[0], M)  # [Hq, M]
    P = torch.bmm(qd.abs(), rows.abs().transpose(1, 2)).reshape(q.shape[0], M)
    pad = (ids < 0).repeat_interleave(q.shape[0] // Hkv, dim=0)
    if s.shape != ref.shape:
        return "compared", f"shape {tuple(s.shape)}, expected {tuple(ref.shape)}"
    if not bool(torch.isneginf(s[pad]).all()):
        return "compared", "padding not scored -inf"
    listed = ~pad
    if bool(listed.any()) and float(P[listed].max()) >= FLT_MAX / 4:
        return "beyond fp32", None
    err = (s.double() - ref).abs()
    bound = (D + 4) * EPS * P + DENORM_FLOOR
    bad = listed & ~(err <= bound)  # NaN counts as bad
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        got, want, tol = float(s[i, j]), float(ref[i, j]), float(bound[i, j])
        return "compared", f"score[{i}, {j}] = {got}, reference {want} (bound {tol})"
    return "compared", None


def run_scores_case(ops, c: AttendCase) -> tuple[Counter, list[str]]:
    """gather_scores on a gather-attend case's q, K store and ids (its V, scale and output buffers aside)."""
    q, k, _, ids = make_attend_inputs(c)

    def call(n_threads, scalar):
        return ops.gather_scores(q, k, ids, n_threads=n_threads, scalar=scalar), None

    def check(s, _, n_threads, scalar):
        return check_scores_result(s, q, k, ids)

    return _run_variants(f"gather_scores {c}", call, _id_error(c, ids), check)


# ------------------------------------------------------------ batched gather-attend


@dataclass(frozen=True)
class BatchCase:
    """One gather_attend_batch call over len(seqs) sequences (0 included)."""

    shared: AttendCase  # Hkv, G, D, M, dtype, scale and dirty_out of every sequence
    seqs: tuple[AttendCase, ...]  # each sequence's own store length, spare capacity, ids and values


def draw_batch_case(pick: Pick) -> BatchCase:
    """B sequences around the kernel's edges; at most one of them plants a bad id."""
    shared = draw_attend_case(pick)
    B = pick((0, 1, 2, 2, 3, 5))
    seqs = [shared] + [replace(shared, **_sequence_fields(pick)) for _ in range(B - 1)]
    bad_at = pick(range(max(B, 1)))
    return BatchCase(shared, tuple(s if b == bad_at else replace(s, bad_id=None) for b, s in enumerate(seqs[:B])))


def make_batch_inputs(c: BatchCase):
    """q [B, Hq, D] fp32; B stores [Hkv, N_b, D] (views with spare capacity); ids [B, Hkv, M] int64."""
    parts = [make_attend_inputs(s) for s in c.seqs]
    s = c.shared
    q = torch.stack([p[0] for p in parts]) if parts else torch.zeros(0, s.Hkv * s.G, s.D)
    ids = torch.stack([p[3] for p in parts]) if parts else torch.zeros(0, s.Hkv, s.M, dtype=torch.int64)
    return q, [p[1] for p in parts], [p[2] for p in parts], ids


def _batch_id_error(c: BatchCase, ids: torch.Tensor):
    """The IndexError of the first sequence with a bad id, naming that sequence."""
    for b, s in enumerate(c.seqs):
        error = _id_error(s, ids[b], lead=f"{b}, ")
        if error:
            return IndexError, f"sequence {b}: {error[1]}"
    return None


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of fp32 tensors (NaNs included)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def run_batch_case(ops, c: BatchCase) -> tuple[Counter, list[str]]:
    """The batched call with 1 and 2 threads, vector and scalar paths: every sequence's result must
    have the bits of gather_attend on that sequence alone, and pass the reference check.
    Returns (calls of gather_attend_batch by outcome, problems found)."""
    q, ks, vs, ids = make_batch_inputs(c)
    refs = functools.cache(
        lambda: [attend_reference(q[b], ks[b], vs[b], ids[b], effective_scale(s)) for b, s in enumerate(c.seqs)]
    )

    def call(n_threads, scalar):
        return ops.gather_attend_batch(q, ks, vs, ids, c.shared.scale, **_out_kw(c.shared, q.shape, n_threads, scalar))

    def check(out, lse, n_threads, scalar):
        if out.shape != q.shape or lse.shape != q.shape[:2]:
            return "mismatch", f"shapes {tuple(out.shape)}, {tuple(lse.shape)} for q {tuple(q.shape)}"
        kw = {"n_threads": n_threads, "scalar": scalar}
        for b, ref in enumerate(refs()):
            try:
                single = ops.gather_attend(q[b], ks[b], vs[b], ids[b], c.shared.scale, **kw)
            except Exception as exc:  # noqa: BLE001 - a finding, not a crash of the fuzzer
                return "mismatch", f"sequence {b} alone raised {type(exc).__name__}: {exc}"
            if not (_same_bits(out[b], single[0]) and _same_bits(lse[b], single[1])):
                return _outcome(refs()), f"sequence {b}: not the bits of its single-sequence call"
            problem = check_attend_result(out[b], lse[b], ref)
            if problem:
                return _outcome(refs()), f"sequence {b}: {problem}"
        return _outcome(refs()), None

    expected = _scale_error(c.shared) or _batch_id_error(c, ids)
    return _run_variants(f"{c.shared} B={len(c.seqs)} N={[s.N for s in c.seqs]}", call, expected, check)


# -------------------------------------------------------------------- host_step


@dataclass(frozen=True)
class HostSeq:
    """One sequence of a host_step call: its stores, lists, proposals, ranges and rating."""

    N: int
    spare_k: int
    spare_v: int
    list_rows: int
    entry_pad: float  # fraction of list entries that are -1
    entry_repeat: float  # fraction of list entries that copy another of their row
    near_pad: float  # fraction of proposed list rows that are -1
    near_repeat: float
    block_pad: float  # fraction of chosen blocks that are -1
    qq_limit: int  # distinct list proposals taken (each sequence its own, as its context grows its budget)
    qq_prefix: int  # list entries looked at
    ranges: tuple[str, str, str]  # how the tail, recent and forced [begin, end) are drawn (RANGE_KINDS)
    threshold: float  # as drawn; the kernel takes it as a float32
    lse_kind: str  # how the given lse is drawn (HOST_LSE_KINDS)
    q_exp: int
    k_exp: int
    v_exp: int
    seed: int


@dataclass(frozen=True)
class HostStepCase:
    """One host_step call over len(seqs) sequences (0 included)."""

    Hkv: int
    G: int
    D: int
    dtype: str
    list_len: int
    empty_list_len: int  # the last dimension of lists without rows (they hold nothing: any length)
    n_near: int
    n_chosen: int
    block_size: int
    lse_from_candidates: bool
    min_chunk: int | None  # the fewest candidates a chunk takes where a unit is split over threads (None: the default)
    scale: float | None
    cap: str  # "exact" (the most a unit may read), "roomy", or "small" (below what a unit surely reads)
    count_blocks: str  # blocks block_reads counts: "none", "some", "all" (of the longest store), "more"
    bad: str | None  # "what:value", an input out of range planted in sequence bad_at (BAD_HOST_INPUTS)
    bad_at: int
    seqs: tuple[HostSeq, ...]


RANGE_KINDS = ("empty", "empty", "inner", "to end", "all", "start")
HOST_LSE_KINDS = ("-inf", "zero", "near", "near", "near", "huge", "-huge")
THRESHOLDS = (-math.inf,) * 3 + (0.0, 1e-45, 1e-38, 1e-20, 1e-6, 1e-4, 1e-3, 1e-3, 0.01, 0.05, 0.3, 1.0, 10.0)
THRESHOLDS += (1e30, FLT_MAX, math.inf)
BAD_HOST_INPUTS = {
    "row": {"rows": None, "-2": -2, "huge": 2**62},  # None: the list's row count
    "entry": {"N": None, "-2": -2, "int32 max": 2**31 - 1, "int32 min": -(2**31)},
    "block": {"N": None, "-2": -2, "huge": 2**62, "int64 max": 2**63 - 1},  # None: the first block not full
    "range": {"past N": None, "reversed": None, "negative": None},
}


def draw_host_case(pick: Pick) -> HostStepCase:
    """Shapes around the kernel's edges (G and D as for gather-attend, block sizes that do and do
    not divide N, limits and prefixes that cut the lists anywhere), now and then an input out of
    range (one unit's list row, list entry or block, one sequence's range) or a cap too small."""
    B = pick((0, 1, 1, 2, 2, 3))
    bad = pick((None,) * 50 + tuple(f"{what}:{value}" for what, values in BAD_HOST_INPUTS.items() for value in values))
    return HostStepCase(
        Hkv=pick((1, 1, 2, 3, 4)),
        G=pick((1, 1, 2, 3, 4, 5, 8, 16, 17)),
        D=pick((1, 2, 7, 8, 15, 16, 17, 32, 33, 64, 64, 80, 128, 144, 512, 528)),
        dtype=pick(tuple(DTYPES)),
        list_len=pick((0, 1, 2, 5, 8, 16, 33)),
        empty_list_len=pick((0, 1, 7)),
        n_near=pick((0, 1, 2, 3, 6)),
        n_chosen=pick((0, 1, 2, 5)),
        block_size=pick((1, 2, 3, 8, 16, 64)),
        lse_from_candidates=pick((False, True)),
        min_chunk=pick((None, None, 1, 7, 64)),
        scale=pick((None,) * 6 + (1.0, 0.125, 0.0, -0.7, 1e-3, 30.0, 1e-30, 1e30)),
        cap=pick(("exact",) * 3 + ("roomy",) * 6 + ("small",)),
        count_blocks=pick(("none", "some", "all", "more")),
        bad=bad,
        bad_at=pick(range(max(B, 1))),
        seqs=tuple(_draw_host_seq(pick) for _ in range(B)),
    )


def _draw_host_seq(pick: Pick) -> HostSeq:
    magnitudes = (0, 0, 0, 0, 0, 0, -20, -3, 3, 8, 15, 30)
    return HostSeq(
        N=pick((0, 1, 2, 3, 16, 17, 31, 64, 100, 129, 300, 1000)),
        spare_k=pick((0, 0, 1, 64)),
        spare_v=pick((0, 0, 1, 64)),
        list_rows=pick((0, 0, 1, 2, 5, 40)),
        entry_pad=pick((0.0, 0.0, 0.2, 0.9)),
        entry_repeat=pick((0.0, 0.3, 0.9)),
        near_pad=pick((0.0, 0.0, 0.3, 1.0)),
        near_repeat=pick((0.0, 0.5)),
        block_pad=pick((0.0, 0.3, 1.0)),
        qq_limit=pick((0, 1, 3, 8, 40, 10**6)),
        qq_prefix=pick((0, 1, 4, 16, 64, 10**6)),
        ranges=(pick(RANGE_KINDS), pick(RANGE_KINDS), pick(RANGE_KINDS)),
        threshold=pick(THRESHOLDS),
        lse_kind=pick(HOST_LSE_KINDS),
        q_exp=pick(magnitudes),
        k_exp=pick(magnitudes),
        v_exp=pick(magnitudes),
        seed=pick(range(2**31)),
    )


class HostInputs(NamedTuple):
    """A case's tensors, as host_step takes them (cap and n_count_blocks apart)."""

    q: torch.Tensor  # [B, Hq, D] fp32
    ks: list[torch.Tensor]  # B stores [Hkv, N_b, D] (views with spare capacity)
    vs: list[torch.Tensor]
    lists: list[torch.Tensor]  # B [Hkv, rows_b, L] int32
    near: torch.Tensor  # [B, Hkv, P] int64
    blocks: torch.Tensor  # [B, Hkv, T] int64
    ranges: torch.Tensor  # [B, 3, 2] int64
    lse: torch.Tensor  # [B, Hq] fp32
    threshold: torch.Tensor  # [B] fp32
    scale: float  # as the kernel sees it


def host_scale(c: HostStepCase) -> float:
    return float(np.float32(1 / math.sqrt(c.D) if c.scale is None else c.scale))


def _id_rows(shape, n: int, pad: float, repeat: float, g: torch.Generator) -> torch.Tensor:
    """int64 ids in [0, n) of `shape`, some copying another of their row (the last dimension), some -1."""
    if math.prod(shape) == 0:
        return torch.zeros(shape, dtype=torch.int64)
    rows = torch.randint(0, max(n, 1), shape, generator=g).view(-1, shape[-1])
    if shape[-1] > 1:
        src = torch.randint(0, shape[-1], rows.shape, generator=g)
        rows = torch.where(torch.rand(rows.shape, generator=g) < repeat, rows.gather(1, src), rows)
    rows[torch.rand(rows.shape, generator=g) < pad] = -1
    if n == 0:
        rows.fill_(-1)
    return rows.view(shape)


def _draw_range(kind: str, n: int, g: torch.Generator) -> list[int]:
    a, b = sorted(int(x) for x in torch.randint(0, n + 1, (2,), generator=g))
    return {"empty": [a, a], "inner": [a, b], "to end": [a, n], "all": [0, n], "start": [0, b]}[kind]


def _given_lse(kind: str, q: torch.Tensor, k: torch.Tensor, scale: float, g: torch.Generator) -> torch.Tensor:
    """lse [Hq] of a kind: "near" is the log-sum-exp of the whole store's scores (plus noise), so
    that the ratings are the store's attention probabilities, spread around the thresholds."""
    Hkv, N, D = k.shape
    noise = torch.randn(q.shape[0], generator=g, dtype=torch.float64)
    if kind == "near":
        s = torch.bmm(q.double().view(Hkv, -1, D), k.double().transpose(1, 2)) * scale  # [Hkv, G, N]
        lse = torch.logsumexp(s, dim=-1).view(-1) + 2 * noise if N else noise
        return lse.nan_to_num(posinf=FLT_MAX).clamp(-FLT_MAX, FLT_MAX).float()
    return torch.full(q.shape[:1], {"-inf": -math.inf, "zero": 0.0, "huge": 1e30, "-huge": -1e30}[kind])


def make_host_inputs(c: HostStepCase) -> HostInputs:
    """The case's tensors, each sequence from its own seed, with the bad input planted."""
    scale, Hq = host_scale(c), c.Hkv * c.G
    parts = []
    for s in c.seqs:
        g = torch.Generator().manual_seed(s.seed)
        q = _values((Hq, c.D), s.q_exp, torch.float32, g)
        k = _values((c.Hkv, s.N + s.spare_k, c.D), s.k_exp, DTYPES[c.dtype], g)[:, : s.N]
        v = _values((c.Hkv, s.N + s.spare_v, c.D), s.v_exp, DTYPES[c.dtype], g)[:, : s.N]
        L = c.list_len if s.list_rows else c.empty_list_len
        lists = _id_rows((c.Hkv, s.list_rows, L), s.N, s.entry_pad, s.entry_repeat, g).to(torch.int32)
        near = _id_rows((c.Hkv, c.n_near), s.list_rows, s.near_pad, s.near_repeat, g)
        blocks = _id_rows((c.Hkv, c.n_chosen), s.N // c.block_size, s.block_pad, 0.3, g)
        ranges = torch.tensor([_draw_range(kind, s.N, g) for kind in s.ranges])
        lse = _given_lse(s.lse_kind, q, k, scale, g)
        parts.append([q, k, v, lists, near, blocks, ranges, lse])
    if c.bad and c.seqs:
        _plant(c, parts[c.bad_at], torch.Generator().manual_seed(c.seqs[c.bad_at].seed + 1))
    B, P, T = len(c.seqs), c.n_near, c.n_chosen

    def stacked(i: int, empty_shape, dtype=torch.float32) -> torch.Tensor:
        return torch.stack([p[i] for p in parts]) if parts else torch.zeros(empty_shape, dtype=dtype)

    return HostInputs(
        q=stacked(0, (0, Hq, c.D)),
        ks=[p[1] for p in parts],
        vs=[p[2] for p in parts],
        lists=[p[3] for p in parts],
        near=stacked(4, (0, c.Hkv, P), torch.int64),
        blocks=stacked(5, (0, c.Hkv, T), torch.int64),
        ranges=stacked(6, (0, 3, 2), torch.int64),
        lse=stacked(7, (0, Hq)),
        threshold=torch.tensor([s.threshold for s in c.seqs], dtype=torch.float32).view(B),
        scale=scale,
    )


def _plant(c: HostStepCase, part: list, g: torch.Generator) -> None:
    """Puts the case's bad input into one sequence's tensors, where a unit is likely to reach it."""
    _, _, _, lists, near, blocks, ranges, _ = part
    what, name = c.bad.split(":")
    value = BAD_HOST_INPUTS[what][name]
    N, h = part[1].shape[1], int(torch.randint(0, c.Hkv, (1,), generator=g))
    if what == "row" and c.n_near:
        near[h, int(torch.randint(0, min(c.n_near, 2), (1,), generator=g))] = lists.shape[1] if value is None else value
    elif what == "entry" and lists.shape[2]:
        rows = [r for r in near[h].tolist() if r >= 0]
        if rows:  # the first row the unit walks, near its start
            lists[h, rows[0], int(torch.randint(0, min(lists.shape[2], 3), (1,), generator=g))] = (
                N if value is None else value
            )
    elif what == "block" and c.n_chosen:
        blocks[h, int(torch.randint(0, c.n_chosen, (1,), generator=g))] = N // c.block_size if value is None else value
    elif what == "range":
        which, a = int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(0, N + 1, (1,), generator=g))
        ranges[which] = torch.tensor({"past N": [a, N + 1], "reversed": [a + 1, a], "negative": [-1, a]}[name])


@dataclass(frozen=True)
class UnitExpect:
    """What one (sequence, KV head) unit must do: raise `error`, or read every id of `sure` and
    none outside sure | unsure, the latter being the candidates whose rating lies within a
    rounding bound of the threshold (all of them where the rating is beyond fp32's range)."""

    error: str | None  # the message part naming a list row, list entry or block out of range
    sure: frozenset[int] = frozenset()
    unsure: frozenset[int] = frozenset()
    n_rated: int = 0
    rated_in_fp32: bool = True
    ratings: dict | None = None  # candidate -> fp64 rating, to explain a disagreement
    threshold: float = 0.0

    def why(self, i: int) -> str:
        if self.ratings is None or i not in self.ratings:
            return "not a candidate" if i not in self.sure else "forced"
        return f"fp64 rating {self.ratings[i]:.9g}, threshold {self.threshold:.9g}"


def rating_bounds(u: HostUnitRef, q, k, scale: float, lse_from_candidates: bool):
    """(lo, hi) [C] fp32 that hold the kernel's fp32 rating of each candidate of u, or None when the
    rating is beyond fp32's range (a dot product or a scaled score above FLT_MAX / 4).

    The kernel's x = scale * q . k - lse is off from u's fp64 one by at most dx: the score by
    (D + 4) eps sum_d |q_d k_d| (gather_scores' bound) plus the scale's rounding; a log-denominator
    completed with the candidates' scores by twice the largest of those, the C-term sum and a few
    eps |lse|; the subtraction by eps |x|; dx is twice their sum. Its terms exp(x) then lie within
    [exp(x - dx), exp(x + dx)] widened by expf's own error (and DENORM_FLOOR: below fp32's normal
    range a rounding step is absolute), rounded to fp32 (to nearest, which
    is monotone: subnormal and overflowing terms included), and its group mean is the fp32 sum of
    G terms divided by G, so summing and dividing both ends the same way in fp32 bounds it."""
    C, G, D = len(u.candidates), q.shape[0], q.shape[1]
    if C == 0:
        return torch.zeros(0), torch.zeros(0)
    P = q.double().abs() @ k[torch.tensor(u.candidates)].double().abs().T  # [G, C]
    if max(float(P.max()), abs(scale) * float(P.max())) >= FLT_MAX / 4:
        return None
    err_s = abs(scale) * ((D + 5) * EPS * P + DENORM_FLOOR) + DENORM_FLOOR  # [G, C]
    err_lse = torch.zeros(G, dtype=torch.float64)
    if lse_from_candidates:
        err_lse = 2 * err_s.max(dim=1).values + (2 * C + 16) * EPS + 4 * EPS * u.lse.abs()
    x = u.scores - u.lse.unsqueeze(1)  # [G, C]
    dx = 2 * (err_s + err_lse.unsqueeze(1) + 2 * EPS * x.abs())
    exact_inf = torch.isposinf(x)  # lse = -inf: the kernel's exp is +inf too
    inf = torch.full_like(x, math.inf)
    # expf's error is relative, but absolute (a subnormal step) where its result is subnormal
    term_lo = torch.where(exact_inf, inf, (torch.exp(x - dx) * (1 - 4 * EPS) - DENORM_FLOOR).clamp_min(0)).float()
    term_hi = torch.where(exact_inf, inf, torch.exp(x + dx) * (1 + 4 * EPS) + DENORM_FLOOR).float()  # [G, C]
    lo, hi = torch.zeros(C), torch.zeros(C)
    for g in range(G):  # in the kernel's order, in fp32
        lo, hi = lo + term_lo[g], hi + term_hi[g]
    return lo / G, hi / G


def _range_error(c: HostStepCase, x: HostInputs) -> str | None:
    """The message part of the first range outside [0, N] (checked before any unit runs)."""
    for b, s in enumerate(c.seqs):
        for begin, end in x.ranges[b].tolist():
            if not 0 <= begin <= end <= s.N:
                return f"sequence {b}: range [{begin}, {end}) is not within [0, {s.N}]"
    return None


def unit_expect(c: HostStepCase, x: HostInputs, b: int, h: int) -> UnitExpect:
    s, G = c.seqs[b], c.G
    try:
        candidates = host_candidates_ref(
            x.lists[b][h],
            x.near[b, h],
            x.blocks[b, h],
            x.ranges[b],
            s.N,
            qq_limit=s.qq_limit,
            qq_prefix=s.qq_prefix,
            block_size=c.block_size,
        )
    except IndexError as exc:
        return UnitExpect(error=f"sequence {b}, KV head {h}: {exc}")
    q, lse, threshold = x.q[b, h * G : (h + 1) * G], x.lse[b, h * G : (h + 1) * G], float(x.threshold[b])
    forced = x.ranges[b, 2].tolist()
    ref = host_unit_ref(q, x.ks[b][h], candidates, forced, lse, x.scale, threshold, c.lse_from_candidates)
    forced_ids = frozenset(range(*forced))
    ratings = dict(zip(candidates, ref.p.tolist()))
    if threshold == -math.inf:  # no rating: exactly the candidates and the forced range
        return UnitExpect(None, frozenset(ref.read), ratings=ratings, threshold=threshold)
    bounds = rating_bounds(ref, q, x.ks[b][h], x.scale, c.lse_from_candidates)
    if bounds is None:
        return UnitExpect(None, forced_ids, frozenset(candidates) - forced_ids, ref.n_rated, False, ratings, threshold)
    lo, hi = (t.tolist() for t in bounds)
    sure = {i for i, low in zip(candidates, lo) if threshold <= low}
    unsure = {i for i, low, high in zip(candidates, lo, hi) if not threshold <= low and not threshold > high}
    return UnitExpect(
        None, frozenset(sure) | forced_ids, frozenset(unsure) - forced_ids, ref.n_rated, True, ratings, threshold
    )


def host_sizes(c: HostStepCase, units: list[list[UnitExpect]]) -> tuple[int, int]:
    """(cap, n_count_blocks) of the case: cap from what the units may read."""
    ok = [u for row in units for u in row if u.error is None]
    most = max((len(u.sure) + len(u.unsure) for u in ok), default=0)
    least = max((len(u.sure) for u in ok), default=0)
    cap = {"exact": most, "roomy": 2 * most + 3, "small": max(0, least - 1)}[c.cap]
    n_blocks = -(-max((s.N for s in c.seqs), default=0) // c.block_size)
    return cap, {"none": 0, "some": max(1, n_blocks // 2), "all": n_blocks, "more": n_blocks + 3}[c.count_blocks]


def host_expected(range_error: str | None, units: list[list[UnitExpect]], cap: int):
    """What the call may do, as _run_variants takes it: the kernel checks the ranges first, then
    throws the error of the first unit (in sequence, KV head order) that had one: a row, entry or
    block out of range, or more ids read than `cap` (which, with ratings near the threshold, a
    unit may or may not reach)."""
    if range_error:
        return IndexError, range_error
    allowed = []
    for b, row in enumerate(units):
        for h, u in enumerate(row):
            if u.error:
                return allowed + [(IndexError, u.error)]
            least, most = len(u.sure), len(u.sure) + len(u.unsure)
            for n in range(max(least, cap + 1), most + 1):
                allowed.append((IndexError, f"sequence {b}, KV head {h}: {n} ids read exceed cap {cap}"))
            if least > cap:
                return allowed
    return None if not allowed else allowed + [None]


def check_host_unit(ids, n_read: int, n_rated: int, counts, u: UnitExpect, block_size: int, N: int) -> str | None:
    """None if one unit's ids [cap], n_read, n_rated and block_reads [n_count_blocks] are right."""
    row = ids.tolist()
    if not 0 <= n_read <= len(row):
        return f"n_read {n_read} is outside [0, cap = {len(row)}]"
    read = row[:n_read]
    if any(i != -1 for i in row[n_read:]):
        return f"an id after the first n_read = {n_read} is not -1: {row[n_read:][:8]}"
    if any(not 0 <= i < N for i in read):
        return f"an id read is outside [0, {N}): {[i for i in read if not 0 <= i < N][:4]}"
    if any(a >= b for a, b in zip(read, read[1:])):
        return "the ids read are not strictly ascending (an id twice, or out of order)"
    if n_rated != u.n_rated:
        return f"n_rated = {n_rated}, expected {u.n_rated}"
    got = set(read)
    for i in sorted(u.sure - got):
        return f"id {i} not read ({u.why(i)})"
    for i in sorted(got - u.sure - u.unsure):
        return f"id {i} read ({u.why(i)})"
    expected = [0] * len(counts)
    for i in read:
        if i // block_size < len(expected):
            expected[i // block_size] += 1
    if counts.tolist() != expected:
        return f"block_reads {counts.tolist()[:8]}.. are not the counts of the ids read {expected[:8]}.."
    return None


def _host_call(ops, c: HostStepCase, x: HostInputs, cap: int, n_count: int, n_threads: int, scalar: bool, seqs=None):
    """host_step on the case's sequences, or on the slice `seqs` of them."""
    s = slice(None) if seqs is None else seqs
    return ops.host_step(
        x.q[s],
        x.ks[s],
        x.vs[s],
        x.lists[s],
        x.near[s],
        x.blocks[s],
        x.ranges[s],
        x.lse[s],
        scale=x.scale,
        threshold=x.threshold[s],
        qq_limit=np.array([seq.qq_limit for seq in c.seqs[s]], dtype=np.int64),
        qq_prefix=np.array([seq.qq_prefix for seq in c.seqs[s]], dtype=np.int64),
        block_size=c.block_size,
        cap=cap,
        n_count_blocks=n_count,
        lse_from_candidates=c.lse_from_candidates,
        n_threads=n_threads,
        min_chunk=c.min_chunk,
        scalar=scalar,
    )


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: fp32 by its bits (NaNs included), integers by value."""
    return _same_bits(a, b) if a.dtype == torch.float32 else a.shape == b.shape and torch.equal(a, b)


def run_host_case(ops, c: HostStepCase) -> tuple[Counter, list[str]]:
    """The call with 1 and 2 threads, vector and scalar paths, each checked unit by unit against
    the reference (check_host_unit), its out/lse against the fp64 gather-attend of the ids it read,
    and in a batch every sequence's outputs against the bits of the same call on it alone.
    Returns (calls of host_step by outcome, problems found)."""
    x = make_host_inputs(c)
    range_error = _range_error(c, x)
    units = [] if range_error else [[unit_expect(c, x, b, h) for h in range(c.Hkv)] for b in range(len(c.seqs))]
    cap, n_count = host_sizes(c, units)
    refs = {}

    def attend_ref(b: int, ids: torch.Tensor) -> Reference:
        key = (b, ids.numpy().tobytes())
        if key not in refs:
            refs[key] = attend_reference(x.q[b], x.ks[b], x.vs[b], ids, x.scale)
        return refs[key]

    def call(n_threads, scalar):
        return _host_call(ops, c, x, cap, n_count, n_threads, scalar), None

    def check(res, _, n_threads, scalar):
        B, Hq, D = x.q.shape
        shapes = [(B, Hq, D), (B, Hq), (B, c.Hkv, cap), (B, c.Hkv), (B, c.Hkv), (B, c.Hkv, n_count)]
        if [tuple(t.shape) for t in res] != shapes:
            return "mismatch", f"output shapes {[tuple(t.shape) for t in res]}, expected {shapes}"
        outcome = "compared"
        for b, s in enumerate(c.seqs):
            for h, u in enumerate(units[b]):
                n_read, n_rated = int(res.n_read[b, h]), int(res.n_rated[b, h])
                problem = check_host_unit(res.ids[b, h], n_read, n_rated, res.block_reads[b, h], u, c.block_size, s.N)
                if problem:
                    return outcome, f"sequence {b}, KV head {h}: {problem}"
                outcome = outcome if u.rated_in_fp32 else "beyond fp32"
            ref = attend_ref(b, res.ids[b])
            outcome = outcome if ref.in_fp32_range else "beyond fp32"
            problem = check_attend_result(res.out[b], res.lse[b], ref)
            if problem:
                return outcome, f"sequence {b}: {problem}"
        for b in range(B if B > 1 else 0):
            try:
                alone = _host_call(ops, c, x, cap, n_count, n_threads, scalar, slice(b, b + 1))
            except Exception as exc:  # noqa: BLE001 - a finding, not a crash of the fuzzer
                return "mismatch", f"sequence {b} alone raised {type(exc).__name__}: {exc}"
            for name, together, single in zip(res._fields, res, alone):
                if not _same_tensor(together[b], single[0]):
                    return outcome, f"sequence {b}: {name} is not the bits of its single-sequence call"
        return outcome, None

    return _run_variants(f"host_step {c}", call, host_expected(range_error, units, cap), check)


# ------------------------------------------------------------------------ merge


@dataclass(frozen=True)
class MergeCase:
    H: int
    D: int
    lse_kinds: tuple[str, ...]  # what each side's lse entries are drawn from
    o_exp: int
    bad_shape: str | None  # an input of the wrong shape: must raise ValueError
    seed: int


LSE_KINDS = ("normal", "empty", "huge", "equal", "close", "+inf", "nan")


def draw_merge_case(pick: Pick) -> MergeCase:
    return MergeCase(
        H=pick((1, 2, 3, 8, 33)),
        D=pick((1, 3, 16, 64, 100)),
        lse_kinds=pick(
            (
                ("normal",),
                ("normal", "empty"),
                ("normal", "empty", "equal", "close"),
                ("huge", "equal", "close", "empty"),
                ("normal", "+inf", "nan", "empty"),
            )
        ),
        o_exp=pick((0, 0, 0, -30, -20, 20, 30)),
        bad_shape=pick((None,) * 8 + ("o_b", "lse_b", "out_rank")),
        seed=pick(range(2**31)),
    )


def make_merge_inputs(c: MergeCase):
    """o_a, o_b [H, D] fp32 finite; lse_a, lse_b [H] fp32 drawn per head from c.lse_kinds."""
    g = torch.Generator().manual_seed(c.seed)
    o_a = torch.randn(c.H, c.D, generator=g) * 10.0**c.o_exp
    o_b = torch.randn(c.H, c.D, generator=g) * 10.0**c.o_exp
    lse = torch.empty(2, c.H)
    for h in range(c.H):
        kinds = [c.lse_kinds[int(torch.randint(0, len(c.lse_kinds), (1,), generator=g))] for _ in range(2)]
        base = float(torch.randn(1, generator=g)) * 3
        for side, kind in enumerate(kinds):
            x = float(torch.randn(1, generator=g))
            lse[side, h] = {
                "normal": 3 * x,
                "empty": -math.inf,
                "huge": max(-FLT_MAX, min(FLT_MAX, x * 10.0 ** float(torch.randint(3, 39, (1,), generator=g)))),
                "equal": base,
                "close": base + x * 1e-6,
                "+inf": math.inf,
                "nan": math.nan,
            }[kind]
    return o_a, lse[0].clone(), o_b, lse[1].clone()


def merge_fp64(o_a, lse_a, o_b, lse_b):
    """Exact-ish merge in fp64, weights normalised: (o [H, D], lse [H])."""
    la, lb = lse_a.double(), lse_b.double()
    peak = torch.maximum(la, lb)
    safe = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    ea, eb = torch.exp(la - safe), torch.exp(lb - safe)
    total = (ea + eb).unsqueeze(1)
    o = (ea.unsqueeze(1) * o_a.double() + eb.unsqueeze(1) * o_b.double()) / total.clamp_min(1e-300)
    return o, torch.logaddexp(la, lb)


def check_merge_result(o, lse, o_a, lse_a, o_b, lse_b) -> str | None:
    """None if the kernel's merge (o, lse) is right under the rules in the module docstring."""
    from engine.decode.merge import merge_states

    exact_o, exact_lse = merge_fp64(o_a, lse_a, o_b, lse_b)
    torch_o, torch_lse = merge_states(o_a, lse_a, o_b, lse_b)
    for h in range(o.shape[0]):
        la, lb, l = float(lse_a[h]), float(lse_b[h]), float(lse[h])
        if math.isnan(la) or math.isnan(lb) or math.inf in (la, lb):
            if math.isfinite(l):
                return f"head {h}: lse inputs ({la}, {lb}) but a finite lse {l}"
            continue
        if la == -math.inf or lb == -math.inf:
            keep_o, keep_l = (o_b[h], lb) if la == -math.inf else (o_a[h], la)
            if lb == -math.inf and la == -math.inf:
                keep_o = torch.zeros_like(keep_o)
            if not (torch.equal(o[h], keep_o) and (l == keep_l)):
                return f"head {h}: merging with an empty side is not the identity (lse {l} vs {keep_l})"
            continue
        scale_o = float(torch.maximum(o_a[h].abs(), o_b[h].abs()).max())
        tol_o = scale_o * EPS * (16 + 2 * min(abs(la - lb), 100.0)) + DENORM_FLOOR
        tol_l = EPS * (4 * abs(float(exact_lse[h])) + 8)
        if not abs(l - float(exact_lse[h])) <= tol_l:
            return f"head {h}: lse {l!r} vs fp64 {float(exact_lse[h])!r}"
        if not float((o[h].double() - exact_o[h]).abs().max()) <= tol_o:
            return f"head {h}: out differs from the fp64 merge by more than {tol_o:.3g}"
        # merge_states rounds its inputs' differences to fp32 like the kernel; a little more slack.
        tol_torch = tol_o + scale_o * 4 * EPS * max(abs(la), abs(lb))
        if not float((o[h] - torch_o[h]).abs().max()) <= tol_torch or not abs(l - float(torch_lse[h])) <= tol_l:
            return f"head {h}: differs from engine.decode.merge.merge_states"
    return None


def run_merge_case(ops, c: MergeCase) -> tuple[Counter, list[str]]:
    """One merge_attention call; returns (calls by outcome, problems found)."""
    o_a, lse_a, o_b, lse_b = make_merge_inputs(c)
    if c.bad_shape == "o_b":
        o_b = torch.zeros(c.H, c.D + 1)
    elif c.bad_shape == "lse_b":
        lse_b = torch.zeros(c.H + 1)
    elif c.bad_shape == "out_rank":
        o_a = o_a.view(-1)
    try:
        o, lse = ops.merge_attention(o_a, lse_a, o_b, lse_b)
    except Exception as exc:  # noqa: BLE001 - every exception is a finding unless expected
        if c.bad_shape is not None and isinstance(exc, ValueError):
            return Counter(raised=1), []
        return Counter(mismatch=1), [f"{c}: raised {type(exc).__name__}: {exc}"]
    if c.bad_shape:
        return Counter(mismatch=1), [f"{c}: accepted a bad {c.bad_shape} instead of raising ValueError"]
    problem = check_merge_result(o, lse, o_a, lse_a, o_b, lse_b)
    return Counter(compared=1), [f"{c}: {problem}"] if problem else []


# ------------------------------------------------------------------ query_dots


@dataclass(frozen=True)
class QueryDotsCase:
    X: int
    G: int
    N: int
    D: int  # a multiple of 32 but where `odd_dim` (torch's product then serves query_dots)
    q_exp: int
    k_exp: int
    odd_dim: bool
    bad: str | None  # None, or what is wrong (BAD_DOTS): fp32 rows, a shape, an id out of range
    seed: int
    spare: int = 0  # rows per item beyond N in the buffer the rows are a view of
    taken: int = -1  # -1: every row, in order; else ids [X, taken] in [-1, N) name the rows
    weighted: bool = False  # weighted_rows (weights [X, G, M] times the rows) instead of query_dots


BF16_EPS = 2.0**-8  # bf16 unit roundoff
BAD_DOTS = {"dtype": (ValueError, "bfloat16"), "shape": (ValueError, "expected"), "id": (IndexError, "is outside")}


def draw_query_dots_case(pick: Pick) -> QueryDotsCase:
    """Shapes around the kernels' edges: N around the 16-row tile and the 64-row unit of work, D at the
    tiled sizes (64, 128) and beside them, G past the 4 of the engine's GQA groups; rows in a buffer
    with spare rows, and taken by id."""
    return QueryDotsCase(
        X=pick((0, 1, 1, 2, 3, 8)),
        G=pick((0, 1, 2, 4, 4, 5, 9)),
        N=pick((0, 1, 15, 16, 17, 63, 64, 65, 100, 257)),
        D=pick((32, 64, 64, 96, 128, 128, 160)),
        q_exp=pick((0, 0, 0, -3, 2, 30, 38)),
        k_exp=pick((0, 0, 0, -1, 3, 20, 38)),
        odd_dim=pick((False,) * 7 + (True,)),
        bad=pick((None,) * 12 + tuple(BAD_DOTS)),
        seed=pick(range(1 << 16)),
        spare=pick((0, 0, 1, 7, 64)),
        taken=pick((-1, -1, -1, 0, 1, 16, 17, 65, 300)),
        weighted=pick((False, True)),
    )


def check_query_dots_result(out, q, rows) -> tuple[str, str | None]:
    """(outcome, None or the first disagreement): every value of out = q @ rows [X, G, M] @ [X, M, D'] the bf16
    rounding of an fp32 sum within (M + 4) eps sum_m |q_m r_m| of the fp64 product, where those sums stay below
    FLT_MAX / 4. query_dots is q [X, G, D] against rows.mT, weighted_rows the weights against the rows."""
    ref = torch.bmm(q.double(), rows.double())
    P = torch.bmm(q.double().abs(), rows.double().abs())
    if out.shape != ref.shape or out.dtype != torch.bfloat16:
        return "compared", f"{out.dtype} {tuple(out.shape)}, expected bfloat16 {tuple(ref.shape)}"
    if out.numel() and float(P.max()) >= FLT_MAX / 4:
        return "beyond fp32", None
    summed = (q.shape[2] + 4) * EPS * P
    bound = summed + BF16_EPS * (ref.abs() + summed) + DENORM_FLOOR
    bad = ~((out.double() - ref).abs() <= bound)  # NaN counts as bad
    if bool(bad.any()):
        x, g, n = (int(i) for i in bad.nonzero()[0])
        return "compared", f"out[{x}, {g}, {n}] = {float(out[x, g, n])}, reference {float(ref[x, g, n])}"
    return "compared", None


def run_query_dots_case(ops, c: QueryDotsCase) -> tuple[Counter, list[str]]:
    """query_dots or weighted_rows with 1 and 2 threads, through the bf16 instructions (where the CPU has them)
    and widened, on rows that are a view of a buffer with spare rows, every row or those ids name."""
    g = torch.Generator().manual_seed(c.seed)
    D = c.D + 16 if c.odd_dim else c.D
    rows = _values((c.X, c.N + c.spare, D), c.k_exp, torch.bfloat16, g)[:, : c.N]
    ids = None if c.taken < 0 else torch.randint(-1, max(c.N, 1), (c.X, c.taken), generator=g)
    if c.bad == "id" and ids is not None and ids.numel():
        ids[-1, -1] = c.N
    if ids is None:
        taken = rows
    elif c.N == 0:  # no row to take (the call must raise)
        taken = rows.new_zeros(c.X, c.taken, D)
    else:
        taken = rows[torch.arange(c.X).unsqueeze(1), ids.clamp(0, c.N - 1)]
    M = taken.shape[1]
    if c.weighted:  # weights [X, G, M], a wrong shape: one weight too many
        q = _values((c.X, c.G, M + (c.bad == "shape")), c.q_exp, torch.bfloat16, g)
    else:  # queries [X, G, D], a wrong shape: rows wider than the queries
        q = _values((c.X, c.G, D), c.q_exp, torch.bfloat16, g)
        rows = _values((c.X, c.N, D + 32), c.k_exp, torch.bfloat16, g) if c.bad == "shape" else rows
    if c.bad == "dtype":
        rows = rows.float()
    # an id outside the rows (N = 0: any id, -1 too, as no row 0 exists) raises where no other error comes first
    wrong_id = ids is not None and ids.numel() > 0 and (c.bad == "id" or c.N == 0)
    bad = c.bad if c.bad in ("dtype", "shape") else "id" if wrong_id else None
    expected = BAD_DOTS[bad] if bad else None

    def call(n_threads, scalar):  # scalar: the widened path, which a CPU without AVX512-BF16 takes either way
        if c.weighted:
            return ops.weighted_rows(q, rows, ids, n_threads=n_threads), None
        return ops.query_dots(q, rows, ids, n_threads=n_threads, widened=scalar), None

    def check(out, _, n_threads, scalar):
        return check_query_dots_result(out, q, taken if c.weighted else taken.transpose(1, 2))

    product = "weighted_rows" if c.weighted else "query_dots"
    return _run_variants(f"{product} {c}", call, expected, check)


# ------------------------------------------------------------------ long run


def load_ops(ext_dir: str | None = None):
    """engine.native.ops, with engine.native._C taken from ext_dir when given (before engine is imported)."""
    if ext_dir is not None:
        paths = glob.glob(os.path.join(ext_dir, "_C.*so"))
        if len(paths) != 1:
            raise SystemExit(f"expected one built _C module in {ext_dir}, found {paths}")
        spec = importlib.util.spec_from_file_location("engine.native._C", paths[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["engine.native._C"] = module
    from engine.native import ops

    if not ops.HAS_EXT:
        raise SystemExit("the C++ extension engine.native._C is not loaded: nothing to fuzz")
    return ops


RUNS = (
    (draw_attend_case, run_attend_case),
    (draw_attend_case, run_scores_case),
    (draw_batch_case, run_batch_case),
    (draw_host_case, run_host_case),
    (draw_merge_case, run_merge_case),
    (draw_query_dots_case, run_query_dots_case),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=100_000, help="kernel calls to make (at least)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ext", help="directory holding the engine.native._C build to test (default: the installed one)")
    p.add_argument("--show", type=int, default=5, help="mismatches to print in full")
    args = p.parse_args(argv)
    ops = load_ops(args.ext)
    rng = random.Random(args.seed)
    outcomes, cases, problems = Counter(), 0, []
    batched, host = Counter(), Counter()  # calls of gather_attend_batch and host_step, and the sequences they held
    start = time.perf_counter()
    while outcomes.total() < args.calls:
        for draw, run in RUNS:
            c = draw(rng.choice)
            counts, found = run(ops, c)
            outcomes, cases = outcomes + counts, cases + 1
            if isinstance(c, (BatchCase, HostStepCase)):
                (batched if isinstance(c, BatchCase) else host).update(
                    calls=counts.total(), sequences=counts.total() * len(c.seqs)
                )
            for line in found[: max(0, args.show - len(problems))]:
                print("MISMATCH", line, flush=True)
            problems += found
    print(
        f"fuzz_kernel: {outcomes.total()} calls in {cases} cases ({outcomes['compared']} compared with a reference, "
        f"{outcomes['beyond fp32']} beyond fp32's range, {outcomes['raised']} raised as expected; "
        f"{batched['calls']} batched calls over {batched['sequences']} sequences, "
        f"{host['calls']} host_step calls over {host['sequences']} sequences), "
        f"{len(problems)} mismatches, seed {args.seed}, {time.perf_counter() - start:.0f} s, "
        f"extension {ops._C.__file__}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # the reference's matmuls: leave the cores to the kernel's own threads
    sys.exit(main())
