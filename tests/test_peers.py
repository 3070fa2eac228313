"""The published selection rules the accuracy evaluation sets beside the engine (bench.evals.peers):
each reads its share of the host tokens, chosen as its paper describes."""

import pytest
import torch
from transformers import AttentionInterface

from bench.evals.peers import PAGE, POOL, WINDOW, QuestRule, SnapRule, StreamingRule, WindowQueries
from engine import HybridCache, OffloadConfig
from engine.api import prefill

CFG = OffloadConfig(n_sink=4, window=16, block_size=8, candidates_from="blocks", estimate=False, recheck_margin=0.0)
PROMPT = 300


@pytest.fixture(scope="module")
def prefilled(tiny_model, tiny_ids):
    """The tiny prompt prefilled with the window queries kept; the model is left on "hybrid"."""
    window = WindowQueries()
    AttentionInterface.register("test_capture", window)
    tiny_model.set_attn_implementation("test_capture")
    cache = HybridCache(tiny_model, CFG, progress=False)
    try:
        prefill(tiny_model, tiny_ids[:, :PROMPT], cache, 64, progress=False)
    finally:
        tiny_model.set_attn_implementation("hybrid")
    return cache, window


def decode_query(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layer.n_kv_heads, layer.group, layer.head_dim, generator=g) * 3


def test_the_window_queries_are_the_prompts_last(prefilled):
    cache, window = prefilled
    for layer in cache.layers:
        q, positions = window.queries[layer.layer_idx]
        assert q.shape == (layer.n_kv_heads * layer.group, WINDOW, layer.head_dim)
        assert positions.tolist() == list(range(PROMPT - WINDOW, PROMPT))  # across the prefill's chunks


def test_streaming_reads_the_newest_host_tokens(prefilled):
    layer = prefilled[0].layers[1]
    n = layer.host.n
    ids = StreamingRule(0.1)(layer, decode_query(layer), None, 0.25, None)
    assert ids.tolist() == [list(range(n - round(0.1 * n), n))] * layer.n_kv_heads


def test_quest_reads_the_blocks_whose_bound_is_highest(prefilled):
    layer = prefilled[0].layers[1]
    q, n = decode_query(layer), layer.host.n
    share = 0.2
    ids = QuestRule(share)(layer, q, None, 0.25, None)
    keys = layer.host.keys.float()
    full = n // PAGE
    tail = list(range(full * PAGE, n))
    picked = -(-(round(share * n) - len(tail)) // PAGE)
    for h in range(layer.n_kv_heads):
        blocks = keys[h, : full * PAGE].reshape(full, PAGE, -1)
        # the bound by brute force: each block's largest logit is at most the sum over channels
        bound = torch.stack([(q[h, g] * blocks).amax(dim=1).sum(-1) for g in range(layer.group)]).amax(0)
        best = set(bound.topk(picked).indices.tolist())
        got = [i for i in ids[h].tolist() if i >= 0]
        assert set(got) == {b * PAGE + t for b in best for t in range(PAGE)} | set(tail)
        for b in range(full):  # a bound indeed: no key of the block scores above it
            assert (q[h] @ blocks[b].T).max() <= bound[b] + 1e-4


def test_snapkv_reads_the_top_of_a_ranking_made_once_from_the_window(prefilled):
    cache, window = prefilled
    layer = cache.layers[1]
    n, scale = layer.host.n, layer.head_dim**-0.5
    rule = SnapRule(0.1, window)
    ids = rule(layer, decode_query(layer), None, scale, None)
    # by brute force over the whole prompt, in position order: the window's causal attention
    q, positions = window.queries[1]
    k, _ = layer.ordered_kv()
    q = q.float().reshape(layer.n_kv_heads, -1, layer.head_dim)
    logits = torch.bmm(q, k.float().transpose(1, 2)) * scale  # [Hkv, G * W, T]
    causal = torch.arange(k.shape[1])[None, :] > positions.repeat(layer.group)[:, None]
    S = CFG.n_sink  # host token i is position S + i: the sinks stay resident
    mass = logits.masked_fill(causal, float("-inf")).softmax(-1)[:, :, S : S + n].sum(1)
    pooled = torch.nn.functional.avg_pool1d(mass[:, None], POOL, stride=1, padding=POOL // 2)[:, 0]
    k = round(0.1 * n)
    for h in range(layer.n_kv_heads):
        got = ids[h][ids[h] >= 0]
        assert len(set(got.tolist())) == len(got) == k
        # the top k (up to ties in the last place, which float sums may order either way)
        assert pooled[h, got].min() >= pooled[h].topk(k).values[-1] - 1e-6
    again = rule(layer, decode_query(layer, seed=1), None, scale, None)
    assert torch.equal(again, ids)  # the ranking does not follow the step's query


@pytest.mark.parametrize("rule", [StreamingRule, QuestRule])
def test_a_peer_reads_its_share_and_at_least_one_token(prefilled, rule):
    layer = prefilled[0].layers[0]
    n = layer.host.n
    for share in (0.0, 0.3, 1.0):
        ids = rule(share)(layer, decode_query(layer), None, 0.25, None)
        counts = (ids >= 0).sum(1)
        assert counts.max() <= max(1, round(share * n)) + PAGE and counts.min() >= 1
    with pytest.raises(ValueError, match="share of the host tokens"):
        rule(1.5)
