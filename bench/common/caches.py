"""Caches that hold a long context without its prefill (a prefill of 128K tokens is far out
of a CPU's reach): keys, values and the prefill queries the host indexes are built from,
drawn per channel with the means and spreads a short real prefill of the model shows.
Decode then runs the real model on them."""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from bench.common.timing import Synced
from bench.evals.tasks import FILLER
from engine import HybridCache
from engine.attention import hybrid_attention_forward

FILL_CHUNK = 65536  # positions a hybrid cache's layer takes at a time, as a prefill hands them over
RECORD_STATS = "record_stats"

Stats = list[tuple[tuple[torch.Tensor, torch.Tensor], ...]]


@torch.inference_mode()
def channel_stats(model, tok, n_tokens: int = 1024) -> Stats:
    """Per layer: the mean and std per channel of keys, values [Hkv, D] and queries [Hq, D]
    over a short real prefill (filler prose, or random token ids for a model without a
    tokenizer), on the model's device. The model's attention implementation is left as it was."""
    if tok is not None:
        ids = tok(" ".join([FILLER] * (n_tokens // 20)), return_tensors="pt").input_ids[:, :n_tokens]
    else:
        ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    seen = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = [(t[0].float().mean(1), t[0].float().std(1)) for t in (key, value, query)]
        return hybrid_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(RECORD_STATS, record)
    before = model.config._attn_implementation
    model.set_attn_implementation(RECORD_STATS)
    try:
        model(ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        model.set_attn_implementation(before)
    return [seen[i] for i in range(model.config.num_hidden_layers)]


def draw(mean: torch.Tensor, std: torch.Tensor, count: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """[H, count, D] rows drawn per channel from N(mean, std²) of each head's mean, std [H, D],
    on the generator's device; head by head: a million fp32 rows of every head at once would not fit."""
    out = torch.empty(mean.shape[0], count, mean.shape[1], dtype=dtype, device=gen.device)
    for h in range(mean.shape[0]):
        noise = torch.randn(count, mean.shape[1], generator=gen, device=gen.device)
        out[h] = (mean[h] + std[h] * noise).to(dtype)
    return out


def fill(cache, stats: Stats, n: int, *, dtype: torch.dtype, seed: int = 0, chunk: int = FILL_CHUNK) -> float:
    """Put n synthetic positions in every layer of `cache`, drawn from `stats` (`channel_stats`)
    on their device. A HybridCache's layers take them chunk by chunk, as a prefill hands them
    over (a million positions' copies at once would not fit), with the build queries its
    configuration keeps, and then build their host indexes; another cache (a DynamicCache)
    takes each layer's at once. Returns the seconds of the index build (synchronised; 0 for
    other caches)."""
    device = stats[0][0][0].device
    gen = torch.Generator(device=device).manual_seed(seed)
    hybrid = isinstance(cache, HybridCache)
    with torch.inference_mode():
        for i, ((km, ks), (vm, vs), (qm, qs)) in enumerate(stats):
            if not hybrid:
                cache.update(draw(km, ks, n, dtype, gen)[None], draw(vm, vs, n, dtype, gen)[None], i)
                continue
            layer = cache.layers[i]
            for start in range(0, n, chunk):
                count = min(chunk, n - start)
                layer.load_kv(draw(km, ks, count, dtype, gen), draw(vm, vs, count, dtype, gen))
            layer.add_build_queries(draw(qm, qs, cache.offload_config.max_build_queries, dtype, gen))
    if not hybrid:
        return 0.0
    with Synced(device) as t:
        cache.build_indexes()
    return t.seconds


def cache_bytes(cache, device: torch.device) -> tuple[int, int]:
    """(device bytes, host bytes) a cache holds, by where its tensors are."""
    if isinstance(cache, HybridCache):
        report = cache.memory_report()
        return sum(report["device"].values()), sum(report["host"].values())
    on_device = on_host = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t.device == device:
                on_device += t.nbytes
            else:
                on_host += t.nbytes
    return on_device, on_host
