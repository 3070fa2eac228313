"""Log-sum-exp merge of partial attention states, in torch (runs on any device).

A partial state over a set of keys is `(o, lse)`: the softmax-weighted value
average `o [..., D]` and the log-sum-exp of the scores `lse [...]`. Two states
over disjoint key sets merge exactly into the state over their union. A side
with lse = -inf (no keys) contributes nothing.
"""

from __future__ import annotations

import torch

from engine.config import PREFILL_KEY_BLOCK


def merge_states(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge `(o_a [..., D], lse_a [...])` with `(o_b, lse_b)`; returns `(o, lse)` in fp32."""
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    # Both sides empty: lse = -inf, and the weights below would be NaN.
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - safe), torch.zeros_like(lse)).unsqueeze(-1)
    w_b = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(lse)).unsqueeze(-1)
    return w_a * o_a.float() + w_b * o_b.float(), lse


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    block: int = PREFILL_KEY_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention that also returns the log-sum-exp, one key block at a time
    so memory stays bounded; keys may live on another device (e.g. the host store)
    and are brought to q's device block by block.

    q [Hkv, G, Q, D], k/v [Hkv, T, D] (G query heads share each KV head).
    With positions q_pos [Q] and k_pos [T], query i sees key j only if
    k_pos[j] <= q_pos[i] (causal). Returns `(o [Hkv, G, Q, D] fp32,
    lse [Hkv, G, Q] fp32)`; a query that sees no key gets o = 0, lse = -inf.
    """
    Hkv, G, Q, D = q.shape
    T = k.shape[1]
    qf = q.float().reshape(Hkv, G * Q, D)  # [Hkv, G*Q, D]
    o = q.new_zeros((Hkv, G, Q, D), dtype=torch.float32)
    lse = q.new_full((Hkv, G, Q), float("-inf"), dtype=torch.float32)
    for start in range(0, T, block):
        kb = k[:, start : start + block].to(q.device, non_blocking=True).float()  # [Hkv, b, D]
        vb = v[:, start : start + block].to(q.device, non_blocking=True).float()
        s = torch.bmm(qf, kb.transpose(1, 2)).mul_(scale).view(Hkv, G, Q, -1)  # [Hkv, G, Q, b]
        if k_pos is not None:
            kp = k_pos[start : start + block].to(q.device)
            s.masked_fill_(kp.view(1, -1) > q_pos.to(q.device).view(-1, 1), float("-inf"))
        lse_b = torch.logsumexp(s, dim=-1)  # [Hkv, G, Q]
        p = torch.exp(s - torch.where(torch.isfinite(lse_b), lse_b, torch.zeros_like(lse_b)).unsqueeze(-1))
        o_b = torch.matmul(p.view(Hkv, G * Q, -1), vb).view(Hkv, G, Q, D)
        o, lse = merge_states(o, lse, o_b, lse_b)
    return o, lse
