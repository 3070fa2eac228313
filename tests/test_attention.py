"""The hybrid attention inside a transformers model: exactness when the budgets
cover every token, every selection mode and retrieval method end to end."""

import copy

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from engine import HybridCache, OffloadConfig
from engine.decode.merge import attend
from engine.decode.rate import neighbours, read_threshold
from engine.decode.select import select_host_ids
from engine.models import SUPPORTED_MODEL_TYPES
from tests.conftest import tiny_llama

# a fixed budget whose blocks (and key-index candidates) cover every host token
COVER_ALL = dict(n_sink=4, window=16, block_size=8, n_blocks=1000, block_frac=1.0, top_k=1000, budget="fixed")
COVER_ALL_HYBRID = dict(COVER_ALL, candidates_from="both")


def run_hybrid(model, ids, cfg, prefill, chunk=None):
    """Logits of every position: prefill of `prefill` tokens (in chunks), then one token at a time."""
    cache = HybridCache(model, cfg)
    chunk = chunk or prefill
    logits = []
    with torch.no_grad():
        for start in range(0, prefill, chunk):
            logits.append(model(ids[:, start : min(start + chunk, prefill)], cache=cache, use_cache=True).logits)
        for t in range(prefill, ids.shape[1]):
            logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize(
    "source,key_index",
    [("keys", "flat"), ("blocks", "flat"), ("both", "flat"), ("both", "qq"), ("keys", "hnsw")],
)
def test_exact_when_budgets_cover_every_token(tiny_model, tiny_ids, tiny_full_logits, source, key_index):
    params = {"ef": 2000} if key_index == "hnsw" else {}
    cfg = OffloadConfig(**COVER_ALL, candidates_from=source, key_index=key_index, index_params=params)
    ids = tiny_ids[:, :260]
    logits, cache = run_hybrid(tiny_model, ids, cfg, prefill=200)
    assert (logits - tiny_full_logits[:, :260]).abs().max() <= 1e-4
    stats = cache.step_stats()
    assert stats["gathered"] == stats["host_tokens"]  # everything was retrieved ...
    assert cache.get_seq_length() == 260


def test_exact_when_an_adaptive_budget_reads_every_candidate(tiny_model, tiny_ids, tiny_full_logits):
    """min_prob and min_ratio 0 keep every candidate; the flat index proposes every host token: exact,
    with the key sketch and the estimate on the path (the estimate is then empty)."""
    cfg = OffloadConfig(
        n_sink=4, window=16, block_size=8, key_index="flat", candidates=1000, min_prob=0.0, min_ratio=0.0
    )
    logits, cache = run_hybrid(tiny_model, tiny_ids[:, :260], cfg, prefill=200)
    assert (logits - tiny_full_logits[:, :260]).abs().max() <= 1e-4
    stats = cache.step_stats()
    assert stats["gathered"] == stats["host_tokens"] and stats["estimated"] == 0
    assert 0 < stats["rated"] <= stats["host_tokens"]  # each candidate rated once per KV head


def test_a_float64_model_keeps_its_host_kv_in_float32_and_stays_exact(tiny_model, tiny_ids):
    """The host kernels read fp32, fp16 and bf16 stores: host_dtype auto takes fp32 for an fp64 model."""
    model = copy.deepcopy(tiny_model).double()
    ids = tiny_ids[:, :260]
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    logits, cache = run_hybrid(model, ids, OffloadConfig(**COVER_ALL), prefill=200)
    assert cache.layers[0].host.dtype == torch.float32 and cache.layers[0].host.n > 0
    assert (logits - full).abs().max() <= 1e-4


def test_adaptive_budget_reads_less_as_min_prob_rises(tiny_model, tiny_ids):
    read = []
    for min_prob in (0.0, 1e-3, 1e-2, 1.0):
        cfg = OffloadConfig(
            n_sink=4, window=16, block_size=8, key_index="flat", candidates=1000, min_prob=min_prob, min_ratio=0.0
        )
        _, cache = run_hybrid(tiny_model, tiny_ids[:, :310], cfg, prefill=300)
        read.append(cache.step_stats()["gathered"])
    assert read == sorted(read, reverse=True) and read[0] > read[-1]
    # the host tokens that no index or summary covers yet are read whatever min_prob says
    layer = cache.layers[0]
    assert read[-1] >= len(cache.layers) * layer.n_kv_heads * (layer.host.n - layer.summary.n_blocks * 8) > 0


