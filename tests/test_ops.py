import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.decode.merge import merge_states
from engine.native import ops
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
        assert ops.HAS_EXT, "the C++ extension engine.native._C did not build or load"
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


@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_rows_at_minus_infinity_before_any_finite_one_weigh_nothing(scalar, n_threads):
    """A whole tile (16 rows) whose scores overflow to -inf, then finite rows: the running max is still
    -inf after the first tile, and its rows must weigh nothing (not exp(-inf - -inf) = NaN)."""
    D = 16
    k, v = torch.zeros(1, 3, D), torch.zeros(1, 3, D)
    k[0, 0, 0], k[0, 1, 0], k[0, 2, 0] = -3e38, 1.0, 0.5  # q . k[0] * scale overflows to -inf
    v[0, 1], v[0, 2] = 1.0, 3.0
    q = torch.zeros(1, D)
    q[0, 0] = 10.0
    ids = torch.tensor([[0] * 40 + [1, 2]])
    out, lse = ops.gather_attend(q, k, v, ids, 0.25, scalar=scalar, n_threads=n_threads)
    want_out, want_lse = ops.gather_attend_torch(q, k, v, ids[:, 40:], 0.25)  # the rows that weigh
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)


def test_store_with_spare_capacity_is_read_in_place():
    q, k, v, ids = make_case(4, 2, 100, 64, 50, torch.bfloat16)
    big_k, big_v = torch.zeros(4, 300, 64, dtype=torch.bfloat16), torch.zeros(4, 300, 64, dtype=torch.bfloat16)
    big_k[:, :100], big_v[:, :100] = k, v
    out, lse = ops.gather_attend(q, big_k[:, :100], big_v[:, :100], ids, 0.125)
    ref_out, ref_lse = ops.gather_attend(q, k, v, ids, 0.125)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)


def test_a_float64_numpy_query_is_taken_as_any_float_query_is():
    q, k, v, ids = make_case(2, 4, 64, 64, 30, torch.float32)
    out, lse = ops.gather_attend(q.double().numpy(), k.numpy(), v.numpy(), ids.numpy(), 0.125)
    want, want_lse = ops.gather_attend(q, k, v, ids, 0.125)
    np.testing.assert_array_equal(out, want.numpy())
    np.testing.assert_array_equal(lse, want_lse.numpy())


def test_numpy_inputs_and_outputs():
    q, k, v, ids = make_case(2, 4, 64, 64, 30, torch.float16)
    out, lse = ops.gather_attend(q.numpy(), k.numpy(), v.numpy(), ids.numpy())
    assert isinstance(out, np.ndarray) and out.shape == (8, 64)
    ref_out, ref_lse = gather_attend_ref(q, k, v, ids, 1 / 8)
    np.testing.assert_allclose(out, ref_out.numpy(), atol=2e-5)
    np.testing.assert_allclose(lse, ref_lse.numpy(), atol=2e-5)


@pytest.mark.parametrize("n_threads", [4, 100_000])  # 100,000: more than OpenMP starts, taken as four a core
def test_thread_counts_agree(n_threads):
    q, k, v, ids = make_case(2, 4, 5000, 128, 3000, torch.bfloat16)
    one, lse_one = ops.gather_attend(q, k, v, ids, n_threads=1)
    many, lse_many = ops.gather_attend(q, k, v, ids, n_threads=n_threads)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_one, lse_many, atol=1e-5, rtol=1e-5)
    qb, rows = q.bfloat16().view(2, 4, 128), k.view(2, -1, 128)
    assert torch.equal(ops.query_dots(qb, rows, n_threads=n_threads), ops.query_dots(qb, rows, n_threads=1))


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


