"""Fuzzing of gather_attend, gather_attend_batch, gather_scores, host_step, merge_attention and query_dots
against the references: a short, deterministic hypothesis run. The rules are in tests/fuzz_kernel.py, which also
runs them for 100,000+ calls (`make sanitize` does so under ASan and UBSan)."""

import math
from collections import Counter

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.decode.merge import merge_states
from engine.native import ops
from tests.fuzz_kernel import (
    BAD_HOST_INPUTS,
    AttendCase,
    BatchCase,
    HostSeq,
    HostStepCase,
    MergeCase,
    QueryDotsCase,
    attend_reference,
    check_attend_result,
    check_merge_result,
    draw_attend_case,
    draw_batch_case,
    draw_host_case,
    draw_merge_case,
    draw_query_dots_case,
    effective_scale,
    make_attend_inputs,
    make_host_inputs,
    rating_bounds,
    run_attend_case,
    run_batch_case,
    run_host_case,
    run_merge_case,
    run_query_dots_case,
    run_scores_case,
)
from tests.fuzz_kernel import main as fuzz_main
from tests.reference import host_candidates_ref, host_unit_ref

pytestmark = pytest.mark.skipif(not ops.HAS_EXT, reason="fuzzes the C++ extension")

# Derandomized and without an example database: the same examples on every run and machine.
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None)
FUZZ_MERGE = settings(FUZZ, max_examples=300)
FUZZ_BATCH = settings(FUZZ, max_examples=80)
FUZZ_HOST = settings(FUZZ, max_examples=100)


@st.composite
def attend_cases(draw):
    return draw_attend_case(lambda options: draw(st.sampled_from(options)))


@st.composite
def batch_cases(draw):
    return draw_batch_case(lambda options: draw(st.sampled_from(options)))


@st.composite
def host_cases(draw):
    return draw_host_case(lambda options: draw(st.sampled_from(options)))


@st.composite
def merge_cases(draw):
    return draw_merge_case(lambda options: draw(st.sampled_from(options)))


@st.composite
def query_dots_cases(draw):
    return draw_query_dots_case(lambda options: draw(st.sampled_from(options)))


def dots_case(**changes) -> QueryDotsCase:
    base = dict(X=2, G=4, N=70, D=128, q_exp=0, k_exp=0, odd_dim=False, bad=None, seed=1)
    return QueryDotsCase(**(base | changes))


def case(**changes) -> AttendCase:
    base = dict(Hkv=2, G=3, N=40, D=64, M=50, dtype="float32", spare_k=0, spare_v=0, pad=0.2, repeat=0.0)
    base |= dict(q_exp=0, k_exp=0, v_exp=0, scale=None, bad_id=None, dirty_out=False, seed=1)
    return AttendCase(**(base | changes))


@FUZZ
@given(attend_cases())
@example(case(N=0, M=0, dirty_out=True))  # nothing stored, nothing listed
@example(case(N=1, M=3, D=1, pad=0.0))  # one row listed three times
@example(case(G=17, D=528, M=129))  # past the vector path's limits: the scalar loops
@example(case(G=16, D=48, M=300, spare_k=7, spare_v=64, dtype="bfloat16"))  # odd block count, strided heads
@example(case(spare_k=64, bad_id="capacity"))  # an id in the spare capacity is still out of range
@example(case(pad=1.0, dirty_out=True))  # every head empty: out = 0, lse = -inf written
@example(case(dtype="float16", k_exp=8, v_exp=-8))  # saturated keys, subnormal values
@example(case(scale=math.nan))
def test_gather_attend_matches_reference(c):
    _, problems = run_attend_case(ops, c)
    assert not problems, problems[0]


@FUZZ
@given(attend_cases())
@example(case(N=0, M=3, pad=0.0))  # nothing stored: every id is out of range
@example(case(G=17, D=528, M=129))  # past the vector path's limits: the scalar loops
@example(case(G=16, D=48, M=300, spare_k=7, dtype="bfloat16"))  # odd block count, strided heads
@example(case(spare_k=64, bad_id="capacity"))
@example(case(pad=1.0))
@example(case(dtype="float16", q_exp=30, k_exp=8))  # beyond fp32: padding still -inf
def test_gather_scores_match_reference(c):
    _, problems = run_scores_case(ops, c)
    assert not problems, problems[0]


