"""Published KV-selection methods as selection rules (engine.decode.step.decode_step's `select`),
each reading a given share of the host tokens per step, for comparison at the engine's budget.

Written from the papers' descriptions; the resident sinks and window are the engine's in each:

- `StreamingRule` (StreamingLLM, "Efficient Streaming Language Models with Attention Sinks"):
  attention sinks and the recent tokens only. Given a share of the host tokens, it reads the
  newest host tokens, a longer recent window.
- `SnapRule` (after SnapKV, "SnapKV: LLM Knows What You are Looking for Before Generation"):
  the host tokens the prompt's last `WINDOW` queries attend to most, summed over those queries
  and a KV head's query group and smoothed by average pooling over `POOL` neighbouring
  positions, ranked once after the prefill; each step reads the top of that fixed ranking, and
  the host tokens added after the prefill.
- `QuestRule` (after Quest, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
  Inference"): host blocks of `PAGE` tokens ranked at every step by the upper bound of their
  attention logit, from each block's channel-wise minimum and maximum key (the largest bound
  over a KV head's query group); each step reads the best blocks, and the partial last one.

None estimates the tokens it leaves or re-checks a step: the cache they decode with has
neither (`PEER_CACHE`). `WindowQueries` is the attention function that keeps the prompt's last
queries during the prefill for `SnapRule`.
"""

from __future__ import annotations

import math

import torch

from bench.evals.probes import CONFIGS
from engine.attention import hybrid_attention_forward
from engine.cache import HybridLayer

WINDOW = 32  # SnapKV's observation window: the prompt's last queries
POOL = 7  # SnapKV's pooling kernel over positions
PAGE = 16  # Quest's page: tokens per block
# the cache the peers decode with: the engine's resident sinks and window, no estimate, no re-check
PEER_CACHE = CONFIGS["default"].replace(candidates_from="blocks", estimate=False, recheck_margin=0.0)


def resident_as(base, cfg):
    """`base` (an oracle's or a peer's cache) with `cfg`'s resident set, sinks and window: a share of the host
    tokens that `cfg` read then counts the same tokens, and no more of them are resident and read exactly."""
    return base.replace(n_sink=cfg.n_sink, window=cfg.window)


def _ids(rows: list[torch.Tensor]) -> torch.Tensor:
    """Per KV head id tensors -> [Hkv, M], -1 padded."""
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)


class PeerRule:
    """A selection rule reading `share` of each KV head's host tokens per step (at least one)."""

    def __init__(self, share: float):
        if not 0 <= share <= 1:
            raise ValueError(f"a peer reads a share of the host tokens in [0, 1], got {share!r}")
        self.share = share

    def count(self, layer: HybridLayer) -> int:
        return min(layer.host.n, max(1, round(self.share * layer.host.n)))

    def __call__(self, layer, q, q_host, scale, lse_resident, blocks=None) -> torch.Tensor:
        layer.stats.scanned = layer.stats.keys_scored = layer.stats.rated = 0
        return self.choose(layer, q, scale)

    def choose(self, layer: HybridLayer, q: torch.Tensor, scale: float) -> torch.Tensor:
        raise NotImplementedError


class StreamingRule(PeerRule):
    """StreamingLLM: the newest host tokens, `share` of them."""

    def choose(self, layer, q, scale):
        n = layer.host.n
        return torch.arange(n - self.count(layer), n).expand(layer.n_kv_heads, -1).clone()