@pytest.mark.parametrize("scalar", [False, True], ids=["vector", "scalar"])
def test_f16_subnormals_read_alike_on_threads_that_flush_denormals(scalar):
    # set_flush_denormal holds for the calling thread alone: the kernel's own threads did not flush,
    # the calling one read every subnormal half as 0
    k = (torch.arange(1, 1 + 4 * 64, dtype=torch.float32) * 2.0**-24).half().view(1, 4 * 64 // 16, 16)
    q, ids = torch.eye(16), torch.arange(k.shape[1])[None]
    assert k.float().abs().max() < 2.0**-14  # all subnormal halves
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        scores = [ops.gather_scores(q, k, ids, n_threads=n, scalar=scalar) for n in (1, 2)]
    finally:
        torch.set_flush_denormal(False)
    for s in scores:
        assert torch.equal(s, k[0].float().T)


@pytest.mark.parametrize("scalar", [False, True], ids=["vector", "scalar"])
def test_a_head_whose_rows_all_score_nan_is_nan_not_empty(scalar):
    q, k, v, _ = good_case()
    k[:, 3] = math.nan
    out, lse = ops.gather_attend(q, k, v, torch.tensor([[3, 3, -1], [3, -1, -1]]), scalar=scalar)
    assert out.isnan().all() and lse.isnan().all()  # as sdpa's; an empty head (lse -inf) would merge as nothing


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


def test_merge_all_of_three_parts_equals_the_whole_and_the_merges_two_by_two():
    """merge_all (a decode step's resident, host and estimated parts in one merge): three thirds of
    a gather-attend give the whole, as merging them two by two does; an empty part adds nothing, all
    empty give o = 0 and lse = -inf, and the weights stay normalised at any lse."""
    from engine.decode.merge import merge_all

    q, k, v, _ = make_case(3, 4, 500, 64, 0, torch.float32)
    ids = torch.randperm(500, generator=torch.Generator().manual_seed(4))[:300].view(1, -1).expand(3, -1)
    whole = ops.gather_attend(q, k, v, ids)
    thirds = [ops.gather_attend(q, k, v, ids[:, i : i + 100].contiguous()) for i in (0, 100, 200)]
    merged = merge_all(thirds)
    pairwise = merge_states(*merge_states(*thirds[0], *thirds[1]), *thirds[2])
    for got in (merged, pairwise):
        torch.testing.assert_close(got[0], whole[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], whole[1], atol=1e-5, rtol=1e-5)
    empty = (torch.randn(12, 64), torch.full((12,), float("-inf")))
    o, lse = merge_all([empty, thirds[1], empty])
    torch.testing.assert_close(o, thirds[1][0], atol=0, rtol=0)
    torch.testing.assert_close(lse, thirds[1][1], atol=0, rtol=0)
    o, lse = merge_all([empty, empty, empty])
    assert torch.all(o == 0) and torch.all(torch.isneginf(lse))
    big = torch.full((1,), 1e30)
    o, _ = merge_all([(torch.ones(1, 4), big), (torch.full((1, 4), 3.0), big), (torch.full((1, 4), 5.0), big)])
    torch.testing.assert_close(o, torch.full((1, 4), 3.0))


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
        (lambda q, k, v, i: (q, k[:0], v[:0], i[:0]), "no KV heads"),
        (lambda q, k, v, i: (q, k.numpy().astype(np.float64), v.numpy().astype(np.float64), i), "not supported"),
    ],
)
def test_bad_input_raises_value_error(mutate, message):
    with pytest.raises(ValueError, match=message):
        ops.gather_attend(*mutate(*good_case()))


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 1e39])
def test_scale_must_be_a_finite_float32(scale):
    with pytest.raises(ValueError, match="scale must be a finite float32 number"):
        ops.gather_attend(*good_case(), scale)


@pytest.mark.parametrize("n_threads", [-1, 2**31])
def test_thread_counts_outside_the_kernels_int_are_rejected(n_threads):
    with pytest.raises(ValueError, match=r"n_threads must be in \[0, 2\*\*31\)"):
        ops.gather_attend(*good_case(), n_threads=n_threads)


@pytest.mark.parametrize("batch", [False, True])
def test_read_only_output_arrays_are_refused(batch):
    # torch.from_numpy drops the flag: the kernel wrote into the caller's read-only array
    q, k, v, ids = good_case()
    if batch:
        q, k, v, ids = q[None], [k], [v], ids[None]
    call = ops.gather_attend_batch if batch else ops.gather_attend
    for name, shape in (("out", q.shape), ("lse", q.shape[:-1])):
        frozen = np.zeros(shape, dtype=np.float32)
        frozen.flags.writeable = False
        with pytest.raises(ValueError, match=f"{name} is a read-only array"):
            call(q, k, v, ids, **{name: frozen})
        assert not frozen.any()


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