@FUZZ
@given(query_dots_cases())
@example(dots_case(X=0))  # nothing to score
@example(dots_case(N=17, G=9, D=96))  # a partial tile, more query heads than a GQA group, D untiled
@example(dots_case(q_exp=38, k_exp=38))  # beyond fp32: it still returns
@example(dots_case(bad="shape"))
@example(dots_case(spare=7, taken=65))  # rows by id from a buffer with spare rows: ids in the spare rows are bad
@example(dots_case(taken=17, bad="id"))
@example(dots_case(N=0, taken=3))  # nothing stored: every id, -1 too, is out of range
@example(dots_case(weighted=True, spare=64, taken=300, G=5, D=96))
@example(dots_case(weighted=True, bad="shape"))
def test_query_dots_match_reference(c):
    _, problems = run_query_dots_case(ops, c)
    assert not problems, problems[0]


def batch(*seqs: dict, **shared) -> BatchCase:
    """A batch of sequences case(**shared, **seqs[b]); `shared` sets the fields they share."""
    return BatchCase(case(**shared), tuple(case(**(shared | s)) for s in seqs))


@FUZZ_BATCH
@given(batch_cases())
@example(batch())  # no sequence at all
@example(batch({"N": 1}, {"N": 300, "spare_k": 7}, {"N": 0}, {"N": 2, "pad": 1.0}, {"N": 129}, M=200))
@example(batch({"N": 40}, {"N": 12, "bad_id": "N"}, {"N": 30, "bad_id": "-2"}))  # the first bad sequence is named
@example(batch({"N": 40}, {"N": 12, "spare_k": 64, "bad_id": "capacity"}))  # its own store's N, not the largest
@example(batch({"N": 50, "pad": 1.0}, {"N": 50, "pad": 1.0}, dirty_out=True))  # every head empty
@example(batch({"N": 64}, {"N": 64}, G=17, D=528, M=129, dtype="bfloat16"))  # the scalar loops
@example(batch({"N": 64}, scale=math.inf))
def test_gather_attend_batch_matches_single_calls_and_reference(c):
    _, problems = run_batch_case(ops, c)
    assert not problems, problems[0]


def host_case(*seqs: dict, qq_limit: int = 8, qq_prefix: int = 16, **changes) -> HostStepCase:
    """A host_step call over sequences host_seq(**seqs[b]) (seeded by their position, and taking
    qq_limit and qq_prefix, unless given)."""
    base = dict(Hkv=2, G=3, D=64, dtype="float32", list_len=8, empty_list_len=1, n_near=3, n_chosen=2)
    base |= dict(block_size=8, lse_from_candidates=False, scale=None, cap="exact")
    base |= dict(count_blocks="all", bad=None, bad_at=0, min_chunk=None)
    seq_base = dict(qq_limit=qq_limit, qq_prefix=qq_prefix)
    return HostStepCase(
        **(base | changes), seqs=tuple(host_seq(**(seq_base | {"seed": b} | s)) for b, s in enumerate(seqs))
    )


def host_seq(**changes) -> HostSeq:
    base = dict(N=100, spare_k=0, spare_v=0, list_rows=5, entry_pad=0.1, entry_repeat=0.3, near_pad=0.2)
    base |= dict(
        near_repeat=0.5, block_pad=0.3, qq_limit=8, qq_prefix=16, ranges=("inner", "to end", "empty"), threshold=1e-3
    )
    base |= dict(lse_kind="near", q_exp=0, k_exp=0, v_exp=0, seed=0)
    return HostSeq(**(base | changes))


