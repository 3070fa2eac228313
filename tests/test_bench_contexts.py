"""Synthetic contexts of the speed benchmarks (bench.common.caches): a seed gives every cache
the same context, the prose context concentrates the decode token's attention where the flat
one spreads it, and bad arguments are refused."""

import json
import math

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bench.common.caches import DECODE_TOKEN, Prose, channel_stats, decode_push, fill
from bench.common.models import SHAPES, random_llama
from engine import HybridCache, OffloadConfig
from tests.conftest import tiny_llama

LONG = 8192  # past 1 / min_prob: flat attention puts no host token above a fixed-count budget's threshold


@pytest.fixture(scope="module")
def model():
    """The benchmarks' tiny shape, unscaled: its flat attention is close to uniform."""
    return random_llama(SHAPES["tiny-llama"], layers=2)


@pytest.fixture(scope="module")
def stats(model):
    return channel_stats(model, None, n_tokens=128)


def hybrid_cache(model, **cfg) -> HybridCache:
    return HybridCache(model, OffloadConfig(device="cpu", **cfg), progress=False)


@pytest.mark.parametrize("context", ["prose", "flat"])
def test_a_seed_gives_a_hybrid_and_a_full_cache_the_same_context(context):
    """Chunks of any size, with or without a host store: the same keys and values at every
    position of every layer; another seed, another context."""
    model = tiny_llama()
    stats = channel_stats(model, None, n_tokens=64)
    cfg = dict(n_sink=4, window=16, block_size=8, max_build_queries=32)
    hybrid, full, other = hybrid_cache(model, **cfg), DynamicCache(), DynamicCache()
    fill(hybrid, stats, 4500, dtype=torch.float32, seed=3, context=context, chunk=61)
    fill(full, stats, 4500, dtype=torch.float32, seed=3, context=context)
    fill(other, stats, 4500, dtype=torch.float32, seed=4, context=context)
    for mine, theirs, different in zip(hybrid.layers, full.layers, other.layers):
        keys, values = mine.ordered_kv()
        assert torch.equal(keys, theirs.keys[0]) and torch.equal(values, theirs.values[0])
        assert not torch.equal(keys, different.keys[0])


def test_prose_runs_and_clusters_hold_the_share_asked_for():
    """Positions in runs: about run_share of them, boosted by at least `boost`, in runs of
    consecutive positions that gather in few blocks (a uniform spread would touch most)."""
    prose = Prose(run_share=0.05, boost=3.0)
    n = 65536
    strengths = prose.strengths(n, torch.Generator().manual_seed(0))
    assert torch.equal(strengths, prose.strengths(n, torch.Generator().manual_seed(0)))
    inside = strengths > 0
    assert 0.03 < inside.float().mean() <= 0.05
    assert (strengths[inside] >= 3.0).all()
    starts = int((inside[1:] & ~inside[:-1]).sum()) + int(inside[0])
    assert 2 <= inside.sum() / starts <= 40  # mean run length
    touched = inside.view(-1, 32).any(dim=1).float().mean()
    assert touched < 0.3  # the same count of positions placed at random touches ~80% of the blocks
    assert (strengths.max() - 3.0) > 5.0  # the exponential tail: heavy hitters far above the weakest runs


def test_the_push_raises_the_mean_logit_of_the_group_by_one_nat():
    q = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0)) + 0.5  # [Hkv, G, S, D]
    push = decode_push(q, scale=0.25)  # [Hkv, D]
    raised = (q * push[:, None, None]).sum(-1).mean(dim=(1, 2)) * 0.25
    assert torch.allclose(raised, torch.ones(2), atol=1e-5)


def decode_attention(model, cache) -> list[torch.Tensor]:
    """One decode step of the benchmarks' token on `cache` (a DynamicCache): per layer, the
    group-averaged attention probabilities [Hkv, N + 1] of its queries over every position."""
    seen = []

    def record(module, query, key, value, attention_mask, **kwargs):
        Hkv, D = key.shape[1], key.shape[-1]
        q = query[0, :, -1].float().view(Hkv, -1, D)  # [Hkv, G, D]
        s = torch.einsum("hgd,hnd->hgn", q, key[0].float()) * kwargs["scaling"]
        seen.append(s.softmax(-1).mean(1))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("record_decode", record)
    model.set_attn_implementation("record_decode")
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([[DECODE_TOKEN]]), cache=cache, use_cache=True)
    finally:
        model.set_attn_implementation("hybrid")
    return seen


def top_share(p: torch.Tensor, share: float = 0.05) -> float:
    """The mass the top `share` of the positions carry, averaged over the KV heads."""
    k = math.ceil(share * p.shape[-1])
    return float(p.topk(k, dim=-1).values.sum(-1).mean())


