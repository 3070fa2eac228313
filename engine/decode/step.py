"""One layer's decode step: resident attention on the device, the host tokens chosen and
read, the unread ones estimated (engine.decode.estimate), and the parts merged by
log-sum-exp (engine.decode.merge); for one sequence (`decode_step`) or a batch
(`batch_decode_step`).

The host tokens are chosen and read in one native call for the whole batch where it
serves the configuration (engine.decode.host), else by the Python selection
(engine.decode.select) and the C++ gather-attend."""

from __future__ import annotations

import torch

from engine.cache.layer import HybridLayer
from engine.decode import host
from engine.decode.estimate import stacked_estimate, stacked_scores
from engine.decode.merge import attend, merge_all, merge_states
from engine.decode.select import select_host_ids
from engine.index.build import build_key_index
from engine.native import ops

# Whether a batch's device parts run stacked (`native_step`); None: on a GPU, where a small
# kernel's cost is mostly its launch. On a CPU each kernel is mostly compute on its sequence's
# own data, and the copies that stack them cost more than they save (docs/method.md, "Batches").
STACK: bool | None = None


class HostRead:
    """One sequence's host part of a decode step: the queries on the CPU, the host ids to
    read [Hkv, M] (-1 padded) and the step's block scores (None: no estimate)."""

    __slots__ = ("q_host", "ids", "blocks")

    def __init__(self, q_host: torch.Tensor, ids: torch.Tensor, blocks):
        self.q_host, self.ids, self.blocks = q_host, ids, blocks


def resident_part(layer: HybridLayer, q: torch.Tensor, scale: float):
    """The resident tokens' state for queries q [Hkv, G, 1, D]: (o [Hkv, G, 1, D], lse [Hkv, G, 1]),
    the queries sampled for the key index's build (`sample_query`)."""
    rk, rv, _ = layer.resident()
    o, lse = attend(q, rk, rv, scale)  # every resident position precedes this one
    sample_query(layer, q)
    return o, lse


def sample_query(layer: HybridLayer, q: torch.Tensor) -> None:
    """Before the key index is built, the decode queries q [Hkv, G, 1, D] join the sample it is built from:
    once a position (a wider run of it again samples nothing)."""
    if layer.key_index is None and layer.cfg.uses_key_index and not layer.rerun:
        layer.query_sample.add(q.reshape(-1, 1, q.shape[-1]), torch.tensor([layer.n_seen - 1]))


def resident_parts(seqs: list[HybridLayer], q: torch.Tensor, scale: float):
    """`resident_part` of B sequences, q [B, Hkv, G, 1, D] -> (o [B, Hkv, G, 1, D], lse [B, Hkv, G, 1]):
    one attention over all of them when they hold equally many resident tokens (after the first
    `window` steps, always)."""
    if len(seqs) == 1:  # a view, not a copy
        o, lse = resident_part(seqs[0], q[0], scale)
        return o[None], lse[None]
    filled = {min(seq.n_seen, seq.cfg.resident_tokens) for seq in seqs}
    if len(filled) > 1:
        parts = [resident_part(seq, q[b], scale) for b, seq in enumerate(seqs)]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    B, Hkv, G, _, D = q.shape
    kv = [seq.resident() for seq in seqs]
    k, v = (torch.stack([r[i] for r in kv]).flatten(0, 1) for i in (0, 1))  # [B * Hkv, R, D]
    o, lse = attend(q.reshape(B * Hkv, G, 1, D), k, v, scale)
    for b, seq in enumerate(seqs):
        sample_query(seq, q[b])
    return o.view(B, Hkv, G, 1, D), lse.view(B, Hkv, G, 1)