@FUZZ_HOST
@given(host_cases())
@example(host_case())  # no sequence at all
@example(host_case({"N": 0, "list_rows": 0}, {"N": 300, "spare_k": 64}))  # an empty store beside a full one
@example(host_case({"list_rows": 0}, {}, list_len=16, empty_list_len=1))  # an unindexed sequence beside an indexed one
@example(host_case({"threshold": -math.inf}, {"threshold": math.inf, "lse_kind": "-inf"}))  # all read / rated +inf
@example(host_case({"threshold": 0.0}, {"threshold": 1e-45}, lse_from_candidates=True))
@example(host_case({"threshold": math.inf, "lse_kind": "zero", "k_exp": 3}, scale=1.0))  # fp32 overflow: read
@example(host_case({}, {"N": 129}, G=17, D=528, dtype="bfloat16", block_size=3))  # the scalar loops
@example(host_case({"q_exp": 30, "k_exp": 30}))  # beyond fp32: only what does not depend on the rating
@example(host_case({"ranges": ("all", "all", "all")}, cap="small"))  # more than cap
@example(
    host_case({"N": 300, "qq_limit": 40, "qq_prefix": 64}, {"N": 300, "qq_limit": 1}, {"qq_prefix": 0})
)  # own budgets
@example(host_case({"N": 300, "ranges": ("all", "empty", "start")}, {"N": 300}, min_chunk=7, lse_from_candidates=True))
@example(host_case({"N": 300, "ranges": ("all", "empty", "empty"), "threshold": -math.inf}, min_chunk=1))  # unrated
@example(  # a rating just under the smallest subnormal, the threshold: expf's error there is one step, not relative
    host_case(
        {"N": 300, "list_rows": 5, "entry_pad": 0.2, "near_pad": 0.0, "near_repeat": 0.0, "block_pad": 0.3}
        | {
            "ranges": ("empty", "inner", "to end"),
            "threshold": 0.0,
            "lse_kind": "zero",
            "q_exp": -20,
            "seed": 489375556,
        },
        {"N": 64, "list_rows": 1, "entry_pad": 0.2, "near_pad": 0.0, "near_repeat": 0.0, "block_pad": 1.0}
        | {"ranges": ("all", "empty", "empty"), "threshold": 1e-45, "lse_kind": "zero", "v_exp": 30, "seed": 75907495},
        Hkv=1,
        G=1,
        D=33,
        list_len=0,
        n_near=0,
        n_chosen=1,
        qq_limit=40,
        qq_prefix=64,
        lse_from_candidates=True,
        min_chunk=1,
        scale=30.0,
        cap="roomy",
        count_blocks="more",
    )
)
def test_host_step_matches_reference(c):
    _, problems = run_host_case(ops, c)
    assert not problems, problems[0]


@pytest.mark.parametrize("min_chunk", [None, 1])  # each unit whole on a thread, or split over both
@pytest.mark.parametrize("bad", [f"{what}:{value}" for what, values in BAD_HOST_INPUTS.items() for value in values])
def test_host_step_raises_for_each_bad_input(bad, min_chunk):
    """The planted input in the second sequence is reached (the unit's first rows and entries)."""
    pads = {"near_pad": 0.0, "entry_pad": 0.0, "block_pad": 0.0, "N": 300}  # 300: enough candidates for chunks
    c = host_case({"N": 300}, pads, bad=bad, bad_at=1, qq_limit=100, qq_prefix=100, min_chunk=min_chunk)
    outcomes, problems = run_host_case(ops, c)
    assert not problems, problems[0]
    assert outcomes == Counter(raised=4)


@pytest.mark.parametrize("min_chunk", [None, 1])
def test_host_step_raises_when_cap_is_too_small(min_chunk):
    c = host_case({"N": 300, "ranges": ("all", "empty", "empty")}, cap="small", min_chunk=min_chunk)
    outcomes, problems = run_host_case(ops, c)
    assert not problems, problems[0]
    assert outcomes == Counter(raised=4)