def test_prose_concentrates_the_decode_attention_that_flat_spreads(model, stats):
    masses = {}
    for context in ("prose", "flat"):
        cache = DynamicCache()
        fill(cache, stats, LONG, dtype=torch.float32, context=context)
        masses[context] = [top_share(p) for p in decode_attention(model, cache)]
    for prose, flat in zip(masses["prose"], masses["flat"]):  # every layer, the second one's queries included
        assert prose > 0.5 and prose > flat + 0.3


def test_a_fixed_count_budget_reads_more_of_a_prose_context_than_of_a_flat_one(model, stats):
    reads = {}
    for context in ("prose", "flat"):
        # counts and threshold fixed (the default's up to grow_from): past 4K the grown threshold is the
        # uniform share, which flat attention puts about half its candidates above
        cache = hybrid_cache(model, grow_from=0)
        fill(cache, stats, LONG, dtype=torch.float32, context=context)
        shares = []
        for _ in range(3):
            with torch.inference_mode():
                model(input_ids=torch.tensor([[DECODE_TOKEN]]), cache=cache, use_cache=True)
            shares.append(cache.step_stats()["kv_read_frac"])
        reads[context] = sum(shares) / len(shares)
    assert reads["prose"] > 2 * reads["flat"]


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(context="novel"), ValueError, "unknown context 'novel'"),
        (dict(n=0), ValueError, "n must be an int >= 1"),
        (dict(n=2.5), ValueError, "n must be an int >= 1"),
        (dict(seed=-1), ValueError, "seed must be an int >= 0"),
        (dict(chunk=0), ValueError, "chunk must be an int >= 1"),
        (dict(prose={"boost": 1.0}), TypeError, "prose must be a Prose"),
    ],
)
def test_fill_refuses_bad_arguments(model, stats, kwargs, error, words):
    args = dict(n=64, dtype=torch.float32) | kwargs
    with pytest.raises(error, match=words):
        fill(DynamicCache(), stats, args.pop("n"), **args)


def test_fill_refuses_statistics_that_are_not_channel_stats(stats):
    with pytest.raises(TypeError, match="takes the Stats of channel_stats"):
        fill(DynamicCache(), list(stats), 64, dtype=torch.float32)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(run_share=0.0), "run_share must lie in"),
        (dict(run_share=1.5), "run_share must lie in"),
        (dict(shortest=8, longest=4), "shortest <= longest"),
        (dict(shortest=0), "shortest <= longest"),
        (dict(runs_per_cluster=0), "runs_per_cluster must be at least 1"),
        (dict(boost=-1.0), "boost must be a finite number"),
        (dict(tail=math.inf), "tail must be a finite number"),
        (dict(cluster_spread="wide"), "cluster_spread must be a finite number"),
    ],
)
def test_prose_refuses_bad_layouts(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Prose(**kwargs)


def test_the_benchmarks_name_the_context_and_the_read_share_of_every_figure(tmp_path):
    """decode and throughput: every row says its context kind and the share of host rows read
    beside its times (1 for full attention), and so does the run's configuration."""
    from bench.speed import decode, throughput

    out = tmp_path / "decode.json"
    argv = ["--models", "tiny-llama", "--contexts", "512", "--steps", "1", "--prefill-max", "0"]
    decode.main([*argv, "--methods", "hybrid-default", "full-sdpa", "--context", "flat", "--json", str(out)])
    run = json.loads(out.read_text())
    assert run["config"]["context_kind"] == "flat"
    for row in run["cases"]:
        assert row["context_kind"] == "flat" and 0 < row["kv_read_frac"] <= 1
        assert row["method"] != "full-sdpa" or row["kv_read_frac"] == 1.0
    out = tmp_path / "throughput.json"
    throughput.main(["--quick", "--batches", "2", "--json", str(out)])
    run = json.loads(out.read_text())
    assert run["config"]["context_kind"] == "prose"
    for row in run["cases"]:
        assert row["context_kind"] == "prose" and 0 < row["kv_read_frac"] <= 1
        assert row["method"] != "full-sdpa" or row["kv_read_frac"] == 1.0


def test_a_filled_cache_goes_when_its_owner_drops_it(model, stats):
    """The prose fill attends through a function registered for the fill alone: once it ends,
    nothing of it holds the cache (a benchmark's next case must not carry the last one's memory)."""
    import gc
    import weakref

    for make in (lambda: hybrid_cache(model, n_sink=4, window=16, block_size=8), DynamicCache):
        cache = make()
        fill(cache, stats, 600, dtype=torch.float32)
        gone = weakref.ref(cache)
        del cache
        gc.collect()
        assert gone() is None