def test_unsigned_64_bit_ids_are_refused():
    q, k, v, ids = good_case()
    with pytest.raises(ValueError, match="got torch.uint64"):  # 2**64 - 1 would have become -1, padding
        ops.gather_attend(q, k, v, ids.to(torch.uint64))


@requires_ext
def test_the_kernels_refuse_a_non_finite_scale_of_their_own():
    q, k, v, ids = (ops._buffer(t) for t in good_case())
    out, lse = np.zeros((8, 64), np.float32), np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="scale must be finite"):
        ops._C.gather_attend(q, k, v, ids, out, lse, "float32", math.nan, 1, False)


@requires_ext
def test_outputs_that_share_memory_with_an_input_are_refused():
    """An output laid over the ids turned checked ids into others mid-call: the kernels then read
    rows far outside their stores (the process crashed)."""
    memory = np.zeros(4096, np.uint8)
    ids = memory[:1024].view(np.int64).reshape(2, 64)
    ids[:] = 1
    q, k = np.ones((2, 16), np.float32), np.ones((2, 64, 16), np.float32)
    with pytest.raises(ValueError, match="out shares memory with ids"):
        ops._C.gather_scores(q, k, ids, memory[512:1024].view(np.float32).reshape(2, 64), "float32", 1, True)
    with pytest.raises(ValueError, match="out shares memory with ids"):
        ops.gather_attend(q, k, k, ids, out=memory[1000:1128].view(np.float32).reshape(2, 16))
    with pytest.raises(ValueError, match="out and lse share memory"):
        out = np.zeros((2, 16), np.float32)
        ops.gather_attend(q, k, k, ids.copy(), out=out, lse=out[1, :2])
    bf16_ones = np.full((2, 1, 32), 0x3F80, np.int16)
    rows = np.full((128, 32), 0x3F80, np.int16)
    with pytest.raises(ValueError, match="out shares memory with ids"):
        ops._C.query_dots(bf16_ones, rows, ids, memory[512:768].view(np.int16).reshape(2, 1, 64), 64, 64, 1, True)
    with pytest.raises(ValueError, match="out shares memory with rows"):
        ops._C.query_dots(bf16_ones, rows, None, rows[:1].reshape(2, 1, 16), 16, 16, 1, True)
    apart = np.zeros((2, 1, 64), np.int16)
    ops._C.query_dots(bf16_ones, rows, ids, apart, 64, 64, 1, True)  # the same call, apart
    assert (apart == 0x4200).all()  # 32 x 1.0 in bf16


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


# ------------------------------------------------------------------ batched


def with_spare(store, spare):
    """The same store as a view of one with `spare` unused tokens per head (heads strided)."""
    if spare == 0:
        return store
    big = torch.zeros(store.shape[0], store.shape[1] + spare, store.shape[2], dtype=store.dtype)
    big[:, : store.shape[1]] = store
    return big[:, : store.shape[1]]


def make_batch(Ns, Hkv, G, D, M, dtype, seed=0, spare=0):
    """q [B, Hq, D]; B stores [Hkv, N_b, D], odd sequences' strided by `spare`; ids [B, Hkv, M]."""
    cases = [make_case(Hkv, G, N, D, M, dtype, seed=seed + b) for b, N in enumerate(Ns)]
    q, ids = torch.stack([c[0] for c in cases]), torch.stack([c[3] for c in cases])
    ks = [with_spare(c[1], spare * (b % 2)) for b, c in enumerate(cases)]
    vs = [with_spare(c[2], spare * (b % 2)) for b, c in enumerate(cases)]
    return q, ks, vs, ids


BATCH_NS = {1: [61], 2: [97, 1], 5: [1, 27, 300, 97, 2]}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("D", [40, 64, 128])
@pytest.mark.parametrize("B", [1, 2, 5])
@pytest.mark.parametrize("scalar", [False, True], ids=["vector", "scalar"])
def test_batch_equals_single_calls_and_reference(dtype, G, D, B, scalar):
    q, ks, vs, ids = make_batch(BATCH_NS[B], 2, G, D, 200, dtype, seed=B + G + D, spare=13)
    for n_threads in (1, 2):
        out, lse = ops.gather_attend_batch(q, ks, vs, ids, 0.1, n_threads=n_threads, scalar=scalar)
        assert out.shape == q.shape and lse.shape == q.shape[:2]
        for b in range(B):
            one_out, one_lse = ops.gather_attend(q[b], ks[b], vs[b], ids[b], 0.1, n_threads=n_threads, scalar=scalar)
            assert torch.equal(out[b], one_out) and torch.equal(lse[b], one_lse), f"sequence {b}"
            ref_out, ref_lse = gather_attend_ref(q[b], ks[b], vs[b], ids[b], 0.1)
            torch.testing.assert_close(out[b].double(), ref_out, atol=TOL[dtype], rtol=1e-5)
            torch.testing.assert_close(lse[b].double(), ref_lse, atol=TOL[dtype], rtol=1e-5)


