"""Gather-attend kernel against the best plain-torch equivalent, on the same data.

For Hkv = 8, G = 4, D = 128 and a host store of N tokens, times the C++ kernel
and torch (gather + matmul + softmax) for several id-list lengths M and store
dtypes, and relates the kernel's gathered bytes per second to the machine's
sequential read bandwidth measured in the same run.

    python bench/bench_kernel.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import ops  # noqa: E402
from engine.store import host_empty  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def median_ms(fn, reps: int, warmup_s: float = 0.05) -> float:
    """Median of `reps` timed calls, after running `fn` for `warmup_s` seconds (caches,
    page tables, and thread pools left spinning by the previous measurement settle)."""
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def read_bandwidth_gbps(reps: int) -> float:
    """Sequential read bandwidth: summing a 1 GiB fp32 tensor, far larger than any cache."""
    x = torch.ones(256 * 2**20)
    return x.numel() * 4 / median_ms(lambda: x.sum(), reps) / 1e6


def torch_variants(q, k, v, ids, scale):
    """Plain-torch ways of computing the same thing; the fastest one is the baseline."""
    yield "gather_fp32_bmm", lambda: ops.gather_attend_torch(q, k, v, ids, scale)

    def native_dtype():
        Hkv, D = k.shape[0], k.shape[2]
        heads = torch.arange(Hkv).unsqueeze(1)
        kg, vg = k[heads, ids], v[heads, ids]  # [Hkv, M, D] in the store dtype
        s = torch.bmm(q.view(Hkv, -1, D).to(k.dtype), kg.transpose(1, 2)).float() * scale
        lse = torch.logsumexp(s, -1)
        return torch.bmm(torch.exp(s - lse.unsqueeze(-1)).to(v.dtype), vg).float().view(-1, D), lse.view(-1)

    yield "gather_native_bmm", native_dtype


def run_case(q, k32, stores, ids, scale, reps):
    k, v = stores
    n_valid = int((ids >= 0).sum())
    gathered = 2 * n_valid * k.shape[2] * k.element_size()
    ms_cpp = median_ms(lambda: ops.gather_attend(q, k, v, ids, scale), reps)
    best = min(((name, median_ms(fn, reps)) for name, fn in torch_variants(q, k, v, ids, scale)), key=lambda t: t[1])
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller store, fewer repetitions")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for torch and the kernel")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
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
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": header, "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