@pytest.mark.parametrize("min_chunk", [None, 1])
def test_host_step_raises_the_first_units_error(min_chunk):
    """Sequence 0 reads past the cap, sequence 1 reaches a bad list row: the call raises sequence 0's error."""
    seqs = {"N": 300, "ranges": ("all", "empty", "empty")}, {"N": 300, "near_pad": 0.0}
    outcomes, problems = run_host_case(
        ops, host_case(*seqs, cap="small", bad="row:rows", bad_at=1, min_chunk=min_chunk)
    )
    assert not problems, problems[0]
    assert outcomes == Counter(raised=4)


@FUZZ_MERGE
@given(merge_cases())
def test_merge_attention_matches_references(c):
    _, problems = run_merge_case(ops, c)
    assert not problems, problems[0]


# ------------------------------------------------- the checks can fail


def test_attend_check_flags_a_wrong_row():
    c = case()
    q, k, v, ids = make_attend_inputs(c)
    ref = attend_reference(q, k, v, ids, effective_scale(c))
    assert ref.in_fp32_range
    assert check_attend_result(*ops.gather_attend(q, k, v, ids, c.scale), ref) is None
    shifted = ids.clone()
    shifted[0, 0] = (int(ids[0, 0]) + 1) % c.N if ids[0, 0] >= 0 else 0  # one id off by one
    assert "head 0" in check_attend_result(*ops.gather_attend(q, k, v, shifted, c.scale), ref)


class BrokenOps:
    """A kernel that attends to nothing and never validates: every check must object."""

    @staticmethod
    def gather_attend(q, k, v, ids, scale=None, **kw):
        return torch.zeros(q.shape), torch.full(q.shape[:1], -math.inf)

    @staticmethod
    def gather_attend_batch(q, k_stores, v_stores, ids, scale=None, **kw):
        return torch.zeros(q.shape), torch.full(q.shape[:2], -math.inf)

    @staticmethod
    def gather_scores(q, k, ids, **kw):
        return torch.zeros(q.shape[0], ids.shape[1])

    @staticmethod
    def merge_attention(o_a, lse_a, o_b, lse_b):
        return torch.zeros_like(o_a), torch.zeros_like(lse_a)

    @staticmethod
    def query_dots(q, rows, ids=None, **kw):
        taken = rows.shape[1] if ids is None else ids.shape[1]
        return torch.zeros(q.shape[0], q.shape[1], taken, dtype=torch.bfloat16)

    @staticmethod
    def weighted_rows(w, rows, ids=None, **kw):
        return torch.zeros(w.shape[0], w.shape[1], rows.shape[2], dtype=torch.bfloat16)


@pytest.mark.parametrize("c", [case(), case(bad_id="N"), case(scale=math.inf)], ids=["values", "bad id", "bad scale"])
def test_every_call_of_a_broken_kernel_is_a_mismatch(c):
    outcomes, problems = run_attend_case(BrokenOps, c)
    assert outcomes["mismatch"] + outcomes["compared"] == 4 and len(problems) == 4


@pytest.mark.parametrize("c", [case(), case(pad=1.0), case(bad_id="N")], ids=["values", "padding", "bad id"])
def test_every_call_of_a_broken_scores_kernel_is_a_mismatch(c):
    outcomes, problems = run_scores_case(BrokenOps, c)
    assert len(problems) == 4


@pytest.mark.parametrize(
    "c",
    [dots_case(), dots_case(bad="dtype"), dots_case(taken=20, bad="id"), dots_case(weighted=True, taken=9)],
    ids=["values", "fp32 rows", "bad id", "weighted"],
)
def test_every_call_of_a_broken_dots_kernel_is_a_mismatch(c):
    outcomes, problems = run_query_dots_case(BrokenOps, c)
    assert len(problems) == 4


@pytest.mark.parametrize(
    "c",
    [batch({"N": 40}, {"N": 3}), batch({"N": 40}, {"N": 3, "bad_id": "N"}), batch({"N": 5}, scale=math.nan)],
    ids=["values", "bad id", "bad scale"],
)
def test_every_call_of_a_broken_batch_kernel_is_a_mismatch(c):
    outcomes, problems = run_batch_case(BrokenOps, c)
    assert outcomes["mismatch"] + outcomes["compared"] == 4 and len(problems) == 4