def test_min_ratio_raises_the_read_threshold_at_short_contexts_only(tiny_model, tiny_ids):
    """The threshold is min_prob until min_ratio / tokens exceeds it; then fewer tokens are read."""
    cfg = OffloadConfig(min_prob=1e-4, min_ratio=0.5, grow_from=0)
    assert read_threshold(cfg, 2000) == pytest.approx(2.5e-4)
    assert read_threshold(cfg, 5000) == read_threshold(cfg, 100_000) == 1e-4
    assert read_threshold(cfg.replace(min_ratio=0.0), 10) == 1e-4
    # a budget that grows with the context lowers min_prob in proportion past grow_from
    grown = cfg.replace(grow_from=4096, min_ratio=0.0)
    assert read_threshold(grown, 4096) == 1e-4 and read_threshold(grown, 16384) == pytest.approx(2.5e-5)
    read = []
    for min_ratio in (0.0, 0.01, 3.0):  # over ~305 tokens: below min_prob, then about 1e-2
        cfg = OffloadConfig(
            n_sink=4, window=16, block_size=8, key_index="flat", candidates=1000, min_prob=1e-3, min_ratio=min_ratio
        )
        _, cache = run_hybrid(tiny_model, tiny_ids[:, :310], cfg, prefill=300)
        read.append(cache.step_stats()["gathered"])
    assert read[0] == read[1] > read[2]


def test_neighbours_are_the_ids_next_to_a_rows_ids():
    ids = torch.tensor([[5, 6, -1], [0, -1, -1], [-1, -1, -1]])
    assert neighbours(ids, 2, 8).tolist() == [[3, 4, 7], [1, 2, -1], [-1, -1, -1]]
    # a radius past the store is the store (it built 2 * r offsets: a billion took the memory)
    assert torch.equal(neighbours(ids, 10**12, 8), neighbours(ids, 8, 8))
    # those rated already (and turned away) are not rated again: they were, and counted twice in stats.rated
    rated = torch.tensor([[3, 5, 6], [2, -1, -1], [-1, -1, -1]])
    assert neighbours(ids, 2, 8, rated=rated).tolist() == [[4, 7], [1, -1], [-1, -1]]


def test_neighbours_rate_the_tokens_next_to_each_token_read(tiny_model, tiny_ids):
    """With `neighbours` r the tokens within r of each token read are rated too: at threshold 0
    all of them are read besides what was; at a threshold nothing passes, none."""
    cfg = OffloadConfig(
        n_sink=4, window=16, block_size=8, candidates_from="keys", key_index="flat", candidates=2, min_ratio=0.0
    )
    _, cache = run_hybrid(tiny_model, tiny_ids[:, :310], cfg.replace(min_prob=0.0), prefill=300)
    layer = cache.layers[-1]
    q = torch.randn(layer.n_kv_heads, layer.group, layer.head_dim, generator=torch.Generator().manual_seed(0))
    scale = layer.head_dim**-0.5

    def read(**change):
        layer.cfg = cfg.replace(**change)
        rk, rv, _ = layer.resident()
        lse = attend(q.unsqueeze(2), rk, rv, scale)[1][..., 0]
        blocks = layer.summary.scores(q, scale)
        ids = select_host_ids(layer, q, q.reshape(-1, layer.head_dim).numpy(), scale, lse, blocks)
        return [set(row[row >= 0].tolist()) for row in ids]

    alone, near = read(min_prob=0.0), read(min_prob=0.0, neighbours=2)
    for a, b in zip(alone, near):
        assert b == a | {i + d for i in a for d in (-2, -1, 1, 2) if 0 <= i + d < layer.host.n} and b > a
    assert read(min_prob=1.0, neighbours=2) == read(min_prob=1.0)


@pytest.mark.parametrize("chunk", [1, 7, 33, 200])
def test_prefill_chunking_does_not_change_logits(tiny_model, tiny_ids, tiny_full_logits, chunk):
    logits, _ = run_hybrid(
        tiny_model, tiny_ids[:, :220], OffloadConfig(**COVER_ALL, candidates_from="blocks"), 200, chunk
    )
    assert (logits - tiny_full_logits[:, :220]).abs().max() <= 1e-4


