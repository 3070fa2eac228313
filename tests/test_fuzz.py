"""Fuzzing of gather_attend, gather_attend_batch, gather_scores and merge_attention against the references: a short,
deterministic hypothesis run. The rules are in tests/fuzz_kernel.py, which also
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
    AttendCase,
    BatchCase,
    MergeCase,
    attend_reference,
    check_attend_result,
    check_merge_result,
    draw_attend_case,
    draw_batch_case,
    draw_merge_case,
    effective_scale,
    make_attend_inputs,
    run_attend_case,
    run_batch_case,
    run_merge_case,
    run_scores_case,
)
from tests.fuzz_kernel import main as fuzz_main

pytestmark = pytest.mark.skipif(not ops.HAS_EXT, reason="fuzzes the C++ extension")

# Derandomized and without an example database: the same examples on every run and machine.
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None)
FUZZ_MERGE = settings(FUZZ, max_examples=300)
FUZZ_BATCH = settings(FUZZ, max_examples=80)


@st.composite
def attend_cases(draw):
    return draw_attend_case(lambda options: draw(st.sampled_from(options)))


@st.composite
def batch_cases(draw):
    return draw_batch_case(lambda options: draw(st.sampled_from(options)))


@st.composite
def merge_cases(draw):
    return draw_merge_case(lambda options: draw(st.sampled_from(options)))


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
    assert calls >= 40 and 0 < compared <= calls
