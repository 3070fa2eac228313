"""Gather-attend kernel against the best plain-torch equivalent, on the same data.

For Hkv = 8, G = 4, D = 128 and a host store of N tokens, times the C++ kernel
and torch (gather + matmul + softmax) for several id-list lengths M and store
dtypes, and relates the kernel's gathered bytes per second to the machine's
sequential read bandwidth measured in the same run.

The batched case (JSON key "batched") serves B sequences, each with its own
store, in one `gather_attend_batch` call, against a loop of B single calls and
the best plain-torch equivalent; each sequence's result must be bit-identical
to its single call.

    python -m bench.speed.kernel [--quick] [--json PATH] [--threads N]
"""

from __future__ import annotations

import json
import math
import platform

import torch

from bench.common.options import add_output_args, add_threads_arg, parser, pin_threads
from bench.common.output import write_json
from bench.common.timing import median_ms
from engine.cache.store import host_empty
from engine.cli import run_script
from engine.native import ops

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def read_bandwidth_gbps(reps: int) -> float:
    """Sequential read bandwidth: summing a 1 GiB fp32 tensor, far larger than any cache."""
    x = torch.ones(256 * 2**20)
    return x.numel() * 4 / median_ms(lambda: x.sum(), reps) / 1e6


def attend_gathered(q, kg, vg, scale):
    """q [H, G, D] fp32, gathered rows kg, vg [H, M, D] in the store dtype: products in that
    dtype, softmax in fp32. Returns (out [H * G, D], lse [H * G]) fp32."""
    s = torch.bmm(q.to(kg.dtype), kg.transpose(1, 2)).float() * scale  # [H, G, M]
    lse = torch.logsumexp(s, -1)
    return torch.bmm(torch.exp(s - lse.unsqueeze(-1)).to(vg.dtype), vg).float().flatten(0, 1), lse.view(-1)


def gather_rows(store, ids):
    """store [Hkv, N, D], ids [Hkv, M] -> rows [Hkv, M, D] in the store dtype."""
    return store[torch.arange(store.shape[0]).unsqueeze(1), ids]


def torch_variants(q, k, v, ids, scale):
    """Plain-torch ways of computing the same thing; the fastest one is the baseline."""
    yield "gather_fp32_bmm", lambda: ops.gather_attend_torch(q, k, v, ids, scale)
    Hkv, D = k.shape[0], k.shape[2]
    yield (
        "gather_native_bmm",
        lambda: attend_gathered(q.view(Hkv, -1, D), gather_rows(k, ids), gather_rows(v, ids), scale),
    )