def test_greedy_generate_matches_full_attention(tiny_model, tiny_ids):
    prompt = tiny_ids[:, :150]
    kwargs = dict(max_new_tokens=40, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    with torch.no_grad():
        full = tiny_model.generate(prompt, cache=DynamicCache(), **kwargs)
        hybrid = tiny_model.generate(prompt, cache=HybridCache(tiny_model, OffloadConfig(**COVER_ALL_HYBRID)), **kwargs)
    assert torch.equal(full, hybrid)


@pytest.mark.parametrize("method", ["flat", "ivf", "hnsw", "graph", "qq"])
@pytest.mark.parametrize("source", ["keys", "blocks", "both"])
def test_every_mode_and_method_runs_with_a_partial_budget(tiny_model, tiny_ids, tiny_full_logits, source, method):
    params = {"nlist": 8, "nprobe": 2} if method == "ivf" else {}
    cfg = OffloadConfig(
        n_sink=4,
        window=16,
        block_size=8,
        n_blocks=4,
        block_frac=1.0,
        top_k=8,
        candidates_from=source,
        key_index=method,
        index_params=params,
    )
    logits, cache = run_hybrid(tiny_model, tiny_ids[:, :330], cfg, prefill=300)
    assert torch.isfinite(logits).all()
    stats = cache.step_stats()
    assert 0 < stats["gathered"] < stats["host_tokens"]  # a subset of the host store, not all of it
    err = (logits[0, 300:] - tiny_full_logits[0, 300:330]).abs().max()
    assert err < (tiny_full_logits[0, 300:330].abs().max())  # approximate, not garbage


def test_hybrid_budget_beats_resident_only(tiny_model, tiny_ids, tiny_full_logits):
    """Retrieval must matter: with the same window, retrieving host tokens gets closer to full attention."""
    ref = tiny_full_logits[0, 300:340]
    # (without the estimate: with one-token blocks it would be exact)
    resident_only = OffloadConfig(
        n_sink=4, window=16, candidates_from="blocks", n_blocks=1, block_size=1, estimate=False
    )
    retrieved = OffloadConfig(
        n_sink=4,
        window=16,
        candidates_from="both",
        key_index="flat",
        top_k=32,
        n_blocks=8,
        block_frac=1.0,
        block_size=8,
    )
    err = {}
    for name, cfg in (("resident", resident_only), ("retrieved", retrieved)):
        logits, _ = run_hybrid(tiny_model, tiny_ids[:, :340], cfg, prefill=300)
        err[name] = (logits[0, 300:] - ref).abs().mean()
    assert err["retrieved"] < 0.5 * err["resident"]


@pytest.mark.parametrize("chunk", [100, 37])
def test_without_hybrid_cache_the_implementation_is_full_attention(tiny_model, tiny_ids, tiny_full_logits, chunk):
    """With an ordinary cache "hybrid" is sdpa, chunked prefill included (causal, bottom-right aligned)."""
    cache, logits = DynamicCache(), []
    with torch.no_grad():
        for start in range(0, 100, chunk):
            logits.append(tiny_model(tiny_ids[:, start : min(start + chunk, 100)], cache=cache, use_cache=True).logits)
    assert (torch.cat(logits, 1) - tiny_full_logits[:, :100]).abs().max() <= 1e-4


def test_padding_is_refused(tiny_model, tiny_ids):
    mask = torch.ones(1, 100, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padded"), torch.no_grad():
        tiny_model(tiny_ids[:, :100], attention_mask=mask, cache=HybridCache(tiny_model, OffloadConfig()))


def test_a_single_sequence_cannot_become_a_batch(tiny_model, tiny_ids):
    cache = HybridCache(tiny_model, OffloadConfig())
    with torch.no_grad():
        tiny_model(tiny_ids[:, :100], cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="holds one sequence .* got a batch of 2"):
            tiny_model(tiny_ids[:, 100:101].expand(2, -1), cache=cache, use_cache=True)


def test_model_without_hybrid_attention_is_refused():
    model = tiny_llama(n_layers=1)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="attn_implementation='hybrid'"):
        HybridCache(model, OffloadConfig())


def test_unsupported_model_type_is_refused():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="supported model types: llama"):
        HybridCache(GPT2Config(n_layer=1), OffloadConfig())


