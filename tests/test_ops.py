import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import ops
from engine.merge import merge_states
from tests.reference import gather_attend_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The reference reads the same (rounded) store values, so only fp32 accumulation differs.
TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


def make_case(Hkv, G, N, D, M, dtype, seed=0, pad_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Hkv * G, D, generator=g)
    k = torch.randn(Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(Hkv, N, D, generator=g).to(dtype)
    ids = torch.randint(0, N, (Hkv, M), generator=g)
    ids[torch.rand(Hkv, M, generator=g) < pad_frac] = -1
    return q, k, v, ids


def check_against_ref(q, k, v, ids, scale, dtype, **kw):
    out, lse = ops.gather_attend(q, k, v, ids, scale, **kw)
    ref_out, ref_lse = gather_attend_ref(q, k, v, ids, scale)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=TOL[dtype], rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=TOL[dtype], rtol=1e-5)


def test_extension_is_built():
    if os.environ.get("HYBRIDATTN_REQUIRE_EXT") == "1":
        assert ops.HAS_EXT, "the C++ extension engine._C did not build or load"
    else:
        pytest.skip("HYBRIDATTN_REQUIRE_EXT is not set")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("G", [1, 3, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("N,M", [(27, 13), (97, 61), (1000, 300)])
@pytest.mark.parametrize("scalar", [False, True], ids=["vector", "scalar"])
def test_matches_reference(dtype, G, D, N, M, scalar):
    q, k, v, ids = make_case(2, G, N, D, M, dtype, seed=N + M + G)
    check_against_ref(q, k, v, ids, 1 / math.sqrt(D), dtype, scalar=scalar)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_duplicate_ids_count_as_listed(dtype):
    q, k, v, _ = make_case(3, 3, 50, 64, 0, dtype)
    ids = torch.tensor([[5, 5, 5, 7], [1, 2, 1, -1], [0, 49, 49, 0]])
    check_against_ref(q, k, v, ids, 0.125, dtype)
    # attending [5, 5, 5, 7] is not attending [5, 7]
    dedup, _ = ops.gather_attend(q, k, v, torch.tensor([[5, 7], [1, 2], [0, 49]]), 0.125)
    out, _ = ops.gather_attend(q, k, v, ids, 0.125)
    assert not torch.allclose(out[:3], dedup[:3])


def test_all_padding_rows_and_empty_list():
    q, k, v, ids = make_case(3, 4, 40, 64, 20, torch.float32)
    ids[1] = -1
    out, lse = ops.gather_attend(q, k, v, ids, 0.125)
    assert torch.all(out[4:8] == 0) and torch.all(torch.isneginf(lse[4:8]))
    assert torch.all(torch.isfinite(lse[:4])) and torch.all(torch.isfinite(lse[8:]))
    check_against_ref(q, k, v, ids, 0.125, torch.float32)

    out, lse = ops.gather_attend(q, k, v, torch.empty(3, 0, dtype=torch.int64), 0.125)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_store_with_spare_capacity_is_read_in_place():
    q, k, v, ids = make_case(4, 2, 100, 64, 50, torch.bfloat16)
    big_k, big_v = torch.zeros(4, 300, 64, dtype=torch.bfloat16), torch.zeros(4, 300, 64, dtype=torch.bfloat16)
    big_k[:, :100], big_v[:, :100] = k, v
    out, lse = ops.gather_attend(q, big_k[:, :100], big_v[:, :100], ids, 0.125)
    ref_out, ref_lse = ops.gather_attend(q, k, v, ids, 0.125)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)


def test_numpy_inputs_and_outputs():
    q, k, v, ids = make_case(2, 4, 64, 64, 30, torch.float16)
    out, lse = ops.gather_attend(q.numpy(), k.numpy(), v.numpy(), ids.numpy())
    assert isinstance(out, np.ndarray) and out.shape == (8, 64)
    ref_out, ref_lse = gather_attend_ref(q, k, v, ids, 1 / 8)
    np.testing.assert_allclose(out, ref_out.numpy(), atol=2e-5)
    np.testing.assert_allclose(lse, ref_lse.numpy(), atol=2e-5)


def test_thread_counts_agree():
    q, k, v, ids = make_case(2, 4, 5000, 128, 3000, torch.bfloat16)
    one, lse_one = ops.gather_attend(q, k, v, ids, n_threads=1)
    many, lse_many = ops.gather_attend(q, k, v, ids, n_threads=4)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_one, lse_many, atol=1e-5, rtol=1e-5)


def test_fallback_matches_kernel():
    q, k, v, ids = make_case(2, 3, 200, 64, 90, torch.bfloat16)
    out, lse = ops.gather_attend(q, k, v, ids, 0.1)
    t_out, t_lse = ops.gather_attend_torch(q, k, v, ids, 0.1)
    torch.testing.assert_close(out, t_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, t_lse, atol=2e-5, rtol=1e-5)


def test_f16_conversion_covers_subnormals_and_extremes():
    vals = torch.tensor([6e-8, -6e-8, 1e-5, 65504.0, -65504.0, 0.0, -0.0, 1.0], dtype=torch.float16)
    k = torch.zeros(1, 8, 8, dtype=torch.float16)
    v = vals.view(1, 8, 1).expand(1, 8, 8).contiguous()
    for i in range(8):  # a single id: the output is exactly that V row
        out, _ = ops.gather_attend(torch.zeros(1, 8), k, v, torch.tensor([[i]]), 1.0)
        assert torch.equal(out[0], v[0, i].float())


# ------------------------------------------------------------------ merging


def random_state(H, D, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H, D, generator=g), torch.randn(H, generator=g) * 3


