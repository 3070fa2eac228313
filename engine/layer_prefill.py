"""The prefill layer by layer (OffloadConfig.prefill_order = "layers").

Fed chunk by chunk through the whole model, every chunk of a long prompt attends to the
earlier chunks' K/V of every layer, which by then lie in the host store: on a GPU they are
copied back, chunk after chunk (at 131,072 tokens in chunks of 1,024, about 1 TiB over the
prompt for a Llama-3-8B). Here the whole prompt goes through one layer, chunk by chunk, before
the next layer: the layer's host rows are also kept on the device (engine.cache.store.DeviceRows)
for its later chunks, then dropped, so nothing is read back, and the layer's index build starts
while the next layers run. The prompt's hidden states stay on the device between layers
([T, hidden] in the model's dtype), which the memory plan counts.

The same chunks attend to the same keys as in a chunked prefill, so the cache holds the same
K/V and the logits agree (to the bit on the CPU; on a GPU a chunked prefill attends to the host
rows block by block, so their rounding differs).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from engine.cache import HybridCache
from engine.cache.layer import HybridLayer
from engine.cache.store import DeviceRows


def prefill_by_layer(model, ids: torch.Tensor, cache: HybridCache, bounds: list[tuple[int, int]], *, progress=True):
    """Feed the prompt ids [1, T] (engine.prefill.prefill checks them) into the empty single-sequence
    `cache` one decoder layer at a time, each in the chunks [start, end) of `bounds`
    (engine.prefill.chunk_bounds); returns the last position's logits [vocab]."""
    if not isinstance(cache, HybridCache):
        raise TypeError(f"a prefill layer by layer fills a HybridCache, got {type(cache).__name__}")
    layers = cache.layers
    if any(not isinstance(layer, HybridLayer) or layer.is_initialized for layer in layers):
        raise ValueError("a prefill layer by layer starts from an empty single-sequence cache")
    inner, cfg = model.model, cache.offload_config
    T = ids.shape[1]
    hidden = inner.embed_tokens(ids)  # [1, T, hidden], overwritten chunk by chunk by each layer's output
    positions = torch.arange(T, device=ids.device)[None]
    cos, sin = inner.rotary_emb(hidden, position_ids=positions)
    host_dtype = cfg.resolved_host_dtype(hidden.dtype)
    for decoder, layer in tqdm(
        list(zip(inner.layers, layers)), desc="prefill", unit="layer", disable=not progress, leave=False
    ):
        layer.device_rows = DeviceRows(max(0, T - cfg.resident_tokens), host_dtype)
        try:
            for start, end in bounds:
                hidden[:, start:end] = decoder(
                    hidden[:, start:end],
                    attention_mask=None,  # the hybrid attention applies causality itself (engine.attention)
                    position_ids=positions[:, start:end],
                    cache=cache,
                    use_cache=True,
                    position_embeddings=(cos[:, start:end], sin[:, start:end]),
                )
        finally:
            layer.device_rows = None
    return model.lm_head(inner.norm(hidden[:, -1:]))[0, -1]
