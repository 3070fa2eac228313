"""Evaluation pieces shared by the evaluations (accuracy, fidelity, generation, recheck_margins).

- `CONFIGS`, `named`: the engine configurations they compare, by name;
- `copy_state`: a prefilled cache's positions in a full-attention cache or in
  another engine configuration (the host indexes are copied, not rebuilt);
- `prefilled`, `prefill_and_answer`: a prompt prefilled once, and full attention's greedy answer;
- `decode_with`: greedy answers from a prefilled state with a selection rule of the caller's
  (the oracle, a peer) in place of the engine's;
- `OracleSelect`: a selection rule for `engine.decode.step.decode_step` that reads
  the host tokens exact attention weighs most (it scores every host key: for
  measuring what a selector could reach at the same read share, not for use);
- `LayerProbe`: an attention function that runs the engine and measures, per
  layer and decode step, the relative error of its attention output and of the
  oracle's at the engine's own per-head read counts, with and without the
  estimate of unread tokens.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import numpy as np
import torch
from transformers import AttentionInterface, DynamicCache

from engine import HybridCache, OffloadConfig
from engine.api import prefill
from engine.attention import hybrid_attention_forward
from engine.cache import HybridLayer
from engine.decode.merge import attend, merge_states
from engine.decode.select import always_read
from engine.decode.step import host_state
from engine.generation import Decoding
from engine.index.distinct import unique_rows


def _cpu(preset: str, **overrides) -> OffloadConfig:
    return OffloadConfig.preset(preset, device="cpu", **overrides)


def _before_fit(**overrides) -> OffloadConfig:
    """The default with its re-check runs as before 2026-12-05 (credit over 24 steps, no fitted wider run)."""
    return _cpu("default", **{"recheck_credit_steps": 24, "recheck_fit_wider": False, **overrides})


# The configurations the evaluations compare, by name (each script offers those it can run: `named`).
CONFIGS = {
    "default": _cpu("default"),
    "tight": _cpu("tight"),
    "fixed": _cpu("fixed"),
    "fixed-noest": _cpu("fixed", estimate=False),  # the default before the estimate and the adaptive budget
    "default-norecheck": _cpu("default", recheck_margin=0.0),  # without re-checking near ties (engine.decode.recheck)
    "default-noest": _cpu("default", estimate=False),  # without the estimate of unread tokens
    "neighbours": _cpu("default", neighbours=3),  # also rating the 3 tokens on each side of every token read
    "mean-blocks": _cpu("default", landmark="mean"),  # blocks by mean key, as before Quest's bound
    "fewer-blocks": _cpu("default", block_frac=0.04),  # 4% of the host blocks instead of 8%, as before
    "default-no-growth": _cpu("default", grow_from=0),  # the same counts at every length, as before
    "default-unbounded": _cpu("default", recheck_share=1.0),  # every near tie re-checked, as before the bound
    "default-exact-recheck": _cpu("default", recheck_widen=1.0),  # near ties straight to the exact run, as before
    # the default before 2026-12-05: wider runs spend ahead over an answer's first 24 steps, none fitted to the limit
    "default-credit-24": _before_fit(),
    # ... spending ahead over every step asked for, as before recheck_credit_steps
    "default-credit-all": _before_fit(recheck_credit_steps=0),
    # the re-check bounds before 2026-12-03: exact runs on at most 5% of a generation's steps, wider runs 4x and 16x
    "default-5pct-widen4": _before_fit(recheck_share=0.05, recheck_widen=4.0),
    # exact runs on at most 2% of the steps with wider runs 4x and 16x, or one 4x run; the bounds of today (3x and
    # 9x) were run by the name default-exact-2pct-widen3 before they became the default
    "default-exact-2pct": _before_fit(recheck_share=0.02, recheck_widen=4.0),
    "default-exact-2pct-widen3": _before_fit(recheck_share=0.02, recheck_widen=3.0),
    "default-exact-2pct-one-wider": _before_fit(recheck_share=0.02, recheck_widen=4.0, recheck_wider_runs=1),
    # the first wider run (3x) alone: no 9x run to spend ahead early in a short answer (issue 31's 3x bound)
    "default-one-wider": _before_fit(recheck_wider_runs=1),
    # no spending ahead, and a wider run the limit does not afford not run at all
    "default-no-credit": _before_fit(recheck_credit_steps=1),
    # today's default (nothing spent ahead, a wider run fitted to the limit), run by this name before it became it
    "default-no-credit-fit": _cpu("default", recheck_credit_steps=1, recheck_fit_wider=True),
    # an exact run takes every position decoded since the last one (up to the window), as before recheck_work
    "default-full-span": _cpu("default", recheck_work=0),
    # every host token read, nothing estimated or re-checked: full attention through the engine
    "exact": _cpu("block", n_blocks=10**9, block_frac=1.0, estimate=False, recheck_margin=0.0),
}


def named(*names: str) -> dict[str, OffloadConfig]:
    """The configurations `names` of `CONFIGS`, in that order."""
    return {name: CONFIGS[name] for name in names}


def copy_state(
    src: HybridCache, model, cfg: OffloadConfig | None, *, indexes: bool = True
) -> HybridCache | DynamicCache:
    """The same positions' K/V in a full-attention DynamicCache (cfg None), or in a hybrid
    cache with `cfg`; its host indexes (and key sketch) are then the source's, copied rather
    than built again (`HybridLayer.copy_indexes_from`: `cfg` must keep the source's sinks and
    key index and a window no longer than its), or with `indexes=False` left out, for a selection
    rule that does not use them."""
    dst = DynamicCache() if cfg is None else HybridCache(model, cfg, progress=False)
    with torch.no_grad():
        for i, layer in enumerate(src.layers):
            k, v = layer.ordered_kv()
            if cfg is None:
                dst.update(k[None], v[None], i)
                continue
            dst.layers[i].load_kv(k, v)
            if indexes:
                dst.layers[i].copy_indexes_from(layer)
    return dst


@torch.inference_mode()
def prefilled(model, ids: torch.Tensor, cfg: OffloadConfig, chunk: int, attention: str = "hybrid"):
    """ids [1, T] prefilled into a HybridCache with `cfg` (exact, chunked; host indexes built),
    with the registered attention function `attention` (the engine's or one wrapping it).
    Returns (the cache, the prefill's last logits)."""
    model.set_attn_implementation(attention)
    source = HybridCache(model, cfg, progress=False)
    logits = prefill(model, ids, source, chunk, progress=False)
    source.build_indexes()
    return source, logits


@torch.inference_mode()
def prefill_and_answer(
    model, ids: torch.Tensor, cfg: OffloadConfig, chunk: int, max_new: int, eos: set[int], attention: str = "hybrid"
):
    """Prefill ids [1, T] once (`prefilled`) and let full attention answer greedily from a copy
    of that state. Returns (the cache, the prefill's last logits, full attention's tokens); the
    model is left on "hybrid"."""
    source, logits = prefilled(model, ids, cfg, chunk, attention)
    model.set_attn_implementation("sdpa")
    full = greedy(model, copy_state(source, model, None), logits, max_new, eos)
    model.set_attn_implementation("hybrid")
    return source, logits, full


@torch.inference_mode()
def greedy(model, cache, logits, max_new: int, eos: set[int], record: list | None = None, forced=None) -> list[int]:
    """Greedy tokens from the prefill's last logits [vocab]: up to max_new, stopping after an
    EOS token (engine.generation.Decoding, as HybridLLM decodes: near ties re-checked). `forced`
    (a token list) feeds those tokens instead of the model's own picks (teacher forcing), still
    returning the model's picks. With a HybridCache, `record` collects each step's
    {"kv_read_frac", "selected_frac", "rechecked", "changed", "widened", "wider_runs"} (engine.decode.recheck.RowShare)
    and "gap",
    between the two highest logits the next token is picked from."""
    run = Decoding(model, cache, logits, max_new, eos=eos, forced=None if forced is None else [forced])
    tokens = [token for _, token in run]
    if record is not None:
        record.extend(
            {
                "kv_read_frac": s.kv_read,
                "selected_frac": s.selected,
                "rechecked": int(s.rechecked),
                "changed": int(s.changed),
                "widened": int(s.widened),
                "wider_runs": s.wider_runs,
                "gap": gap,
            }
            for s, gap in run.row_steps(0)
        )
    return tokens


SELECTING = "hybrid_selecting"  # the attention function decode_with registers


def decode_with(model, source, logits, max_new: int, eos: set[int], rule, cfg, record: list | None = None) -> list[int]:
    """Greedy tokens (as `greedy`, `record` too) from a copy of the prefilled `source` in a cache
    with `cfg`, its host indexes left out, decoded with the selection rule `rule` in place of the
    engine's; the model is left on "hybrid"."""
    AttentionInterface.register(SELECTING, selecting(rule))
    model.set_attn_implementation(SELECTING)
    try:
        return greedy(model, copy_state(source, model, cfg, indexes=False), logits, max_new, eos, record)
    finally:
        model.set_attn_implementation("hybrid")


def host_mass(layer: HybridLayer, q: torch.Tensor, scale: float, lse_resident: torch.Tensor) -> torch.Tensor:
    """Exact attention probability of every host token, summed over each KV head's query
    group: q [Hkv, G, D], lse_resident [Hkv, G] -> [Hkv, n_host] on the CPU."""
    keys = layer.host.keys.float()  # [Hkv, n, D]
    s = torch.bmm(q.float().cpu(), keys.transpose(1, 2)) * scale  # [Hkv, G, n]
    lse = torch.logaddexp(lse_resident.float().cpu(), torch.logsumexp(s, dim=-1))
    return torch.exp(s - lse.unsqueeze(-1)).sum(dim=1)


def top_ids(mass: torch.Tensor, counts: torch.Tensor, always: np.ndarray) -> torch.Tensor:
    """Per KV head the `always` ids plus the heaviest others, counts[h] in all: [Hkv, M] (-1 padded)."""
    mass = mass.clone()
    mass[:, torch.from_numpy(always)] = float("inf")  # read anyway: they come first
    m = int(counts.max()) if len(counts) else 0
    m = min(max(m, len(always)), mass.shape[1])
    ids = torch.topk(mass, m, dim=1).indices
    keep = torch.arange(m).unsqueeze(0) < counts.clamp_min(len(always)).unsqueeze(1)
    return unique_rows(torch.where(keep, ids, -1))


class OracleSelect:
    """Selection rule (see `decode_step`): per KV head, the host tokens that exact attention
    weighs most (summed over the query group), `frac` of the host tokens, or `counts`
    [Hkv] when set; the tokens every step must read (`always_read`) are among them."""

    def __init__(self, frac: float = 0.05):
        self.frac, self.counts = frac, None

    def __call__(self, layer, q, q_host, scale, lse_resident, blocks=None) -> torch.Tensor:
        n = self.counts if self.counts is not None else torch.full((layer.n_kv_heads,), round(self.frac * layer.host.n))
        layer.stats.scanned = layer.stats.keys_scored = layer.n_kv_heads * layer.host.n
        layer.stats.rated = 0  # scored exactly, none rated against a threshold
        return top_ids(host_mass(layer, q, scale, lse_resident), n, always_read(layer))


def relative_error(o: torch.Tensor, exact: torch.Tensor) -> float:
    """‖o − exact‖ / ‖exact‖ over a layer's query heads."""
    exact = exact.float().cpu()
    return float((o.float().cpu() - exact).norm() / exact.norm())


class LayerProbe:
    """Attention function: the engine's own output, and on decode steps of `layers` a
    record per (layer, step) of its relative error against exact attention, the oracle's
    at the same per-head read counts with and without the estimate, and the read share."""

    def __init__(self, layers=None, oracle: bool = True):
        self.layers, self.oracle = layers, oracle
        self.records: dict[int, list[dict]] = defaultdict(list)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        out, w = hybrid_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if not isinstance(key, HybridLayer) or query.shape[2] != 1 or key.host.n == 0 or key.rerun:
            return out, w  # a step run again exactly (engine.decode.recheck) is not the engine's selection
        layer = key
        if self.layers is not None and layer.layer_idx not in self.layers:
            return out, w
        with torch.no_grad():
            self.records[layer.layer_idx].append(self.measure(layer, query, out, scaling))
        return out, w

    def measure(self, layer: HybridLayer, query, out, scaling) -> dict:
        Hkv, G, D = layer.n_kv_heads, layer.group, layer.head_dim
        q = query[0].view(Hkv, G, 1, D)
        scale = scaling if scaling is not None else D**-0.5
        exact = attend(q, *layer.ordered_kv(), scale)[0]  # [Hkv, G, 1, D]
        read = layer.stats.read_ids
        rec = {
            "err": relative_error(out[0, 0].view(Hkv, G, 1, D), exact),
            "read": float((read >= 0).sum()) / (Hkv * layer.host.n),
        }
        if self.oracle:
            rk, rv, _ = layer.resident()
            o_r, lse_r = attend(q, rk, rv, scale)
            ids = top_ids(host_mass(layer, q[:, :, 0], scale, lse_r[..., 0]), (read >= 0).sum(1), always_read(layer))
            q_host = q.reshape(Hkv * G, D).float().cpu()
            variants = {"oracle": None}
            if layer.summary is not None:
                variants["oracle_est"] = layer.summary.scores(q[:, :, 0], scale)
            for name, blocks in variants.items():
                o_h, lse_h = host_state(layer, q_host, scale, ids, blocks)
                o = merge_states(o_r, lse_r, o_h.to(o_r.device), lse_h.to(o_r.device))[0]
                rec[f"{name}_err"] = relative_error(o, exact)
        return rec

    def layer_means(self) -> dict[int, dict[str, float]]:
        return {
            i: {k: float(np.mean([r[k] for r in recs])) for k in recs[0]} for i, recs in sorted(self.records.items())
        }


def selecting(rule):
    """An attention function that decodes with the selection rule `rule` (e.g. `OracleSelect`)
    in place of the engine's."""
    return functools.partial(hybrid_attention_forward, select=rule)
