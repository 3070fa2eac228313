"""Log-sum-exp merge of partial attention states, in torch (runs on any device).

A partial state over a set of keys is `(o, lse)`: the softmax-weighted value
average `o [..., D]` and the log-sum-exp of the scores `lse [...]`. Two states
over disjoint key sets merge exactly into the state over their union. A side
with lse = -inf (no keys) contributes nothing.
"""

from __future__ import annotations

import torch

from engine.cache.store import rows_on
from engine.config import PREFILL_KEY_BLOCK


def merge_states(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge `(o_a [..., D], lse_a [...])` with `(o_b, lse_b)`; returns `(o, lse)` in fp32.

    The weights are taken relative to the larger lse and normalised by their sum, so they
    add up to 1 however large |lse| is (weights e^(lse_a - lse) rounded at |lse| = 1e7
    do not); both sides empty (lse = -inf) gives o = 0 and lse = -inf."""
    lse_a, lse_b = lse_a.float(), lse_b.float()
    safe = _finite(torch.maximum(lse_a, lse_b))
    e_a, e_b = torch.exp(lse_a - safe), torch.exp(lse_b - safe)  # one of them is 1 (or both 0)
    total = e_a + e_b
    o = (e_a.unsqueeze(-1) * o_a.float() + e_b.unsqueeze(-1) * o_b.float()) / total.clamp_min(1e-30).unsqueeze(-1)
    return o, safe + total.log()


def merge_all(states: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_states` of several states `(o [..., D], lse [...])` of one shape at once, in fp32: a
    decode step merges its resident, host and estimated parts in one set of operations rather than
    two (on a GPU each operation is a kernel launched from the CPU)."""
    lse = torch.stack([state[1] for state in states]).float()  # [S, ...]
    safe = _finite(lse.amax(dim=0))
    e = torch.exp(lse - safe)  # the largest is 1 (or all are 0)
    total = e.sum(dim=0)
    o = (e.unsqueeze(-1) * torch.stack([state[0] for state in states]).float()).sum(dim=0)
    return o / total.clamp_min(1e-30).unsqueeze(-1), safe + total.log()


def _finite(peak: torch.Tensor) -> torch.Tensor:
    """The peak lse where finite, else 0 (no keys on any side): one operation, a kernel on a GPU."""
    return torch.nan_to_num(peak, nan=0.0, posinf=0.0, neginf=0.0)


# PyTorch's flash-attention kernels also return the log-sum-exp that merging needs.
_cpu_flash_op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_cuda_flash_op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None)


def _cpu_flash(q, k, v, causal: bool, scale: float):
    return _cpu_flash_op(q, k, v, 0.0, causal, attn_mask=None, scale=scale)[:2]


def _cuda_flash(q, k, v, causal: bool, scale: float):
    return _cuda_flash_op(q, k, v, 0.0, causal, False, scale=scale)[:2]


def _flash(q: torch.Tensor):
    """The fused kernel for q's device and dtype (o, lse of q [1, H, Q, D]), or None: then
    attention is a plain matmul-softmax-matmul in fp32 (on a GPU, many times slower)."""
    if q.device.type == "cpu":
        return _cpu_flash if _cpu_flash_op is not None else None
    cuda_ok = q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
    return _cuda_flash if q.device.type == "cuda" and cuda_ok and _cuda_flash_op is not None else None


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    causal: bool = False,
    block: int = PREFILL_KEY_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention that also returns the log-sum-exp.

    q [Hkv, G, Q, D], k/v [Hkv, T, D] (G query heads share each KV head); the
    keys may live on another device (the host store) and are brought to q's
    device one block of `block` keys at a time, so memory stays bounded.
    Without `causal` every query sees every key; with it, T == Q and query i
    sees keys j <= i (a chunk attending to itself).
    Returns `(o [Hkv, G, Q, D] fp32, lse [Hkv, G, Q] fp32)`; with T = 0, o = 0 and lse = -inf.
    """
    Hkv, G, Q, D = q.shape
    if causal:
        if k.shape[1] != Q:
            raise ValueError(f"causal attention needs as many keys as queries, got {k.shape[1]} and {Q}")
        return _attend_causal(q, k.to(q.device), v.to(q.device), scale, block)
    if _flash(q) is not None and k.device == q.device:
        return _attend_block(q, k, v, scale, causal=False)  # the flash kernel tiles over the keys itself
    o = q.new_zeros((Hkv, G, Q, D), dtype=torch.float32)
    lse = q.new_full((Hkv, G, Q), float("-inf"), dtype=torch.float32)
    for start in range(0, k.shape[1], block):
        kb = rows_on(k[:, start : start + block], q.device)  # [Hkv, b, D]
        vb = rows_on(v[:, start : start + block], q.device)
        o, lse = merge_states(o, lse, *_attend_block(q, kb, vb, scale, causal=False))
    return o, lse


def _attend_causal(q, k, v, scale, block):
    """Query block i attends to key blocks < i in full and to block i causally."""
    Q = q.shape[2]
    if Q <= block or _flash(q) is not None:  # the flash kernel tiles by itself
        return _attend_block(q, k, v, scale, causal=True)
    outs, lses = [], []
    for start in range(0, Q, block):
        stop = min(start + block, Q)
        o, lse = _attend_block(q[:, :, start:stop], k[:, start:stop], v[:, start:stop], scale, causal=True)
        if start:
            o, lse = merge_states(o, lse, *attend(q[:, :, start:stop], k[:, :start], v[:, :start], scale, block=block))
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _attend_block(q, k, v, scale, causal):
    """One block of keys on q's device: q [Hkv, G, Q, D], k/v [Hkv, b, D] -> (o, lse) fp32."""
    Hkv, G, Q, D = q.shape
    if k.shape[1] == 0:
        return q.new_zeros((Hkv, G, Q, D), dtype=torch.float32), q.new_full(
            (Hkv, G, Q), float("-inf"), dtype=torch.float32
        )
    flash = _flash(q)
    if flash is not None:
        if causal:  # row i sees keys <= i: each query head needs its own copy of the (chunk-sized) keys
            qh = q.reshape(1, Hkv * G, Q, D)
            kh = k.unsqueeze(1).expand(Hkv, G, -1, D).reshape(1, Hkv * G, -1, D).to(q.dtype)
            vh = v.unsqueeze(1).expand(Hkv, G, -1, D).reshape(1, Hkv * G, -1, D).to(q.dtype)
        else:  # every row sees every key: the group's heads become more query rows, keys are not copied
            qh = q.reshape(1, Hkv, G * Q, D)
            kh, vh = k.unsqueeze(0).to(q.dtype), v.unsqueeze(0).to(q.dtype)
        o, lse = flash(qh, kh, vh, causal, scale)
        return o.reshape(Hkv, G, Q, D).float(), lse[..., : qh.shape[2]].reshape(Hkv, G, Q).float()
    # Plain matmul-softmax-matmul: any device; one exp pass, max-shifted.
    s = torch.matmul(q.float().reshape(Hkv, G * Q, D), k.float().transpose(1, 2)).mul_(scale)
    s = s.view(Hkv, G, Q, -1)  # [Hkv, G, Q, b]
    if causal:
        s.masked_fill_(torch.ones(Q, Q, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    p = s.sub_(m).exp_()
    l = p.sum(dim=-1)  # [Hkv, G, Q]
    o = torch.matmul(p.view(Hkv, G * Q, -1), v.float()).view(Hkv, G, Q, D) / l.unsqueeze(-1)
    return o, m.squeeze(-1) + l.log()