class UnbatchedOps:
    """A batched call that is right within the reference's tolerance but not the single call's bits."""

    gather_attend = staticmethod(ops.gather_attend)

    @staticmethod
    def gather_attend_batch(q, k_stores, v_stores, ids, scale=None, **kw):
        out, lse = ops.gather_attend_batch(q, k_stores, v_stores, ids, scale, **kw)
        return out, lse.nextafter(torch.tensor(math.inf))


def test_batch_check_requires_the_single_calls_bits():
    outcomes, problems = run_batch_case(UnbatchedOps, batch({"N": 40}, {"N": 30}))
    assert outcomes["compared"] == 4 and len(problems) == 4
    assert "sequence 0: not the bits of its single-sequence call" in problems[0]


def test_a_broken_merge_is_a_mismatch():
    outcomes, problems = run_merge_case(BrokenOps, MergeCase(3, 16, ("normal",), 0, None, seed=0))
    assert outcomes.total() == 1 and len(problems) == 1


class TamperedHostOps:
    """host_step whose result `tamper(res)` changes in place (only in calls of several sequences
    when batch_only), or whose call changes its keyword arguments by `changes`."""

    def __init__(self, tamper=None, batch_only=False, **changes):
        self.tamper, self.batch_only, self.changes = tamper, batch_only, changes

    def host_step(self, q, *args, **kw):
        res = ops.host_step(q, *args, **(kw | self.changes))
        if self.tamper and (q.shape[0] > 1 or not self.batch_only):
            self.tamper(res)
        return res


def _drop_first_id(res):
    n = int(res.n_read[0, 0])
    res.ids[0, 0, : n - 1] = res.ids[0, 0, 1:n].clone()
    res.ids[0, 0, n - 1] = -1
    res.n_read[0, 0] -= 1


def _add_last_id(res):
    n = int(res.n_read[0, 0])
    res.ids[0, 0, n] = 99  # N - 1: no candidate of host_case({"ranges": EMPTY, ...})
    res.n_read[0, 0] += 1


def _swap_first_ids(res):
    res.ids[0, 0, :2] = res.ids[0, 0, :2].flip(0)


EMPTY = ("empty", "empty", "empty")
TAMPERS = {
    "an id dropped": (_drop_first_id, "not read"),
    "an id added": (_add_last_id, "id 99 read (not a candidate)"),
    "ids out of order": (_swap_first_ids, "not strictly ascending"),
    "n_rated": (lambda res: res.n_rated[0, 0].add_(1), "n_rated"),
    "block_reads": (lambda res: res.block_reads[0, 0, 0].add_(1), "block_reads"),
    "out": (lambda res: res.out[0, 0, 0].add_(1.0), "out - ref"),
    "lse": (lambda res: res.lse[0, 1].add_(0.01), "lse - ref"),
}


@pytest.mark.parametrize("name", TAMPERS)
def test_every_call_of_a_tampered_host_step_is_a_mismatch(name):
    tamper, message = TAMPERS[name]
    c = host_case({"ranges": EMPTY, "threshold": -math.inf, "entry_pad": 0.0}, cap="roomy")
    outcomes, problems = run_host_case(TamperedHostOps(tamper), c)
    assert outcomes["compared"] == 4 and len(problems) == 4
    assert message in problems[0]


def test_host_check_requires_the_single_calls_bits():
    tamper = TamperedHostOps(lambda res: res.lse[0].copy_(res.lse[0].nextafter(torch.tensor(math.inf))), True)
    outcomes, problems = run_host_case(tamper, host_case({}, {"N": 50}))
    assert outcomes["compared"] == 4 and len(problems) == 4
    assert "sequence 0: lse is not the bits of its single-sequence call" in problems[0]


def test_host_check_catches_a_wrong_rating():
    """The rating's bound leaves room for rounding, not for another denominator."""
    outcomes, problems = run_host_case(TamperedHostOps(lse_from_candidates=True), host_case({}, {"N": 300}))
    assert len(problems) == 4 and "not read (fp64 rating" in problems[0]