def test_batch_empty_lists():
    q, ks, vs, ids = make_batch([40, 5, 30], 2, 3, 64, 20, torch.float32)
    ids[1] = -1  # one sequence lists nothing
    ids[2, 0] = -1  # one head of another
    out, lse = ops.gather_attend_batch(q, ks, vs, ids, 0.125, out=torch.full(q.shape, math.nan))
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))
    assert torch.all(out[2, :3] == 0) and torch.all(torch.isneginf(lse[2, :3]))
    assert torch.all(torch.isfinite(lse[0])) and torch.all(torch.isfinite(lse[2, 3:]))

    out, lse = ops.gather_attend_batch(q, ks, vs, torch.empty(3, 2, 0, dtype=torch.int64))
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    out, lse = ops.gather_attend_batch(q[:0], [], [], ids[:0])
    assert out.shape == (0, 6, 64) and lse.shape == (0, 6)


def test_batch_takes_numpy_and_a_stacked_store():
    q, ks, vs, ids = make_batch([50, 50], 2, 4, 64, 30, torch.float16)
    out, lse = ops.gather_attend_batch(q.numpy(), [k.numpy() for k in ks], [v.numpy() for v in vs], ids.numpy())
    assert isinstance(out, np.ndarray) and out.shape == (2, 8, 64)
    stacked, _ = ops.gather_attend_batch(q, torch.stack(ks), torch.stack(vs), ids)  # [B, Hkv, N, D]
    np.testing.assert_array_equal(out, stacked.numpy())


def test_batch_fallback_matches_kernel(monkeypatch):
    q, ks, vs, ids = make_batch([200, 3, 90], 2, 3, 64, 90, torch.bfloat16, spare=5)
    out, lse = ops.gather_attend_batch(q, ks, vs, ids, 0.1)
    monkeypatch.setattr(ops, "HAS_EXT", False)
    t_out, t_lse = ops.gather_attend_batch(q, ks, vs, ids, 0.1)
    torch.testing.assert_close(out, t_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, t_lse, atol=2e-5, rtol=1e-5)
    ids[1, 0, 2] = 3
    with pytest.raises(IndexError, match="sequence 1"):
        ops.gather_attend_batch(q, ks, vs, ids, 0.1)


def test_batch_fallback_takes_an_empty_store(monkeypatch):
    q, ks, vs, ids = make_batch([20, 5], 2, 3, 64, 8, torch.float16)
    ks[1], vs[1] = ks[1][:, :0], vs[1][:, :0]
    ids[1] = -1  # a sequence with nothing stored lists only padding
    out, lse = ops.gather_attend_batch(q, ks, vs, ids, 0.1)
    monkeypatch.setattr(ops, "HAS_EXT", False)
    t_out, t_lse = ops.gather_attend_batch(q, ks, vs, ids, 0.1)
    assert torch.all(t_out[1] == 0) and torch.all(torch.isneginf(t_lse[1]))
    torch.testing.assert_close(out, t_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, t_lse, atol=2e-5, rtol=1e-5)


def good_batch():
    return make_batch([30, 12, 45], 2, 4, 64, 10, torch.float32)