def test_a_model_with_a_sliding_window_is_warned_that_the_whole_context_is_attended():
    import warnings

    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from engine.models import _warn_sliding_window, check_supported

    _warn_sliding_window.cache_clear()  # it warns once per model type and window in a process

    shape = dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    windowed = [  # every layer (Mistral has no layer types), or the layers past max_window_layers
        (MistralConfig(sliding_window=512, **shape), 512),
        (Qwen2Config(use_sliding_window=True, sliding_window=256, max_window_layers=2, **shape), 256),
    ]
    for config, window in windowed:
        with pytest.warns(UserWarning, match=f"sliding window of {window} tokens"):
            check_supported(config)
    # the warning names the user's line, through however many of the engine's calls (it named engine/cache/cache.py)
    _warn_sliding_window.cache_clear()
    with pytest.warns(UserWarning, match="sliding window") as caught:
        HybridCache(MistralConfig(sliding_window=512, attn_implementation="hybrid", **shape), OffloadConfig())
    assert [w.filename for w in caught] == [__file__]
    plain = [MistralConfig(sliding_window=None, **shape), Qwen2Config(sliding_window=256, **shape), LlamaConfig()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for config in plain:  # no sliding window, or one the layer types leave unused
            check_supported(config)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_each_supported_model_type_is_exact(model_type):
    """Beside the Llama of the other tests: Qwen2 adds a bias to q, k and v, Qwen3 normalises q and
    k per head before RoPE, Mistral is Llama's shape under its own classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16)
    config = AutoConfig.for_model(
        model_type, vocab_size=50, num_key_value_heads=1, max_position_embeddings=2048, sliding_window=None, **shape
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="hybrid").eval()
    ids = torch.randint(0, 50, (1, 180), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    logits, _ = run_hybrid(model, ids, OffloadConfig(**COVER_ALL_HYBRID), prefill=150)
    assert (logits - full).abs().max() <= 1e-4


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 8})])
def test_without_a_hybrid_cache_the_mask_is_what_sdpa_gets(model_type, extra):
    # the mask function was dropped: packed sequences attended across, a sliding window was ignored
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16)
    config = AutoConfig.for_model(model_type, vocab_size=50, num_key_value_heads=2, **shape, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="hybrid").eval()
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    ids = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(1))
    packed = torch.cat([torch.arange(20), torch.arange(20)])[None]  # two documents in one row
    with torch.no_grad():
        for position_ids in (None, packed):
            want = sdpa(ids, position_ids=position_ids, use_cache=False).logits
            assert (model(ids, position_ids=position_ids, use_cache=False).logits - want).abs().max() <= 1e-5


def test_a_hybrid_cache_refuses_the_masks_and_dropout_it_does_not_apply(tiny_model, tiny_ids):
    # a 4D mask and a training model's dropout were left out without a word: plain causal attention
    ids = tiny_ids[:, :30]
    custom = torch.ones(30, 30, dtype=torch.bool).tril()
    custom[20:, :10] = False  # the later tokens do not see the first ten
    with torch.no_grad():
        with pytest.raises(ValueError, match="takes a 2D padding mask \\(or none\\), not a 4D attention mask"):
            tiny_model(ids, attention_mask=custom[None, None], cache=HybridCache(tiny_model, progress=False))
        with pytest.raises(ValueError, match="takes a 2D padding mask"):
            batch = HybridCache(tiny_model, progress=False)
            tiny_model(ids.repeat(2, 1), attention_mask=custom[None, None].repeat(2, 1, 1, 1), cache=batch)
        training = tiny_llama(attention_dropout=0.5).train()
        with pytest.raises(ValueError, match="does not apply attention dropout \\(0.5\\): call model.eval"):
            training(ids, cache=HybridCache(training, progress=False))


def test_exact_on_the_matmul_path_other_devices_take(tiny_model, tiny_ids, tiny_full_logits, monkeypatch):
    from engine.decode import merge

    monkeypatch.setattr(merge, "_cpu_flash", None)
    logits, _ = run_hybrid(tiny_model, tiny_ids[:, :240], OffloadConfig(**COVER_ALL_HYBRID), prefill=200, chunk=64)
    assert (logits - tiny_full_logits[:, :240]).abs().max() <= 1e-4


@pytest.mark.parametrize("prompt", [1, 5, 19])
def test_a_prompt_shorter_than_the_resident_set_offloads_during_decode(tiny_model, tiny_ids, tiny_full_logits, prompt):
    """The key index waits for a block of host keys, built from the prefill's and the decode
    steps' queries; every position stays in one place; with budgets that read everything
    the logits stay exact."""
    cfg = OffloadConfig(
        n_sink=4, window=16, block_size=8, key_index="flat", candidates=1000, min_prob=0.0, min_ratio=0.0
    )
    logits, cache = run_hybrid(tiny_model, tiny_ids[:, :120], cfg, prefill=prompt)
    assert (logits - tiny_full_logits[:, :120]).abs().max() <= 1e-4
    for layer in cache.layers:
        assert layer.key_index is not None and layer.n_indexed >= 8 and layer.host.n == 120 - 20
        where = layer.positions()
        assert sorted(np.concatenate(list(where.values())).tolist()) == list(range(120))
