"""The "hybrid" attention implementation, registered with transformers'
`AttentionInterface` (and its mask function with `AttentionMaskInterface`).

With a `HybridCache`, the cache layer's `update()` hands the layer itself to
this function as `key`/`value`:

- prefill (several query positions): exact causal attention over the resident
  set and the host store, key block by key block, merged by log-sum-exp;
- decode (one position): exact attention over sinks + window on the device,
  gather-attend over the selected host tokens on the host, merged by
  log-sum-exp.

Without a HybridCache (e.g. `use_cache=False`) it is plain sdpa.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from engine import ops
from engine.cache import HybridLayer
from engine.merge import attend, merge_states
from engine.retrieval import select_host_ids

NAME = "hybrid"


def hybrid_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, select=select_host_ids, **kwargs
):
    """query [1, Hq, Q, D] post-RoPE; key/value: the HybridLayer. Returns ([1, Q, Hq, D], None).
    `select` is the decode steps' selection rule (see `decode_step`)."""
    if not isinstance(key, HybridLayer):
        return _sdpa_fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer: HybridLayer = key
    _, Hq, Q, D = query.shape
    scale = scaling if scaling is not None else D**-0.5
    q = query[0].view(layer.n_kv_heads, layer.group, Q, D)  # [Hkv, G, Q, D]
    if Q == 1:
        o = decode_step(layer, q, scale, select)
    else:
        o = prefill_attention(layer, q, scale)
    return o.reshape(Hq, Q, D).transpose(0, 1).unsqueeze(0).to(query.dtype), None


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
    if layer.key_index is None and layer.cfg.mode != "block":
        layer.query_sample.add(q.reshape(Hkv * G, Q, D), torch.arange(first, layer.n_seen))
    o, lse = attend(q, *layer.last_added, scale, causal=True)
    rk, rv, rpos = layer.resident()
    earlier = np.flatnonzero(rpos < first)
    if len(earlier):
        earlier = torch.from_numpy(earlier).to(q.device)
        o, lse = merge_states(o, lse, *attend(q, rk[:, earlier], rv[:, earlier], scale))
    n_host = min(layer.host.n, max(0, first - layer.cfg.n_sink))  # host id i holds position n_sink + i
    if n_host:
        o, lse = merge_states(o, lse, *attend(q, layer.host.keys[:, :n_host], layer.host.values[:, :n_host], scale))
    if layer.builder is not None and layer.n_seen == layer.prompt_length and layer.key_index is None:
        layer.builder.submit(layer)  # the layer's last prompt token: build while later layers run
    return o


def decode_step(layer: HybridLayer, q: torch.Tensor, scale: float, select=select_host_ids) -> torch.Tensor:
    """One position's queries q [Hkv, G, 1, D]: resident attention on the device,
    retrieved host tokens through the C++ gather-attend, the unread ones estimated,
    all merged exactly. `select` picks the host ids (see `select_host_ids`; an
    evaluation may pass another rule with the same signature)."""
    Hkv, G, _, D = q.shape
    rk, rv, _ = layer.resident()
    o, lse = attend(q, rk, rv, scale)  # every resident position precedes this one
    if layer.key_index is None and layer.cfg.uses_key_index:  # not built yet: decode queries help build it
        layer.query_sample.add(q.reshape(Hkv * G, 1, D), torch.tensor([layer.n_seen - 1]))
    if layer.host.n == 0:
        return o
    qd = q[:, :, 0]  # [Hkv, G, D]
    blocks = layer.summary.scores(qd, scale) if layer.summary is not None else None  # engine.estimate
    q_host = q.reshape(Hkv * G, D).float().cpu()  # [Hq, D]
    ids = select(layer, qd, q_host.numpy(), scale, lse[..., 0], blocks)
    o_h, lse_h = host_state(layer, q_host, scale, ids, blocks)
    st = layer.stats
    st.host_tokens, st.read_ids, st.gathered = layer.host.n, ids, int((ids >= 0).sum())
    summarized = layer.summary.n_blocks * layer.cfg.block_size if blocks is not None else 0
    st.estimated = Hkv * summarized - int(((ids >= 0) & (ids < summarized)).sum())
    return merge_states(o, lse, o_h.to(q.device, non_blocking=True), lse_h.to(q.device, non_blocking=True))[0]


def host_state(layer: HybridLayer, q_host: torch.Tensor, scale: float, ids: torch.Tensor, blocks=None):
    """The host tokens' partial state for queries q_host [Hq, D] (fp32, CPU): the rows `ids`
    [Hkv, M] read exactly, and with the step's block scores (engine.estimate.BlockScores;
    None: no estimate) every other summarised token estimated. Returns (o [Hkv, G, 1, D], lse
    [Hkv, G, 1]) fp32, on the CPU or the device."""
    Hkv, G, D = layer.n_kv_heads, layer.group, layer.head_dim
    out, lse = layer.host_out, layer.host_lse
    ops.gather_attend(
        q_host, layer.host.keys, layer.host.values, ids, scale, out=out, lse=lse, n_threads=layer.cfg.host_threads
    )
    o, lse = out.view(Hkv, G, 1, D), lse.view(Hkv, G, 1)
    if blocks is not None:
        o_e, lse_e = layer.summary.estimate(blocks, layer.summary.read_per_block(ids))
        o, lse = merge_states(
            o.to(o_e.device, non_blocking=True),
            lse.to(o_e.device, non_blocking=True),
            o_e.unsqueeze(2),
            lse_e.unsqueeze(2),
        )
    return o, lse


def hybrid_mask(attention_mask=None, **kwargs):
    """No mask tensor is built: the cache layer knows every key's position and
    applies causality itself. A 2D padding mask with gaps is refused, since
    batch size 1 never needs padding."""
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError("hybrid attention does not support padded inputs (batch size 1, no padding)")
    return None


def register() -> None:
    AttentionInterface.register(NAME, hybrid_attention_forward)
    AttentionMaskInterface.register(NAME, hybrid_mask)


register()