def replace_store(stores, b, store):
    return [store if i == b else s for i, s in enumerate(stores)]


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda q, k, v, i: (q, k[:2], v, i), r"k_stores must hold one store per sequence \(B = 3\), got 2"),
        (lambda q, k, v, i: (q, k, v + v[:1], i), r"v_stores must hold one store per sequence \(B = 3\), got 4"),
        (lambda q, k, v, i: (q, k[0], v, i), "k_stores must hold one store per sequence"),
        (lambda q, k, v, i: (q, 5, v, i), "must be a sequence of B stores"),
        (lambda q, k, v, i: (q, replace_store(k, 1, k[1].half()), v, i), r"k_stores\[1\] and v_stores\[1\]"),
        (
            lambda q, k, v, i: (q, replace_store(k, 2, k[2].half()), replace_store(v, 2, v[2].half()), i),
            r"share one dtype, Hkv and D.*k_stores\[2\]",
        ),
        (lambda q, k, v, i: (q, replace_store(k, 1, k[1][:1]), replace_store(v, 1, v[1][:1]), i), "share one"),
        (lambda q, k, v, i: (q, replace_store(k, 1, k[1][..., :32]), replace_store(v, 1, v[1][..., :32]), i), "share"),
        (lambda q, k, v, i: (q, replace_store(k, 1, k[1][0]), v, i), r"k_stores\[1\] must be a store"),
        (lambda q, k, v, i: (q, replace_store(k, 0, v[0][:, :20]), v, i), r"differ in shape"),
        (lambda q, k, v, i: (q, k, v, i[0]), r"expected q \[B, Hq, D\] and ids \[B, Hkv, M\]"),
        (lambda q, k, v, i: (q[0], k, v, i), r"expected q \[B, Hq, D\]"),
        (lambda q, k, v, i: (q, k, v, i[:2]), r"one \[Hkv, M\] list per sequence \(B = 3\), got 2"),
        (lambda q, k, v, i: (q, k, v, i[:, :1]), "one row per KV head"),
        (lambda q, k, v, i: (q[:, :7], k, v, i), "not a multiple of Hkv"),
        (lambda q, k, v, i: (q[..., :32], k, v, i), "head dim"),
        (lambda q, k, v, i: (q, k, v, i.float()), "integer"),
        (lambda q, k, v, i: (q.masked_fill(q > 1, float("nan")), k, v, i), "NaN"),
        (lambda q, k, v, i: (q, replace_store(k, 2, k[2].to("meta")), v, i), r"k_stores\[2\] must be on the CPU"),
    ],
)
def test_batch_bad_input_raises_value_error(mutate, message):
    with pytest.raises(ValueError, match=message):
        ops.gather_attend_batch(*mutate(*good_batch()))


@requires_ext
@pytest.mark.parametrize("bad_id", [45, 10**12, -2])
def test_batch_out_of_range_id_names_its_sequence(bad_id):
    q, ks, vs, ids = good_batch()
    ids[1, 0, 3] = 12  # first bad id of sequence 1, whose store has 12 tokens
    ids[2, 1, 7] = bad_id
    with pytest.raises(IndexError, match=r"sequence 1: ids\[1, 0, 3\] = 12 is outside \[-1, 12\)"):
        ops.gather_attend_batch(q, ks, vs, ids)
    ids[1, 0, 3] = 11  # valid for sequence 1: the error moves to sequence 2
    with pytest.raises(IndexError, match=rf"sequence 2: ids\[2, 1, 7\] = {bad_id} is outside \[-1, 45\)"):
        ops.gather_attend_batch(q, ks, vs, ids)


@requires_ext
def test_batch_bad_input_leaves_the_outputs_untouched():
    q, ks, vs, ids = good_batch()
    ids[2, 1, 9] = 45
    out, lse = torch.full(q.shape, 7.0), torch.full(q.shape[:2], 7.0)
    with pytest.raises(IndexError):
        ops.gather_attend_batch(q, ks, vs, ids, out=out, lse=lse)
    assert torch.all(out == 7) and torch.all(lse == 7)  # validated before any work