def batched_torch_variants(q, ks, vs, ids, scale):
    """Plain-torch ways of computing a batch q [B, Hq, D]: each single-sequence way in a loop,
    and every sequence's rows gathered into one tensor for one pair of products."""
    singles = [dict(torch_variants(q[b], ks[b], vs[b], ids[b], scale)) for b in range(len(ks))]
    for name in singles[0]:
        yield f"loop_{name}", lambda name=name: [fns[name]() for fns in singles]
    Hkv, D = ks[0].shape[0], ks[0].shape[2]

    def one_bmm():
        kg = torch.cat([gather_rows(k, i) for k, i in zip(ks, ids)])  # [B * Hkv, M, D]
        vg = torch.cat([gather_rows(v, i) for v, i in zip(vs, ids)])
        return attend_gathered(q.view(-1, q.shape[1] // Hkv, D), kg, vg, scale)

    yield "gather_all_native_bmm", one_bmm


def best_torch(variants, reps):
    """(name, ms) of the fastest variant."""
    return min(((name, median_ms(fn, reps)) for name, fn in variants), key=lambda t: t[1])


def run_case(q, k32, stores, ids, scale, reps):
    k, v = stores
    n_valid = int((ids >= 0).sum())
    gathered = 2 * n_valid * k.shape[2] * k.element_size()
    ms_cpp = median_ms(lambda: ops.gather_attend(q, k, v, ids, scale), reps)
    best = best_torch(torch_variants(q, k, v, ids, scale), reps)
    out, _ = ops.gather_attend(q, k, v, ids, scale)
    ref, _ = ops.gather_attend_torch(q, k32[0], k32[1], ids, scale)  # fp32 stores, not rounded
    return {
        "ms_cpp": round(ms_cpp, 4),
        "ms_torch": round(best[1], 4),
        "torch_variant": best[0],
        "speedup": round(best[1] / ms_cpp, 2),
        "gathered_bytes": gathered,
        "gathered_gbps": round(gathered / ms_cpp / 1e6, 3),
        "max_abs_err": float((out.double() - ref).abs().max()),
    }


def run_batched_case(args, Hkv, G, D, scale, gen, reps, read_gbps):
    """B bf16 sequences with their own stores: one batched call vs B single calls vs torch."""
    B, N, M = (4, 8192, 512) if args.quick else (8, 32768, 2048)
    q = torch.randn(B, Hkv * G, D, generator=gen)
    ks = [host_empty((Hkv, N, D), torch.bfloat16).copy_(torch.randn(Hkv, N, D, generator=gen)) for _ in range(B)]
    vs = [host_empty((Hkv, N, D), torch.bfloat16).copy_(torch.randn(Hkv, N, D, generator=gen)) for _ in range(B)]
    ids = torch.stack([torch.randperm(N, generator=gen)[:M].sort().values for _ in range(B * Hkv)]).view(B, Hkv, M)
    kw = {"n_threads": args.threads}

    def loop():
        return [ops.gather_attend(q[b], ks[b], vs[b], ids[b], scale, **kw) for b in range(B)]

    ms_batch = median_ms(lambda: ops.gather_attend_batch(q, ks, vs, ids, scale, **kw), reps)
    ms_loop = median_ms(loop, reps)
    best = best_torch(batched_torch_variants(q, ks, vs, ids, scale), reps)
    out, lse = ops.gather_attend_batch(q, ks, vs, ids, scale, **kw)
    singles = loop()
    ref = torch.stack([ops.gather_attend_torch(q[b], ks[b], vs[b], ids[b], scale)[0] for b in range(B)])
    gathered = 2 * B * Hkv * M * D * ks[0].element_size()
    return {
        "dtype": "bf16",
        "n_seqs": B,
        "n_tokens": N,
        "n_ids": M,
        "kernel_threads": args.threads,
        "ms_batch": round(ms_batch, 4),
        "ms_loop": round(ms_loop, 4),
        "ms_torch": round(best[1], 4),
        "torch_variant": best[0],
        "loop_over_batch": round(ms_loop / ms_batch, 3),
        "speedup": round(best[1] / ms_batch, 2),
        "gathered_bytes": gathered,
        "gathered_gbps": round(gathered / ms_batch / 1e6, 3),
        "bandwidth_frac": round(gathered / ms_batch / 1e6 / read_gbps, 3),
        "equals_loop": all(torch.equal(out[b], o) and torch.equal(lse[b], l) for b, (o, l) in enumerate(singles)),
        "max_abs_err": float((out - ref).abs().max()),
    }


def main(argv=None):
    p = parser(__doc__, __spec__)
    add_output_args(p, quick="smaller store, fewer repetitions")
    add_threads_arg(p)  # the kernel's batched calls take as many
    args = p.parse_args(argv)

    pin_threads(args.threads)
    Hkv, G, D = 8, 4, 128
    N = 32768 if args.quick else 131072
    reps = 5 if args.quick else 30
    scale = 1 / math.sqrt(D)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(Hkv * G, D, generator=gen)
    k32 = torch.randn(Hkv, N, D, generator=gen), torch.randn(Hkv, N, D, generator=gen)
    read_gbps = read_bandwidth_gbps(reps)
    header = {
        "threads": args.threads,
        "kernel_threads": ops._C.max_threads() if ops.HAS_EXT else None,
        "has_ext": ops.HAS_EXT,
        "machine": platform.processor() or platform.machine(),
        "Hkv": Hkv,
        "G": G,
        "D": D,
        "n_tokens": N,
        "read_gbps": round(read_gbps, 3),
    }
    print(json.dumps(header), flush=True)
    cases = []
    for dname, dtype in DTYPES.items():
        # allocated the way the engine's host store is (huge pages where Linux gives them)
        stores = tuple(host_empty(t.shape, dtype).copy_(t) for t in k32)
        for M in (256, 2048, 8192):
            # Sorted unique ids per head, as the engine hands them over.
            ids = torch.stack([torch.randperm(N, generator=gen)[:M].sort().values for _ in range(Hkv)])
            case = {"dtype": dname, "n_tokens": N, "n_ids": M, "read_gbps": round(read_gbps, 3)}
            case.update(run_case(q, k32, stores, ids, scale, reps))
            case["bandwidth_frac"] = round(case["gathered_gbps"] / read_gbps, 3)
            print(json.dumps(case), flush=True)
            cases.append(case)
    del stores, k32
    batched = [run_batched_case(args, Hkv, G, D, scale, gen, reps, read_gbps)]
    print(json.dumps(batched[0]), flush=True)
    if args.json:
        write_json(args.json, {"config": header, "cases": cases, "batched": batched})


if __name__ == "__main__":
    run_script(main)
