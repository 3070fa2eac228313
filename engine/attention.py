"""The "hybrid" attention implementation, registered with transformers'
`AttentionInterface` (and its mask function with `AttentionMaskInterface`).

With a `HybridCache`, the cache layer's `update()` hands the layer itself to
this function as `key`/`value`:

- prefill (several query positions): exact causal attention over the resident
  set and the host store, key block by key block, merged by log-sum-exp;
- decode (one position): exact attention over sinks + window on the device,
  gather-attend over the selected host tokens on the host, merged by
  log-sum-exp.

A batch of B > 1 sequences arrives as an `engine.cache.batch.BatchLayer`: each
sequence attends through its own layer as above (prefill chunks one sequence
after another, decode steps with one host kernel call for the whole batch),
and a left-padded batch's padding columns, which the mask function reports
(`Padding`), never reach a sequence's cache.

Without a HybridCache (e.g. `use_cache=False`) it is sdpa, with the mask transformers
would give sdpa (`Shaped`: sliding windows, packed sequences).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ann.block import to_device
from engine.cache.batch import BatchLayer
from engine.cache.layer import HybridLayer
from engine.decode.merge import attend, merge_states
from engine.decode.select import select_host_ids
from engine.decode.step import batch_decode_step, decode_step

NAME = "hybrid"


def hybrid_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, select=select_host_ids, **kwargs
):
    """query [B, Hq, Q, D] post-RoPE; key/value: the HybridLayer (B = 1) or BatchLayer. Returns
    ([B, Q, Hq, D], None). `select` is the decode steps' selection rule (see `decode_step`)."""
    if not isinstance(key, (HybridLayer, BatchLayer)):
        if isinstance(attention_mask, (Padding, Shaped)):
            attention_mask = attention_mask.dense()
        return _sdpa_fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    attention_mask = _cache_mask(attention_mask, dropout)
    if isinstance(key, BatchLayer):
        return batch_attention(key, query, attention_mask, scaling, select), None
    if isinstance(attention_mask, Padding):
        raise ValueError("a single sequence is not padded: pass its tokens without padding")
    layer: HybridLayer = key
    _, Hq, Q, D = query.shape
    scale = scaling if scaling is not None else D**-0.5
    q = query[0].view(layer.n_kv_heads, layer.group, Q, D)  # [Hkv, G, Q, D]
    if Q == 1 and not layer.reruns_exactly:  # a step, or a step run again wider (engine.decode.recheck)
        o = decode_step(layer, q, scale, select)
    else:  # a chunk, or positions run again exactly
        o = prefill_attention(layer, q, scale)
    return o.reshape(Hq, Q, D).transpose(0, 1).unsqueeze(0).to(query.dtype), None


def _cache_mask(attention_mask, dropout: float):
    """The mask a HybridCache's layers apply (None: causal alone, or `Padding`); what they cannot apply is refused
    rather than left out, but a sliding window (the cache keeps every position: models.check_supported warns)."""
    if dropout:
        raise ValueError(f"a HybridCache does not apply attention dropout ({dropout}): call model.eval() first")
    if isinstance(attention_mask, Shaped):
        if not attention_mask.sliding_window_only:
            raise ValueError(
                "a HybridCache applies causal and padding masks only; this forward pass's mask goes further "
                "(packed sequences, or an or/and mask function)"
            )
        return None
    if isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            f"a HybridCache takes a 2D padding mask (or none), not a {attention_mask.dim()}D attention mask tensor"
        )
    return attention_mask


def batch_attention(batch: BatchLayer, query, attention_mask, scaling, select) -> torch.Tensor:
    """The B sequences of a BatchLayer: each takes its real columns of the chunk (padding
    columns get a zero output and never reach a cache); prefill chunks are attended
    sequence by sequence, decode steps together (`batch_decode_step`). -> [B, Q, Hq, D]"""
    B, Hq, Q, D = query.shape
    scale = scaling if scaling is not None else D**-0.5
    valid = attention_mask.chunk_columns(Q) if isinstance(attention_mask, Padding) else None
    columns = batch.take_chunk(valid)
    seqs = batch.seqs
    Hkv, G = seqs[0].n_kv_heads, seqs[0].group
    q = query.view(B, Hkv, G, Q, D)
    out = query.new_zeros(B, Hkv, G, Q, D)
    if Q == 1 and not seqs[0].reruns_exactly:  # positions run again exactly are attended as a chunk
        live = [b for b, cols in enumerate(columns) if cols is None or len(cols)]
        if live:
            o = batch_decode_step([seqs[b] for b in live], q[live], scale, select)
            out[live] = o.to(out.dtype)
    else:
        for b, cols in enumerate(columns):
            if cols is None:
                out[b] = prefill_attention(seqs[b], q[b], scale).to(out.dtype)
            elif len(cols):
                out[b, :, :, cols] = prefill_attention(seqs[b], q[b, :, :, cols], scale).to(out.dtype)
    return out.view(B, Hq, Q, D).transpose(1, 2)


