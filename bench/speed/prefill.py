"""Time to first token: the engine's prefill and host index build against plain chunked
sdpa prefill of the same model, in one run.

Per context, on the bundled model with random token ids, the cases alternate within each
repeat (medians reported):

    sdpa          transformers' own sdpa attention with a DynamicCache, chunk by chunk
    engine        the engine's prefill (exact, chunked), then every host index built after it
    overlapped    the same, each layer's index built on a worker thread from the moment the
                  layer has seen the last prompt token (engine.index.worker); first token when the
                  last build is done
    by-layer      overlapped, the prompt through one layer after another (engine.layer_prefill):
                  each layer's build starts when the layer is done, while the next ones run
    by-layer-after  the prompt through one layer after another, every index built after it

Time to first token = prefill + what the builds leave after it; ratio = that / sdpa.

    python -m bench.speed.prefill [--quick] [--json PATH] [--contexts 2048 4096 8192] [--repeats 3]
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from transformers import DynamicCache

from ann.precompile import precompile
from bench.common import options
from bench.common.output import write_json
from bench.common.timing import in_turns
from engine import HybridCache, OffloadConfig
from engine.api import prefill
from engine.cli import run_script
from engine.models import load_model

CASES = ("sdpa", "engine", "overlapped", "by-layer", "by-layer-after")


@torch.inference_mode()
def time_case(model, ids: torch.Tensor, case: str, cfg: OffloadConfig, chunk: int) -> dict:
    if case == "sdpa":
        model.set_attn_implementation("sdpa")
        t0 = time.perf_counter()
        prefill(model, ids, DynamicCache(), chunk, progress=False)
        model.set_attn_implementation("hybrid")
        return {"prefill_s": time.perf_counter() - t0, "build_s": 0.0}
    workers = 0 if case in ("engine", "by-layer-after") else 1
    cache = HybridCache(model, cfg.replace(build_workers=workers), prompt_length=ids.shape[1], progress=False)
    try:
        t0 = time.perf_counter()
        prefill(model, ids, cache, chunk, progress=False, order="layers" if case.startswith("by-layer") else "chunks")
        t1 = time.perf_counter()
        cache.build_indexes()
        t2 = time.perf_counter()
    finally:
        cache.close()
    return {"prefill_s": t1 - t0, "build_s": t2 - t1}


def main(argv=None) -> None:
    p = options.parser(__doc__, __spec__)
    options.add_output_args(p, quick="one short context, one repeat")
    options.add_model_args(p)
    p.add_argument("--contexts", type=options.positive_int, nargs="+", help="default 2048 4096 8192 (--quick: 512)")
    p.add_argument("--repeats", type=options.positive_int, help="default 3 (--quick: 1)")
    options.add_threads_arg(p)
    args = p.parse_args(argv)
    options.distinct(args, "contexts")
    options.quick_defaults(args, contexts=([512], [2048, 4096, 8192]), repeats=(1, 3))
    options.pin_threads(args.threads)
    precompile()  # the key index's numba kernels loaded before any timing (the first build paid it)
    model, _ = load_model(args.model, attn_implementation="hybrid")
    cfg = OffloadConfig(device="cpu")
    rows = []
    for context in args.contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
        cases = {case: lambda _, case=case, ids=ids: time_case(model, ids, case, cfg, args.chunk) for case in CASES}
        times = in_turns(cases, args.repeats, warmup=0)
        sdpa = statistics.median(t["prefill_s"] for t in times["sdpa"])
        for case, ts in times.items():
            prefill_s = statistics.median(t["prefill_s"] for t in ts)
            build_s = statistics.median(t["build_s"] for t in ts)
            first = statistics.median(t["prefill_s"] + t["build_s"] for t in ts)
            row = {
                "context": context,
                "case": case,
                "prefill_s": round(prefill_s, 3),
                "build_after_s": round(build_s, 3),
            }
            row.update(first_token_s=round(first, 3), ratio_to_sdpa=round(first / sdpa, 3), repeats=args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        config = {"model": args.model, "threads": args.threads, "chunk": args.chunk, "repeats": args.repeats}
        write_json(args.json, {"config": config, "rows": rows})


if __name__ == "__main__":
    run_script(main)