@requires_ext
def test_batch_binding_checks_its_buffers():
    """The extension's own checks, which the Python layer's usually shadow."""
    q, ks, vs, ids = good_batch()
    bufs = [ops._buffer(t) for t in (q, ids, torch.empty(q.shape), torch.empty(q.shape[:2]))]
    k_np, v_np = [ops._buffer(k) for k in ks], [ops._buffer(v) for v in vs]

    def call(q=bufs[0], k=k_np, v=v_np, ids=bufs[1], out=bufs[2], lse=bufs[3], dtype="float32"):
        ops._C.gather_attend_batch(q, k, v, ids, out, lse, dtype, 0.1, 1, False)

    call()
    cases = [
        (dict(k=k_np[:2]), "k_stores must hold one store per sequence"),
        (dict(v=v_np + v_np[:1]), "v_stores must hold one store per sequence"),
        (dict(k=[k_np[0], k_np[1][:1], k_np[2]], v=[v_np[0], v_np[1][:1], v_np[2]]), "differ from sequence 0's"),
        (dict(k=[k_np[0], k_np[1], k_np[2][:, :20]]), "sequence 2: K and V stores differ in shape"),
        (dict(k=[k_np[0], ks[1].half().numpy(), k_np[2]]), r"k_stores\[1\]: buffer format 'e' does not hold float32"),
        (dict(k=[k_np[0], np.ascontiguousarray(k_np[1].transpose(0, 2, 1)).transpose(0, 2, 1), k_np[2]]), "rows"),
        (dict(k=[k_np[0], 3, k_np[2]]), r"k_stores\[1\] does not expose a buffer"),
        (dict(ids=bufs[1][:2]), r"ids must have shape \[B, Hkv, M\]"),
        (dict(ids=bufs[1][:, :1].copy()), "one row per KV head"),
        (dict(ids=bufs[1].astype(np.int32)), "int64"),
        (dict(out=bufs[2][:, :, :32].copy()), r"out must have shape \[B, Hq, D\]"),
        (dict(lse=bufs[3][:2].copy()), r"lse must have shape \[B, Hq\]"),
        (dict(q=bufs[0][:, :, :32].copy(), out=bufs[2][:, :, :32].copy()), "head dim"),
        (dict(dtype="bfloat16"), "does not hold bfloat16"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            call(**kw)


# ------------------------------------------------------------- gathered scores


def scores_ref(q, k, ids):
    """fp64 q . k of the listed rows [Hq, M], -inf at padding."""
    Hkv, D = k.shape[0], k.shape[2]
    rows = k[torch.arange(Hkv).unsqueeze(1), ids.clamp_min(0)].double()
    s = torch.bmm(q.double().view(Hkv, -1, D), rows.transpose(1, 2))
    return s.masked_fill((ids < 0).unsqueeze(1), float("-inf")).view(q.shape[0], -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("G,D", [(1, 64), (4, 128), (3, 24), (17, 32)])
@pytest.mark.parametrize("scalar", [False, True], ids=["vector", "scalar"])
def test_gather_scores_match_reference(dtype, G, D, scalar):
    q, k, _, ids = make_case(3, G, 300, D, 77, dtype, seed=G + D)
    spare = torch.zeros(3, 350, D, dtype=dtype)  # heads strided, as in a store with spare capacity
    spare[:, :300] = k
    s = ops.gather_scores(q, spare[:, :300], ids, scalar=scalar)
    assert s.shape == (3 * G, 77) and s.dtype == torch.float32
    ref = scores_ref(q, k, ids)
    assert torch.equal(torch.isneginf(s), (ids < 0).repeat_interleave(G, dim=0))
    torch.testing.assert_close(s.double(), ref, atol=1e-4, rtol=1e-5)


def test_gather_scores_threads_and_fallback_agree(monkeypatch):
    q, k, _, ids = make_case(2, 4, 5000, 128, 3000, torch.bfloat16)
    one = ops.gather_scores(q, k, ids, n_threads=1)
    torch.testing.assert_close(ops.gather_scores(q, k, ids, n_threads=4), one, atol=0, rtol=0)
    monkeypatch.setattr(ops, "HAS_EXT", False)
    torch.testing.assert_close(ops.gather_scores(q, k, ids), one, atol=1e-4, rtol=1e-5)
    assert torch.isneginf(ops.gather_scores(q, k[:, :0], torch.full((2, 3), -1))).all()  # an empty store


@pytest.mark.parametrize("bad_id", [30, 10**12, -2])
def test_gather_scores_reject_out_of_range_ids(bad_id):
    q, k, _, ids = good_case()
    ids[1, 3] = bad_id
    with pytest.raises(IndexError, match="outside"):
        ops.gather_scores(q, k, ids)


def test_gather_scores_reject_bad_shapes():
    q, k, _, ids = good_case()
    with pytest.raises(ValueError, match="head dim"):
        ops.gather_scores(q[:, :8], k, ids)
    with pytest.raises(ValueError, match="one row per KV head"):
        ops.gather_scores(q, k, ids[:1])
    with pytest.raises(ValueError, match="not supported"):
        ops.gather_scores(q, k.double(), ids)


@pytest.mark.parametrize("widened", [False, True])  # AVX512-BF16 where the CPU has it; fp32 lanes on any CPU
@pytest.mark.parametrize("D", [64, 128, 96])  # the two tiled sizes and the loop over chunks
def test_query_dots_are_torch_s_bf16_product_up_to_the_order_of_the_sums(D, widened):
    g = torch.Generator().manual_seed(D)
    q = torch.nn.functional.normalize(torch.randn(3, 5, D, generator=g), dim=-1).bfloat16()
    rows = torch.nn.functional.normalize(torch.randn(3, 1000, D, generator=g), dim=-1).bfloat16()
    got, want = ops.query_dots(q, rows, n_threads=2, widened=widened), torch.bmm(q, rows.transpose(1, 2))
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert (got == want).float().mean() > 0.999
    # apart by a last bit at most, or where the sum cancels, by what either order of fp32 sums may lose
    sums = 2 * (D + 4) * 2.0**-24 * torch.bmm(q.float().abs(), rows.float().abs().mT)
    ulp = torch.finfo(torch.bfloat16).eps * want.float().abs()
    assert bool(((got.float() - want.float()).abs() <= ulp + sums).all())
    assert torch.equal(ops.query_dots(q, rows, n_threads=1, widened=widened), got)  # threads split rows, not sums


def test_query_dots_kernel_refuses_a_dimension_it_has_no_path_for():
    q, rows = torch.zeros(1, 4, 48, dtype=torch.bfloat16), torch.zeros(1, 8, 48, dtype=torch.bfloat16)
    out = torch.empty(1, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 32"):
        ops._C.query_dots(ops._buffer(q), ops._buffer(rows[0]), None, ops._buffer(out), 8, 8)
    assert torch.equal(ops.query_dots(q, rows), torch.zeros(1, 4, 8, dtype=torch.bfloat16))  # torch's product serves
    ids = torch.tensor([[7, -1, 2]])
    assert ops.query_dots(q, rows, ids).shape == (1, 4, 3)  # so it does for the rows ids name


def _spare_rows(g, X=3, N=40, spare=9, D=64):
    """rows [X, N, D] bf16 as a view of a buffer with `spare` more rows per item (items N + spare rows apart)."""
    buffer = torch.nn.functional.normalize(torch.randn(X, N + spare, D, generator=g), dim=-1).bfloat16()
    return buffer[:, :N]


@pytest.mark.parametrize("widened", [False, True])
def test_query_dots_read_the_rows_ids_name_where_they_lie(widened):
    """The rows of a buffer with spare rows, taken in order or by id (-1: row 0), give what the same kernel
    gives on the rows gathered and packed first, to the bit: the kernel reads the rows in place."""
    g = torch.Generator().manual_seed(11)
    rows = _spare_rows(g)
    q = torch.randn(3, 4, 64, generator=g).bfloat16()
    ids = torch.randint(-1, rows.shape[1], (3, 25), generator=g)
    packed = rows[torch.arange(3).unsqueeze(1), ids.clamp_min(0)].contiguous()
    assert torch.equal(ops.query_dots(q, rows, ids, widened=widened), ops.query_dots(q, packed, widened=widened))
    assert torch.equal(ops.query_dots(q, rows, widened=widened), ops.query_dots(q, rows.contiguous(), widened=widened))
    assert torch.equal(ops.query_dots(q, rows, ids[:, :0]), torch.empty(3, 4, 0, dtype=torch.bfloat16))


def test_weighted_rows_are_torch_s_bf16_product_up_to_the_order_of_the_sums():
    g = torch.Generator().manual_seed(12)
    rows = _spare_rows(g, D=72)
    w = torch.rand(3, 5, rows.shape[1], generator=g).bfloat16()
    got, want = ops.weighted_rows(w, rows, n_threads=2), torch.bmm(w, rows)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape == (3, 5, 72)
    sums = 2 * (rows.shape[1] + 4) * 2.0**-24 * torch.bmm(w.float().abs(), rows.float().abs())
    ulp = torch.finfo(torch.bfloat16).eps * want.float().abs()
    assert bool(((got.float() - want.float()).abs() <= ulp + sums).all())
    assert torch.equal(ops.weighted_rows(w, rows, n_threads=1), got)  # threads split items, not sums
    ids = torch.randint(-1, rows.shape[1], (3, 30), generator=g)
    w_ids = torch.rand(3, 5, 30, generator=g).bfloat16()
    packed = rows[torch.arange(3).unsqueeze(1), ids.clamp_min(0)].contiguous()
    assert torch.equal(ops.weighted_rows(w_ids, rows, ids), ops.weighted_rows(w_ids, packed))


def test_the_row_products_refuse_ids_and_shapes_they_cannot_read():
    rows = torch.zeros(2, 8, 64, dtype=torch.bfloat16)
    q, w = torch.zeros(2, 4, 64, dtype=torch.bfloat16), torch.zeros(2, 4, 3, dtype=torch.bfloat16)
    for bad in (8, -2):
        ids = torch.tensor([[0, 1, 2], [3, bad, 4]])
        with pytest.raises(IndexError, match=rf"ids\[1, 1\] = {bad} is outside \[-1, 8\)"):
            ops.query_dots(q, rows, ids)
        with pytest.raises(IndexError, match=rf"ids\[1, 1\] = {bad} is outside"):
            ops.weighted_rows(w, rows, ids)
    with pytest.raises(ValueError, match="ids must have shape"):
        ops.query_dots(q, rows, torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="M rows taken"):
        ops.weighted_rows(w, rows)  # 3 weights for 8 rows
    with pytest.raises(ValueError, match="expected w"):
        ops.weighted_rows(w, rows[0])  # rows without their items
    with pytest.raises(ValueError, match="bfloat16"):
        ops.weighted_rows(w.float(), rows)
    flat, out = ops._buffer(rows.view(16, 64)), ops._buffer(torch.empty(2, 4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="do not fit in 16 rows"):
        ops._C.query_dots(ops._buffer(q), flat, None, out, 8, 9)
    with pytest.raises(ValueError, match="items overlap"):
        ops._C.query_dots(ops._buffer(q), flat, None, out, 8, 4)
    # three items one row each, a stride whose (items - 1) * stride overflows int64: it read wild rows
    q3, out3 = torch.zeros(3, 4, 64, dtype=torch.bfloat16), torch.empty(3, 4, 1, dtype=torch.bfloat16)
    w3 = torch.zeros(3, 4, 1, dtype=torch.bfloat16)
    out_w = torch.empty(3, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="do not fit in 16 rows"):
        ops._C.query_dots(ops._buffer(q3), flat, None, ops._buffer(out3), 1, 2**62 + 2**40)
    with pytest.raises(ValueError, match="do not fit in 16 rows"):
        ops._C.weighted_rows(ops._buffer(w3), flat, None, ops._buffer(out_w), 1, 2**62 + 2**40)


def test_the_row_products_of_an_empty_head_dim_are_torch_s():
    q, w = torch.zeros(2, 3, 0, dtype=torch.bfloat16), torch.ones(2, 3, 5, dtype=torch.bfloat16)
    rows = torch.zeros(2, 5, 0, dtype=torch.bfloat16)
    assert ops.query_dots(q, rows).shape == (2, 3, 5)  # a ZeroDivisionError in the rows' layout before
    assert ops.weighted_rows(w, rows).shape == (2, 3, 0)


def test_the_query_lists_take_the_native_product_for_bf16_build_queries_in_host_memory(monkeypatch):
    from engine.index import heads

    calls = []
    monkeypatch.setattr(ops, "query_dots", lambda q, rows: calls.append(rows.dtype) or torch.bmm(q, rows.mT))
    q, rows = torch.randn(2, 4, 64), torch.randn(2, 10, 64)
    assert torch.equal(heads.build_query_dots(q, rows), torch.bmm(q, rows.mT)) and not calls  # fp32: torch's
    heads.build_query_dots(q.bfloat16(), rows.bfloat16())
    assert calls == [torch.bfloat16]
    selector = heads.ListSelector(2, 64, "cpu", torch.bfloat16, {"m_keys": 8, "n_add": 4})
    selector.build(torch.randn(2, 50, 64), torch.randn(2, 20, 64))
    calls.clear()
    selector.add(torch.randn(2, 3, 64))  # the added keys' nearest build queries: the same product
    assert calls == [torch.bfloat16] and selector.lists.n_keys == 53
