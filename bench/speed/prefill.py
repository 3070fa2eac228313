"""Time to first token: the engine's prefill and host index build against plain chunked
sdpa prefill of the same model, in one run.

    python -m bench.speed.prefill [--quick] [--json PATH] [--contexts 2048 4096 8192] [--repeats 3]

Per context, on the bundled model with random token ids, the cases alternate within each
repeat (medians reported):

    sdpa          transformers' own sdpa attention with a DynamicCache, chunk by chunk
    engine        the engine's prefill (exact, chunked), then every host index built after it
    overlapped    the same, each layer's index built on a worker thread from the moment the
                  layer has seen the last prompt token (engine.index.worker); first token when the
                  last build is done

Time to first token = prefill + what the builds leave after it; ratio = that / sdpa.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from engine import HybridCache, OffloadConfig
from engine.api import prefill
from engine.models import load_model


@torch.inference_mode()
def time_case(model, ids: torch.Tensor, case: str, cfg: OffloadConfig, chunk: int) -> dict:
    if case == "sdpa":
        model.set_attn_implementation("sdpa")
        t0 = time.perf_counter()
        prefill(model, ids, DynamicCache(), chunk, progress=False)
        model.set_attn_implementation("hybrid")
        return {"prefill_s": time.perf_counter() - t0, "build_s": 0.0}
    workers = 1 if case == "overlapped" else 0
    cache = HybridCache(model, cfg.replace(build_workers=workers), prompt_length=ids.shape[1], progress=False)
    try:
        t0 = time.perf_counter()
        prefill(model, ids, cache, chunk, progress=False)
        t1 = time.perf_counter()
        cache.build_indexes()
        t2 = time.perf_counter()
    finally:
        cache.close()
    return {"prefill_s": t1 - t0, "build_s": t2 - t1}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one short context, one repeat")
    p.add_argument("--json", type=Path)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", type=int, nargs="+", help="default 2048 4096 8192 (--quick: 512)")
    p.add_argument("--repeats", type=int, help="default 3 (--quick: 1)")
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    args.contexts = args.contexts or ([512] if args.quick else [2048, 4096, 8192])
    args.repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, attn_implementation="hybrid")
    cfg = OffloadConfig(device="cpu")
    rows = []
    for context in args.contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
        times: dict[str, list[dict]] = {"sdpa": [], "engine": [], "overlapped": []}
        for _ in range(args.repeats):
            for case in times:
                times[case].append(time_case(model, ids, case, cfg, args.chunk))
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
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {"model": args.model, "threads": args.threads, "chunk": args.chunk, "repeats": args.repeats}
        args.json.write_text(json.dumps({"config": config, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