@pytest.mark.parametrize("merge", [ops.merge_attention, merge_states], ids=["cpp", "torch"])
def test_merge_with_empty_side_is_identity(merge):
    o, lse = random_state(5, 16, 0)
    empty_o, empty_lse = torch.randn(5, 16), torch.full((5,), float("-inf"))
    for args in ((o, lse, empty_o, empty_lse), (empty_o, empty_lse, o, lse)):
        mo, ml = merge(*args)
        torch.testing.assert_close(mo, o, atol=0, rtol=0)
        torch.testing.assert_close(ml, lse, atol=0, rtol=0)
    mo, ml = merge(empty_o, empty_lse, empty_o, empty_lse)
    assert torch.all(mo == 0) and torch.all(torch.isneginf(ml))


@pytest.mark.parametrize("merge", [ops.merge_attention, merge_states], ids=["cpp", "torch"])
def test_merge_is_associative(merge):
    a, b, c = random_state(4, 32, 1), random_state(4, 32, 2), random_state(4, 32, 3)
    left = merge(*merge(*a, *b), *c)
    right = merge(*a, *merge(*b, *c))
    torch.testing.assert_close(left[0], right[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(left[1], right[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("merge", [ops.merge_attention, merge_states], ids=["cpp", "torch"])
def test_merging_two_halves_equals_the_whole(merge):
    q, k, v, _ = make_case(3, 4, 500, 64, 0, torch.float32)
    ids = torch.randperm(500)[:240].view(1, -1).expand(3, -1)
    whole = ops.gather_attend(q, k, v, ids)
    halves = [
        ops.gather_attend(q, k, v, ids[:, :100].contiguous()),
        ops.gather_attend(q, k, v, ids[:, 100:].contiguous()),
    ]
    merged = merge(*halves[0], *halves[1])
    torch.testing.assert_close(merged[0], whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged[1], whole[1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- bad input


# Layout, id-range and output-buffer checks live in the C++ binding (the fallback is a degraded mode).
requires_ext = pytest.mark.skipif(not ops.HAS_EXT, reason="checked by the C++ extension")


def good_case():
    return make_case(2, 4, 30, 64, 10, torch.float32)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda q, k, v, i: (q, k.to(torch.int32), v.to(torch.int32), i), "not supported"),
        (lambda q, k, v, i: (q, k.to(torch.float64), v.to(torch.float64), i), "not supported"),
        (lambda q, k, v, i: (q, k, v.half(), i), "same dtype"),
        (lambda q, k, v, i: (q[None], k, v, i), r"expected q \[Hq, D\]"),
        (lambda q, k, v, i: (q, k[0], v[0], i), "expected q"),
        (lambda q, k, v, i: (q[:7], k, v, i), "not a multiple of Hkv"),
        (lambda q, k, v, i: (q[:, :32], k, v, i), "head dim"),
        (lambda q, k, v, i: (q, k, v, i[:1]), "one row per KV head"),
        (lambda q, k, v, i: (q, k, v[:, :20], i), "differ in shape"),
        (lambda q, k, v, i: (q, k, v, i.float()), "integer"),
        (lambda q, k, v, i: (q.masked_fill(q > 1, float("nan")), k, v, i), "NaN"),
        (lambda q, k, v, i: (q.masked_fill(q > 1, float("inf")), k, v, i), "NaN or inf"),
        (lambda q, k, v, i: (q.to("meta"), k, v, i), "on the CPU"),
        (lambda q, k, v, i: (q, [1.0], v, i), "torch tensor or a numpy array"),
    ],
)
def test_bad_input_raises_value_error(mutate, message):
    with pytest.raises(ValueError, match=message):
        ops.gather_attend(*mutate(*good_case()))


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 1e39])
def test_scale_must_be_a_finite_float32(scale):
    with pytest.raises(ValueError, match="scale must be a finite float32 number"):
        ops.gather_attend(*good_case(), scale)


def test_negative_thread_count_is_rejected():
    with pytest.raises(ValueError, match="n_threads must be >= 0"):
        ops.gather_attend(*good_case(), n_threads=-1)


@requires_ext
def test_non_contiguous_store_is_rejected_not_copied():
    q, k, v, ids = good_case()
    with pytest.raises(ValueError, match="contiguous"):
        ops.gather_attend(q, k.transpose(1, 2).contiguous().transpose(1, 2), v, ids)


@requires_ext
@pytest.mark.parametrize("bad_id", [30, 10**12, -2])
def test_out_of_range_id_raises_index_error(bad_id):
    q, k, v, ids = good_case()
    ids[1, 3] = bad_id
    with pytest.raises(IndexError, match=rf"ids\[1, 3\] = {bad_id} is outside \[-1, 30\)"):
        ops.gather_attend(q, k, v, ids)


@requires_ext
def test_bad_output_buffers_raise():
    q, k, v, ids = good_case()
    with pytest.raises(ValueError, match="out must"):
        ops.gather_attend(q, k, v, ids, out=torch.empty(8, 32))
    with pytest.raises(ValueError, match="float32"):
        ops.gather_attend(q, k, v, ids, lse=torch.empty(8, dtype=torch.float64))


# ----------------------------------------------------------------- property


@settings(max_examples=60, deadline=None)
@given(
    Hkv=st.integers(1, 4),
    G=st.sampled_from([1, 2, 3, 4, 8]),
    N=st.integers(1, 200),
    M=st.integers(0, 150),
    D=st.sampled_from([8, 16, 24, 48, 64, 80]),
    dtype=st.sampled_from(DTYPES),
    pad=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(Hkv, G, N, M, D, dtype, pad, seed):
    q, k, v, ids = make_case(Hkv, G, N, D, M, dtype, seed=seed, pad_frac=pad)
    check_against_ref(q, k, v, ids, 1 / math.sqrt(D), dtype)
