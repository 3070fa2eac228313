"""Estimation of the unread host tokens (engine.decode.estimate): exact where its model is,
empty when everything is read, and never a token counted twice."""

import pytest
import torch

from ann.block import head_rows
from engine import HybridCache, OffloadConfig
from engine.decode.estimate import BlockSummary, block_dots, block_matmul, block_sums
from engine.decode.merge import attend, merge_states
from engine.native import ops
from tests.reference import gather_attend_ref


def blockwise_constant(Hkv, n_blocks, B, D, seed=0):
    """Keys and values equal within each block: there the estimate's model holds exactly."""
    g = torch.Generator().manual_seed(seed)
    k, v = (
        torch.randn(Hkv, n_blocks, 1, D, generator=g).expand(-1, -1, B, -1).reshape(Hkv, n_blocks * B, D)
        for _ in range(2)
    )
    return k.contiguous(), v.contiguous()


def summary_of(k, v, B, **levels):
    summary = BlockSummary(k.shape[0], k.shape[2], B, device="cpu", dtype=torch.float32, capacity=k.shape[1], **levels)
    summary.add(k, v)
    return summary


@pytest.mark.parametrize("B", [1, 4, 16])
@pytest.mark.parametrize("read_frac", [0.0, 0.1, 0.5])
def test_read_plus_estimate_is_exact_when_blocks_are_constant(B, read_frac):
    Hkv, G, D, nb = 2, 3, 16, 11
    k, v = blockwise_constant(Hkv, nb, B, D)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(Hkv, G, D, generator=g)
    N = nb * B
    # any subset of tokens read, partial blocks included
    chosen = torch.rand(Hkv, N, generator=g) < read_frac
    ids = torch.where(chosen, torch.arange(N), torch.tensor(-1))
    summary = summary_of(k, v, B)
    o_e, lse_e = summary.estimate(summary.scores(q, 0.25), summary.read_per_block(ids))
    o_r, lse_r = gather_attend_ref(q.reshape(-1, D), k, v, ids, 0.25)
    o, lse = merge_states(o_r.float().view(Hkv, G, D), lse_r.float().view(Hkv, G), o_e, lse_e)
    exact, exact_lse = attend(q.unsqueeze(2), k, v, 0.25)
    torch.testing.assert_close(o, exact[:, :, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, exact_lse[:, :, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("read_frac", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("pieces", [1, 7])
def test_two_levels_count_every_token_once(read_frac, pieces):
    """Beyond `expand` superblocks the summary scores superblocks, expands the best into their
    blocks and estimates the rest whole: with keys and values constant per superblock (so per
    block too) read + estimate is exact, whatever is read and whichever are expanded; added
    in pieces, the superblocks are the same."""
    Hkv, G, D, B, group = 2, 3, 16, 4, 2
    k, v = blockwise_constant(Hkv, 7, group * B, D, seed=5)  # 14 blocks, 7 superblocks
    k, v = torch.cat([k, k[:, :B]], 1), torch.cat([v, v[:, :B]], 1)  # one block after the last superblock
    summary = BlockSummary(Hkv, D, B, device="cpu", dtype=torch.float32, capacity=8, group=group, expand=2)
    for part in torch.arange(k.shape[1]).tensor_split(pieces):
        summary.add(k[:, part], v[:, part])
    g = torch.Generator().manual_seed(6)
    q = torch.randn(Hkv, G, D, generator=g)
    N = k.shape[1]
    ids = torch.where(torch.rand(Hkv, N, generator=g) < read_frac, torch.arange(N), torch.tensor(-1))
    scores = summary.scores(q, 0.25)
    assert scores.fine is not None and scores.fine.shape == (Hkv, 2 * group + 1)
    o_e, lse_e = summary.estimate(scores, summary.read_per_block(ids))
    o_r, lse_r = gather_attend_ref(q.reshape(-1, D), k, v, ids, 0.25)
    o, lse = merge_states(o_r.float().view(Hkv, G, D), lse_r.float().view(Hkv, G), o_e, lse_e)
    exact, exact_lse = attend(q.unsqueeze(2), k, v, 0.25)
    torch.testing.assert_close(o, exact[:, :, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, exact_lse[:, :, 0], atol=1e-5, rtol=1e-5)
    if read_frac == 0.0:  # the mass before reading is the whole context's
        torch.testing.assert_close(summary.log_mass(scores), exact_lse[:, :, 0], atol=1e-5, rtol=1e-5)
    chosen = summary.keys.select(q, 3, scores.logits, scores.fine)  # block selection among the scored blocks
    assert chosen.shape == (Hkv, 3 * B)
    assert all(set((chosen[h] // B).tolist()) <= set(scores.fine[h].tolist()) for h in range(Hkv))


@pytest.mark.parametrize("levels", [{}, {"group": 4, "expand": 2}])
def test_a_half_precision_estimate_of_many_unread_tokens_stays_finite(levels):
    """fp16 holds at most 65,504: the values' sum weighted by unread token counts (here 3,200 of
    about 40) would overflow it, their weighted mean does not."""
    Hkv, G, D, B, nb = 1, 2, 8, 32, 100
    k, v = blockwise_constant(Hkv, nb, B, D, seed=3)
    k, v = 0.1 * k, v + 40
    half = BlockSummary(Hkv, D, B, device="cpu", dtype=torch.float16, capacity=nb * B, **levels)
    half.add(k.half(), v.half())
    q = torch.randn(Hkv, G, D, generator=torch.Generator().manual_seed(4))
    o, lse = half.estimate(half.scores(q, 0.25), torch.zeros(Hkv, nb, dtype=torch.long))
    exact, exact_lse = attend(q.unsqueeze(2), k.half().float(), v.half().float(), 0.25)
    torch.testing.assert_close(o, exact[:, :, 0], atol=0.05, rtol=1e-3)
    torch.testing.assert_close(lse, exact_lse[:, :, 0], atol=1e-2, rtol=1e-3)


def test_estimate_is_empty_when_every_token_is_read():
    k, v = blockwise_constant(2, 5, 8, 16)
    summary = summary_of(k, v, 8)
    ids = torch.arange(40).expand(2, -1)
    o, lse = summary.estimate(summary.scores(torch.randn(2, 3, 16), 0.25), summary.read_per_block(ids))
    assert torch.isneginf(lse).all() and (o == 0).all()


def test_estimate_underestimates_a_spread_block_and_counts_unread_tokens_once():
    """With spread keys, exp(q . mean_k) < mean exp(q . k) (Jensen): the estimate is a lower bound
    per block; and reading more of a block lowers its estimated count by exactly that many."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 32, 8, generator=g), torch.randn(1, 32, 8, generator=g)
    summary = summary_of(k, v, 16)
    q = torch.randn(1, 1, 8, generator=g)
    scores = summary.scores(q, 1.0)
    none_read = torch.full((1, 1), -1)
    _, lse_all = summary.estimate(scores, summary.read_per_block(none_read))
    torch.testing.assert_close(lse_all, summary.log_mass(scores))
    assert float(lse_all) <= float(torch.logsumexp((q[0] @ k[0].T), dim=-1))
    read = summary.read_per_block(torch.tensor([[0, 1, 2, 17, -1]]))
    assert read.tolist() == [[3, 1]]
    _, lse_some = summary.estimate(scores, read)
    expected = torch.logsumexp(scores.logits[0, 0] + torch.tensor([13.0, 15.0]).log(), dim=-1)
    torch.testing.assert_close(lse_some[0, 0], expected)


def test_tokens_past_the_last_full_block_are_not_summarised():
    k, v = torch.randn(1, 21, 4), torch.randn(1, 21, 4)
    summary = summary_of(k, v, 8)
    assert summary.n_blocks == 2
    torch.testing.assert_close(summary.values.landmarks[0, 0, 1], v[0, 8:16].mean(0))
    assert summary.read_per_block(torch.tensor([[20, 16, 3]])).tolist() == [[1, 0]]


@pytest.mark.parametrize(
    "changes",
    [
        dict(min_prob=1e-2),
        dict(budget="fixed", candidates_from="both"),
        dict(candidates_from="blocks", n_blocks=2),
        dict(key_index="flat", min_prob=1e-2),
    ],
    ids=str,
)
def test_every_host_token_is_read_or_estimated_once(tiny_model, tiny_ids, changes):
    cfg = OffloadConfig(n_sink=4, window=16, block_size=8, **changes)
    cache = HybridCache(tiny_model, cfg, progress=False)
    with torch.no_grad():
        tiny_model(tiny_ids[:, :300], cache=cache, use_cache=True)
        for t in range(300, 330):
            tiny_model(tiny_ids[:, t : t + 1], cache=cache, use_cache=True)
            for layer in cache.layers:
                st = layer.stats
                assert st.gathered + st.estimated == st.host_tokens * layer.n_kv_heads
                assert 0 < st.gathered < st.host_tokens * layer.n_kv_heads


def test_estimate_off_estimates_nothing(tiny_model, tiny_ids):
    cache = HybridCache(tiny_model, OffloadConfig(n_sink=4, window=16, estimate=False), progress=False)
    with torch.no_grad():
        tiny_model(tiny_ids[:, :200], cache=cache, use_cache=True)
        tiny_model(tiny_ids[:, 200:201], cache=cache, use_cache=True)
    assert cache.step_stats()["estimated"] == 0
    assert all(layer.summary is None for layer in cache.layers)


def test_two_levels_in_the_engine_stay_exact_when_everything_is_read(
    monkeypatch, tiny_model, tiny_ids, tiny_full_logits
):
    """Superblocks of 2 blocks, 1 expanded per step: the two-level scores serve block
    selection and the adaptive budget's mass, and reading everything stays exact."""
    from engine.decode import estimate
    from tests.test_attention import COVER_ALL_HYBRID, run_hybrid

    monkeypatch.setattr(estimate, "GROUP", 2)
    monkeypatch.setattr(estimate, "EXPAND", 1)
    adaptive = dict(n_sink=4, window=16, block_size=8, key_index="flat", candidates=1000, min_prob=0.0, min_ratio=0.0)
    for cfg in (OffloadConfig(**COVER_ALL_HYBRID, estimate=True), OffloadConfig(**adaptive)):
        logits, cache = run_hybrid(tiny_model, tiny_ids[:, :260], cfg, prefill=200)
        assert (logits - tiny_full_logits[:, :260]).abs().max() <= 1e-4
        summary = cache.layers[0].summary
        assert summary.coarse_keys.n_blocks > summary.expand  # the two levels were used


def test_quest_blocks_at_two_levels_come_from_the_expanded_superblocks(
    monkeypatch, tiny_model, tiny_ids, tiny_full_logits
):
    """With Quest landmarks beside the summary, a step bounds only the blocks the summary's two
    levels expanded and chooses among them; reading everything stays exact."""
    from engine.decode import estimate
    from engine.decode.select import candidates
    from tests.test_attention import COVER_ALL_HYBRID, run_hybrid

    monkeypatch.setattr(estimate, "GROUP", 2)
    monkeypatch.setattr(estimate, "EXPAND", 1)
    logits, _ = run_hybrid(tiny_model, tiny_ids[:, :260], OffloadConfig(**COVER_ALL_HYBRID, landmark="minmax"), 200)
    assert (logits - tiny_full_logits[:, :260]).abs().max() <= 1e-4
    cfg = OffloadConfig(
        n_sink=4, window=16, block_size=8, candidates_from="blocks", n_blocks=2, block_frac=1.0, landmark="minmax"
    )
    _, cache = run_hybrid(tiny_model, tiny_ids[:, :201], cfg, prefill=200)
    layer = cache.layers[0]
    assert layer.blocks is not layer.summary.keys and layer.summary.coarse_keys.n_blocks > layer.summary.expand
    assert layer.blocks.dots is block_dots and layer.summary.keys.dots is block_dots  # the engine's product
    q = torch.randn(layer.n_kv_heads, layer.group, layer.head_dim, generator=torch.Generator().manual_seed(0))
    scores = layer.summary.scores(q, 1.0)
    ids = candidates(layer, q, q.reshape(-1, layer.head_dim).numpy(), scores)
    heads = q.shape[0] * q.shape[1]
    assert layer.stats.scanned == heads * scores.fine.shape[1] < heads * layer.blocks.n_blocks
    full = layer.blocks.n_blocks * cfg.block_size
    for h in range(layer.n_kv_heads):
        blocks = set((ids[h][(ids[h] >= 0) & (ids[h] < full)] // cfg.block_size).tolist())
        assert len(blocks) == 2 and blocks <= set(scores.fine[h].tolist())


@pytest.mark.parametrize(
    "product, by_id",  # block_matmul multiplies the operands it is given; the others also take the rows ids name
    [("block_matmul", False)]
    + [
        (p, by_id)
        for p in ("block_dots", "block_dots_in_torch", "block_sums", "block_sums_in_torch")
        for by_id in (0, 1)
    ],
)
@pytest.mark.parametrize("bf16_dots", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_block_products_round_as_the_operands_product(monkeypatch, product, bf16_dots, dtype, by_id):
    # a few query heads (or weights) against landmarks held in a buffer with spare capacity, as a step multiplies
    # them, every row or those ids name: widened or not (a CPU with or without bf16 dot products), through the
    # project's kernels or not, the product keeps the operands' dtype and is their exact product rounded once
    # to it (up to the order of the fp32 sums)
    monkeypatch.setattr(ops, "bf16_dots_available", lambda: bf16_dots)
    if product == "block_dots_in_torch":
        monkeypatch.setattr(ops, "query_dots_native", lambda rows: False)
    if product == "block_sums_in_torch":
        monkeypatch.setattr(ops, "HAS_EXT", False)
    g = torch.Generator().manual_seed(0)
    buffer = torch.randn(2, 3, 300, 64, generator=g).to(dtype)
    rows = buffer[:, :, :257]  # [B, Hkv, nb, D] of a view with spare rows
    ids = torch.randint(-1, 257, (2, 3, 50), generator=g) if by_id else None
    taken = rows if ids is None else head_rows(rows, ids)  # what the product multiplies
    if product.startswith("block_sums"):
        w = torch.rand(2, 3, 4, taken.shape[-2], generator=g)  # fp32 weights, taken to the rows' dtype
        got, a, b = block_sums(w, rows, ids), w.to(dtype).double(), taken.double()
    else:
        q = torch.randn(2, 3, 4, 64, generator=g).to(dtype)
        got = block_matmul(q, rows.transpose(-1, -2)) if product == "block_matmul" else block_dots(q, rows, ids)
        a, b = q.double(), taken.transpose(-1, -2).double()
    exact = a @ b
    assert got.dtype == dtype and got.shape == exact.shape
    # one rounding to the dtype, and the fp32 sums' own error, each at most the sums' size times its epsilon
    eps = torch.finfo(dtype).eps + a.shape[-1] * torch.finfo(torch.float32).eps
    bound = eps * (a.abs() @ b.abs())
    assert (got.double() - exact).abs().le(bound).all()