def _sdpa_fallback(module, query, key, value, attention_mask, **kwargs):
    """Full attention for caches other than HybridCache. No mask is built for "hybrid"
    (see hybrid_mask), and sdpa's is_causal aligns the first query with the first key,
    so a chunk that follows cached keys gets its causal mask here, bottom-right aligned."""
    Q, T = query.shape[2], key.shape[2]
    if attention_mask is None and 1 < Q < T:
        attention_mask = torch.ones(Q, T, dtype=torch.bool, device=query.device).tril_(T - Q)[None, None]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def prefill_attention(layer: HybridLayer, q: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact causal attention of a chunk's queries q [Hkv, G, Q, D]: to the chunk itself
    causally, and in full to every earlier position, wherever it lives."""
    Hkv, G, Q, D = q.shape
    first = layer.n_seen - Q  # position of the chunk's first token
    if layer.key_index is None and layer.cfg.candidates_from != "blocks" and not layer.rerun:
        layer.query_sample.add(q.reshape(Hkv * G, Q, D), torch.arange(first, layer.n_seen))
    o, lse = attend(q, *layer.last_added, scale, causal=True)
    layer.last_added = None  # read once: every layer holding its chunk until its next update adds up on the device
    rk, rv, rpos = layer.resident()
    earlier = np.flatnonzero(rpos < first)
    if len(earlier):
        earlier = to_device(earlier, q.device)
        o, lse = merge_states(o, lse, *attend(q, rk[:, earlier], rv[:, earlier], scale))
    n_host = min(layer.host.n, max(0, first - layer.cfg.n_sink))  # host id i holds position n_sink + i
    if n_host:
        o, lse = merge_states(o, lse, *attend(q, *layer.host_rows(q.device, n_host), scale))
    if (
        layer.builder is not None
        and layer.n_seen == layer.prompt_length
        and layer.key_index is None
        and not layer.rerun
    ):
        layer.builder.submit(layer)  # the layer's last prompt token: build while later layers run (once: not again)
    return o


class Padding:
    """The "hybrid" mask of a padded batch: which key columns hold real tokens. The cache
    layers know every key's position and apply causality themselves, so this is all the
    batched attention needs; `dense()` builds sdpa's 4D mask for caches other than HybridCache."""

    def __init__(self, key_valid: torch.Tensor, mask_kwargs: dict):
        # [B, kv_length] bool, on the host: one copy a forward pass, where a copy in each layer
        # would wait on a GPU for every kernel queued before it
        self.key_valid = key_valid.cpu()
        self.mask_kwargs = mask_kwargs

    def chunk_columns(self, q_length: int) -> torch.Tensor:
        """valid [B, q_length] (CPU): the columns of the latest chunk (the timeline's last ones)."""
        return self.key_valid[:, -q_length:]

    def dense(self) -> torch.Tensor:
        return sdpa_mask(**self.mask_kwargs)


class Shaped:
    """The "hybrid" mask of unpadded input whose mask is more than causal: a sliding window (`local_size`),
    or a mask function transformers changed (packed sequences, or/and masks: no causal skip allowed).
    `dense()` builds sdpa's mask for caches other than HybridCache."""

    def __init__(self, mask_kwargs: dict):
        self.mask_kwargs = mask_kwargs
        self.sliding_window_only = mask_kwargs.get("allow_is_causal_skip", True) is not False

    def dense(self) -> torch.Tensor | None:
        return sdpa_mask(**self.mask_kwargs)


def hybrid_mask(attention_mask=None, **kwargs):
    """No mask tensor for unpadded causal input: the cache layer knows every key's position and
    applies causality itself. A 2D padding mask with gaps becomes a `Padding`; a mask beyond
    causality (a sliding window, packed sequences) a `Shaped`."""
    padded = attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all())
    if padded:
        kv_length = kwargs.get("kv_length", attention_mask.shape[1])
        return Padding(attention_mask[:, -kv_length:].bool(), dict(attention_mask=attention_mask, **kwargs))
    if kwargs.get("allow_is_causal_skip", True) is False or kwargs.get("local_size") is not None:
        return Shaped(dict(attention_mask=attention_mask, **kwargs))
    return None


def register() -> None:
    AttentionInterface.register(NAME, hybrid_attention_forward)
    AttentionMaskInterface.register(NAME, hybrid_mask)


register()