class QuestRule(PeerRule):
    """Quest: the host blocks whose keys' channel-wise bounds allow the highest logit."""

    def __init__(self, share: float):
        super().__init__(share)
        self.bounds: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # layer -> (full blocks, min, max)

    def block_bounds(self, layer: HybridLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """Channel-wise min and max key [Hkv, blocks, D] of the full blocks (the host store only grows)."""
        full = layer.host.n // PAGE
        done, lo, hi = self.bounds.get(layer.layer_idx, (0, None, None))
        if done != full:
            keys = layer.host.keys[:, done * PAGE : full * PAGE].float()
            keys = keys.reshape(layer.n_kv_heads, full - done, PAGE, -1)
            new_lo, new_hi = keys.amin(dim=2), keys.amax(dim=2)
            lo = new_lo if lo is None else torch.cat([lo, new_lo], dim=1)
            hi = new_hi if hi is None else torch.cat([hi, new_hi], dim=1)
            self.bounds[layer.layer_idx] = (full, lo, hi)
        return lo, hi

    def choose(self, layer, q, scale):
        n, full = layer.host.n, layer.host.n // PAGE
        tail = torch.arange(full * PAGE, n)  # the partial last block: no bound yet, read
        picked = max(0, min(full, math.ceil((self.count(layer) - len(tail)) / PAGE)))
        if not picked:
            return tail.expand(layer.n_kv_heads, -1).clone()
        lo, hi = self.block_bounds(layer)
        qf = q.float().cpu()  # [Hkv, G, D]
        bound = torch.maximum(qf.unsqueeze(2) * lo.unsqueeze(1), qf.unsqueeze(2) * hi.unsqueeze(1)).sum(-1)
        best = bound.amax(dim=1).topk(picked, dim=1).indices  # [Hkv, picked], the group's best bound
        tokens = (best.unsqueeze(-1) * PAGE + torch.arange(PAGE)).flatten(1)
        return _ids([torch.cat([t, tail]) for t in tokens])


class SnapRule(PeerRule):
    """SnapKV-style: a fixed ranking of the prompt's host tokens by the attention of its last
    queries (`WindowQueries`), pooled; each step reads its top `share`, and newer host tokens."""

    def __init__(self, share: float, window: WindowQueries):
        super().__init__(share)
        self.window = window
        self.ranks: dict[int, tuple[int, torch.Tensor]] = {}  # layer -> (prompt's host tokens, ranking [Hkv, n])

    def ranking(self, layer: HybridLayer, scale: float) -> tuple[int, torch.Tensor]:
        if layer.layer_idx not in self.ranks:
            q, positions = self.window.queries[layer.layer_idx]  # [Hq, W, D], [W]
            Hkv, n = layer.n_kv_heads, layer.host.n
            q = q.float().reshape(Hkv, -1, q.shape[-1])  # [Hkv, G * W, D]
            rk, _, rpos = layer.resident()
            keys = torch.cat([layer.host.keys.float(), rk.float().cpu()], dim=1)
            logits = torch.bmm(q, keys.transpose(1, 2)) * scale  # [Hkv, G * W, n + R]
            key_positions = torch.cat([torch.from_numpy(layer.positions()["host"]), torch.as_tensor(rpos)])
            later = key_positions.unsqueeze(0) > positions.repeat(q.shape[1] // len(positions)).unsqueeze(1)
            logits.masked_fill_(later, float("-inf"))  # causal: no window query sees a later position
            mass = logits.softmax(dim=-1)[:, :, :n].sum(dim=1)  # [Hkv, n]
            pooled = torch.nn.functional.avg_pool1d(mass.unsqueeze(1), POOL, stride=1, padding=POOL // 2)
            pooled = pooled[:, 0, :n]
            self.ranks[layer.layer_idx] = (n, pooled.argsort(dim=1, descending=True))
        return self.ranks[layer.layer_idx]

    def choose(self, layer, q, scale):
        n_prompt, ranks = self.ranking(layer, scale)
        newer = torch.arange(n_prompt, layer.host.n)
        top = ranks[:, : max(0, min(n_prompt, self.count(layer) - len(newer)))]
        return _ids([torch.cat([t, newer]) for t in top])


class WindowQueries:
    """Attention function for a prefill: the engine's own, keeping per layer the last `WINDOW`
    queries of the prompt ([Hq, W, D] on the CPU, with their positions) for `SnapRule`."""

    def __init__(self):
        self.queries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        if isinstance(key, HybridLayer) and query.shape[2] > 1:
            layer, Q = key, query.shape[2]
            positions = torch.arange(layer.n_seen - Q, layer.n_seen)
            q = query[0].detach().cpu()
            if layer.layer_idx in self.queries:
                before, pos = self.queries[layer.layer_idx]
                q, positions = torch.cat([before, q], dim=1), torch.cat([pos, positions])
            self.queries[layer.layer_idx] = (q[:, -WINDOW:], positions[-WINDOW:])
        return hybrid_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


# name -> the rule reading a share of the host tokens, given the prefill's window queries
PEERS = {
    "streaming": lambda share, window: StreamingRule(share),
    "snapkv": SnapRule,
    "quest": lambda share, window: QuestRule(share),
}
