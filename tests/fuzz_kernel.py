"""Fuzzing of the host kernels `gather_attend`, `gather_attend_batch`, `gather_scores` and `merge_attention`
against references.

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

import numpy as np
import torch

if not __package__:  # run as a script: the repository root holds `tests`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.reference import gather_attend_ref

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
    scalar) -> (outcome, problem or None). Returns (calls by outcome, problems found)."""
    outcomes, problems = Counter(), []
    for n_threads, scalar in VARIANTS:
        where = f"{name} n_threads={n_threads} scalar={scalar}"
        try:
            out, lse = call(n_threads, scalar)
        except Exception as exc:  # noqa: BLE001 - every exception is a finding unless expected
            if expected is None or not isinstance(exc, expected[0]) or expected[1] not in str(exc):
                outcomes["mismatch"] += 1
                problems.append(f"{where}: raised {type(exc).__name__}: {exc} (expected {expected})")
            else:
                outcomes["raised"] += 1
            continue
        if expected is not None:
            outcomes["mismatch"] += 1
            problems.append(f"{where}: returned instead of raising {expected[0].__name__}")
            continue
        outcome, problem = check(out, lse, n_threads, scalar)
        outcomes[outcome] += 1
        if problem:
            problems.append(f"{where}: {problem}")
    return outcomes, problems


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
    (draw_merge_case, run_merge_case),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=100_000, help="kernel calls to make (at least)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ext", help="directory holding the engine._C build to test (default: the installed one)")
    p.add_argument("--show", type=int, default=5, help="mismatches to print in full")
    args = p.parse_args(argv)
    ops = load_ops(args.ext)
    rng = random.Random(args.seed)
    outcomes, cases, problems = Counter(), 0, []
    batched = Counter()  # calls of gather_attend_batch, and the sequences they held
    start = time.perf_counter()
    while outcomes.total() < args.calls:
        for draw, run in RUNS:
            c = draw(rng.choice)
            counts, found = run(ops, c)
            outcomes, cases = outcomes + counts, cases + 1
            if isinstance(c, BatchCase):
                batched.update(calls=counts.total(), sequences=counts.total() * len(c.seqs))
            for line in found[: max(0, args.show - len(problems))]:
                print("MISMATCH", line, flush=True)
            problems += found
    print(
        f"fuzz_kernel: {outcomes.total()} calls in {cases} cases ({outcomes['compared']} compared with a reference, "
        f"{outcomes['beyond fp32']} beyond fp32's range, {outcomes['raised']} raised as expected; "
        f"{batched['calls']} batched calls over {batched['sequences']} sequences), "
        f"{len(problems)} mismatches, seed {args.seed}, {time.perf_counter() - start:.0f} s, "
        f"extension {ops._C.__file__}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # the reference's matmuls: leave the cores to the kernel's own threads
    sys.exit(main())