def resident_and_select(layer: HybridLayer, q: torch.Tensor, scale: float, select=select_host_ids):
    """A decode step up to the host kernel, for queries q [Hkv, G, 1, D]: the resident
    tokens' state (o [Hkv, G, 1, D], lse [Hkv, G, 1]) and what to read on the host
    (a HostRead; None when the host store is empty). Sets the layer's step counters."""
    Hkv, G, _, D = q.shape
    o, lse = resident_part(layer, q, scale)
    if layer.host.n == 0:
        return o, lse, None
    qd = q[:, :, 0]  # [Hkv, G, D]
    blocks = layer.summary.scores(qd, scale) if layer.summary is not None else None  # engine.decode.estimate
    q_host = q.reshape(Hkv * G, D).float().cpu()  # [Hq, D]
    ids = select(layer, qd, q_host.numpy(), scale, lse[..., 0], blocks)
    st = layer.stats
    st.host_tokens, st.read_ids, st.gathered = layer.host.n, ids, int((ids >= 0).sum())
    summarized = layer.summary.n_blocks * layer.cfg.block_size if blocks is not None else 0
    st.estimated = Hkv * summarized - int(((ids >= 0) & (ids < summarized)).sum())
    return o, lse, HostRead(q_host, ids, blocks)


def decode_step(layer: HybridLayer, q: torch.Tensor, scale: float, select=select_host_ids) -> torch.Tensor:
    """One position's queries q [Hkv, G, 1, D]: resident attention on the device,
    retrieved host tokens through the C++ gather-attend, the unread ones estimated,
    all merged exactly. `select` picks the host ids (see `select_host_ids`; an
    evaluation may pass another rule with the same signature)."""
    if host.serves(layer, select):
        return native_step([layer], q[None], scale)[0]
    o, lse, read = resident_and_select(layer, q, scale, select)
    if read is None:
        return o
    o_h, lse_h = host_state(layer, read.q_host, scale, read.ids, read.blocks)
    return merge_states(o, lse, o_h.to(q.device, non_blocking=True), lse_h.to(q.device, non_blocking=True))[0]


def batch_decode_step(seqs: list[HybridLayer], q: torch.Tensor, scale: float, select=select_host_ids) -> torch.Tensor:
    """`decode_step` for the B sequences of one layer, q [B, Hkv, G, 1, D]: each selects
    its host ids, one gather-attend call reads them all (sequences x KV heads share the
    kernel's threads), one merge on the device. Each sequence's output is what
    `decode_step` gives it alone. -> o [B, Hkv, G, 1, D] fp32."""
    if host.serves(seqs[0], select):
        return native_step(seqs, q, scale)
    B, Hkv, G, _, D = q.shape
    steps = [resident_and_select(seq, q[b], scale, select) for b, seq in enumerate(seqs)]
    o = torch.stack([s[0] for s in steps])
    lse = torch.stack([s[1] for s in steps])
    reading = [b for b, s in enumerate(steps) if s[2] is not None]
    if not reading:
        return o
    reads = [steps[b][2] for b in reading]
    width = max(r.ids.shape[1] for r in reads)
    ids = torch.full((len(reads), Hkv, width), -1, dtype=torch.int64)
    for i, r in enumerate(reads):
        ids[i, :, : r.ids.shape[1]] = r.ids
    out, lse_c = ops.gather_attend_batch(
        torch.stack([r.q_host for r in reads]),
        [seqs[b].host.keys for b in reading],
        [seqs[b].host.values for b in reading],
        ids,
        scale,
        n_threads=seqs[0].cfg.host_threads,
    )
    o_h = torch.zeros_like(o)
    lse_h = torch.full_like(lse, float("-inf"))  # a sequence with no host tokens adds nothing
    for i, b in enumerate(reading):
        part = with_estimate(
            seqs[b], out[i].view(Hkv, G, 1, D), lse_c[i].view(Hkv, G, 1), reads[i].blocks, reads[i].ids
        )
        o_h[b], lse_h[b] = (t.to(o.device, non_blocking=True) for t in part)
    return merge_states(o, lse, o_h, lse_h)[0]


def host_state(layer: HybridLayer, q_host: torch.Tensor, scale: float, ids: torch.Tensor, blocks=None):
    """The host tokens' partial state for queries q_host [Hq, D] (fp32, CPU): the rows `ids`
    [Hkv, M] read exactly, and with the step's block scores (engine.decode.estimate.BlockScores;
    None: no estimate) every other summarised token estimated. Returns (o [Hkv, G, 1, D], lse
    [Hkv, G, 1]) fp32, on the CPU or the device."""
    Hkv, G, D = layer.n_kv_heads, layer.group, layer.head_dim
    out, lse = layer.host_out, layer.host_lse
    ops.gather_attend(
        q_host, layer.host.keys, layer.host.values, ids, scale, out=out, lse=lse, n_threads=layer.cfg.host_threads
    )
    return with_estimate(layer, out.view(Hkv, G, 1, D), lse.view(Hkv, G, 1), blocks, ids)