def test_host_check_catches_a_missing_error():
    c = host_case({"ranges": ("empty", "empty", "all")}, cap="small")  # 100 forced ids: cap 99
    outcomes, problems = run_host_case(TamperedHostOps(cap=1000), c)
    assert len(problems) == 4 and "returned instead of raising" in problems[0]


def test_rating_bounds_are_tight_for_moderate_values():
    """Narrow where the scores are moderate (their worst-case rounding, not the ratings' size), and
    holding the rating computed in fp32."""
    c = host_case({"N": 300})
    x = make_host_inputs(c)
    q, k, lse = x.q[0, :3], x.ks[0][0], x.lse[0, :3]
    candidates = host_candidates_ref(
        x.lists[0][0], x.near[0, 0], x.blocks[0, 0], x.ranges[0], 300, qq_limit=8, qq_prefix=16, block_size=8
    )
    ref = host_unit_ref(q, k, candidates, (0, 0), lse, x.scale, 1e-3, False)
    lo, hi = rating_bounds(ref, q, k, x.scale, False)
    s = (q @ k[torch.tensor(candidates)].T) * x.scale  # [G, C] fp32, as the kernel rates
    p32 = torch.exp(s - lse.unsqueeze(1)).sum(0) / 3
    assert len(candidates) > 20 and bool((lo <= p32).all() and (p32 <= hi).all())
    assert float(((hi - lo) / hi).max()) < 1e-3


def test_attend_check_requires_exact_zeros_for_empty_heads():
    c = case(pad=1.0)
    q, k, v, ids = make_attend_inputs(c)
    ref = attend_reference(q, k, v, ids, effective_scale(c))
    out, lse = torch.zeros(6, 64), torch.full((6,), -math.inf)
    assert check_attend_result(out, lse, ref) is None
    out[4, 7] = 1e-30
    assert "head 4: no valid id" in check_attend_result(out, lse, ref)


@pytest.mark.parametrize("magnitude", [1e3, 1e7, 1e30])
def test_merges_normalise_their_weights_at_any_lse(magnitude):
    """Weights e^(lse_a - lse) rounded at large |lse| stop summing to 1; both merges
    normalise them, and the fp64 check would see it if they did not."""
    o_a, o_b = torch.ones(1, 4), torch.full((1, 4), 3.0)
    lse = torch.tensor([magnitude])
    for o, l in (ops.merge_attention(o_a, lse, o_b, lse), merge_states(o_a, lse, o_b, lse)):
        assert check_merge_result(o, l, o_a, lse, o_b, lse) is None
        torch.testing.assert_close(o, torch.full((1, 4), 2.0))


def test_merge_with_a_nan_lse_must_not_look_finite():
    o_a, o_b = torch.ones(2, 4), torch.ones(2, 4)
    lse_a, lse_b = torch.tensor([0.0, math.nan]), torch.tensor([1.0, 0.0])
    o, l = ops.merge_attention(o_a, lse_a, o_b, lse_b)
    assert math.isnan(float(l[1]))
    assert "finite lse" in check_merge_result(o, torch.tensor([float(l[0]), 0.0]), o_a, lse_a, o_b, lse_b)


def test_bad_merge_shapes_are_checked():
    c = MergeCase(H=3, D=16, lse_kinds=("normal",), o_exp=0, bad_shape="lse_b", seed=0)
    assert run_merge_case(ops, c) == (Counter(raised=1), [])


def test_long_run_command_prints_one_summary_line(capsys):
    assert fuzz_main(["--calls", "40", "--seed", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("fuzz_kernel: ") and " 0 mismatches" in out[0]
    calls = int(out[0].split()[1])
    compared = int(out[0].split("(")[1].split()[0])
    host_calls = int(out[0].split(" host_step calls")[0].split()[-1])
    assert calls >= 40 and 0 < compared <= calls and 0 < host_calls < calls