def with_estimate(layer: HybridLayer, o: torch.Tensor, lse: torch.Tensor, blocks, ids=None, read=None):
    """The gathered tokens' state (o [Hkv, G, 1, D], lse [Hkv, G, 1]) merged with the estimate
    of the summarised tokens left out, given the step's block scores `blocks` (None: no estimate,
    the state unchanged) and the ids gathered [Hkv, M] or the reads per block `read` [Hkv, nb]."""
    if blocks is None:
        return o, lse
    read = layer.summary.read_per_block(ids) if read is None else read
    o_e, lse_e = layer.summary.estimate(blocks, read)
    return merge_states(
        o.to(o_e.device, non_blocking=True),
        lse.to(o_e.device, non_blocking=True),
        o_e.unsqueeze(2),
        lse_e.unsqueeze(2),
    )


def native_step(seqs: list[HybridLayer], q: torch.Tensor, scale: float, stack: bool | None = None) -> torch.Tensor:
    """`batch_decode_step` through the native host call (engine.decode.host), q [B, Hkv, G, 1, D]:
    resident attention and block scores on the device, every sequence's host side in one call,
    the estimates and the merge on the device. With `stack` (default: STACK) the device parts of sequences
    alike run as one set of kernels over their operands stacked (`host.groups`); else sequence by
    sequence, each on its own buffers. -> o [B, Hkv, G, 1, D] fp32."""
    B, Hkv, G, _, D = q.shape
    o, lse = resident_parts(seqs, q, scale)
    reading = [b for b, seq in enumerate(seqs) if seq.host.n]
    if not reading:
        return o
    layers, qd, lse_r = [seqs[b] for b in reading], _rows(q, reading)[:, :, :, 0], _rows(lse, reading)[..., 0]
    if stack is None:
        stack = q.device.type != "cpu" if STACK is None else STACK
    for layer in layers:  # a key index is built at the first step that needs it (what groups them depends on it)
        if layer.cfg.uses_key_index and layer.key_index is None:
            build_key_index(layer)
    groups = host.groups(layers, stack)
    inputs, scores = [None] * len(layers), []
    for group in groups:
        summaries = [layers[i].summary for i in group] if layers[group[0]].summary is not None else None
        q_group = _rows(qd, group)
        scores.append(None if summaries is None else stacked_scores(summaries, q_group, scale))
        for i, part in zip(group, host.prepare([layers[i] for i in group], q_group, _rows(lse_r, group), scores[-1])):
            inputs[i] = part
    res = host.read(layers, qd, inputs, scale)
    out, lse_c, counts = res.on(o.device)
    out, lse_c = out.view(len(layers), Hkv, G, 1, D), lse_c.view(len(layers), Hkv, G, 1)
    parts = []  # per group: the host tokens' state read, and the unread ones' estimated
    for group, blocks in zip(groups, scores):
        part = [(_rows(out, group), _rows(lse_c, group))]
        if blocks is not None:
            summaries = [layers[i].summary for i in group]
            read = _rows(counts, group)[..., : max(s.n_blocks for s in summaries)]
            o_e, lse_e = stacked_estimate(summaries, blocks, read)
            part.append((o_e.unsqueeze(-2), lse_e.unsqueeze(-1)))
        parts.append(part)
    if len(groups) == 1 and len(layers) == B:  # every sequence, in order: all parts in one merge
        return merge_all([(o, lse), *parts[0]])[0]
    o_h = torch.zeros_like(o)
    lse_h = torch.full_like(lse, float("-inf"))  # a sequence with no host tokens adds nothing
    for group, part in zip(groups, parts):
        rows = [reading[i] for i in group]
        o_h[rows], lse_h[rows] = merge_all(part) if len(part) > 1 else part[0]
    return merge_states(o, lse, o_h, lse_h)[0]


def _rows(t: torch.Tensor, index: list[int]) -> torch.Tensor:
    """t[index] for an ascending index, without a copy where it takes every row."""
    return t if len(index) == t.shape[0] else t[index]
