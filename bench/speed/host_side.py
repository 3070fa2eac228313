"""The host side of a decode step, timed apart from the rest of it: the native call against the
Python selection it replaced, on one layer of a synthetic context (bench.common.caches) and the
model's own decode queries.

Per context:
- python_ms: the Python selection, the gather-attend of the ids it chose and the estimate
  (engine.decode.select + step.host_state), after the resident attention and the block scores;
- native_ms: the same through the native call (engine.decode.host.prepare + read) and the estimate;
- call_ms: the native call alone (ops.host_step_prepared, as a step makes it) on a recorded step's inputs, and
  selection_ms: the same call with nothing read past the rating (the candidates, their
  de-duplication and rating; the gather-attend of the rows read is what call_ms adds);
with the read share, the candidates rated and the ids read per KV head. Medians over repeats of
the recorded steps, so the data is warm: the host side's own cost, not the memory around it.

    python -m bench.speed.host_side [--quick] [--json PATH] [--models ...] [--contexts ...] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch

import engine.attention as attention
from bench.common.caches import add_context_arg, channel_stats, fill
from bench.common.models import SHAPES, benchmark_model
from bench.common.options import (
    add_output_args,
    add_threads_arg,
    distinct,
    parser,
    pin_threads,
    positive_int,
    quick_defaults,
)
from bench.common.output import save_run
from bench.common.timing import median_ms
from engine import HybridCache, OffloadConfig
from engine.cli import run_script
from engine.decode import host, step
from engine.decode.estimate import batch_of
from engine.decode.select import select_host_ids
from engine.native import ops

RECORDED = 4  # decode steps whose queries and inputs are replayed


@torch.inference_mode()
def record_queries(model, cache) -> list[torch.Tensor]:
    """The first layer's decode queries [Hkv, G, 1, D] of RECORDED real decode steps."""
    queries, decode_step = [], step.decode_step

    def recording(layer, q, scale, select=select_host_ids):
        if layer is cache.layers[0]:
            queries.append(q.clone())
        return decode_step(layer, q, scale, select)

    attention.decode_step = recording
    try:
        for _ in range(RECORDED):
            model(input_ids=torch.tensor([[17]]), cache=cache, use_cache=True, logits_to_keep=1)
    finally:
        attention.decode_step = decode_step
    return queries


@torch.inference_mode()
def measure(layer, queries: list[torch.Tensor], scale: float, repeats: int) -> dict:
    """The host side's times for each recorded query, medians over `repeats` rounds."""
    Hkv, G, _, D = queries[0].shape
    parts = []
    for q in queries:
        o, lse = step.resident_part(layer, q, scale)
        qd = q[:, :, 0]
        parts.append((q, qd, lse[..., 0], layer.summary.scores(qd, scale) if layer.summary is not None else None))

    def python():
        for q, qd, lse, blocks in parts:
            q_host = q.reshape(Hkv * G, D).float()
            ids = select_host_ids(layer, qd, q_host.numpy(), scale, lse, blocks)
            step.host_state(layer, q_host, scale, ids, blocks)

    calls = []

    def native():
        calls.clear()
        for q, qd, lse, blocks in parts:
            inputs = host.prepare([layer], qd[None], lse[None], batch_of(blocks))[0]
            res = host.read([layer], q[None, :, :, 0], [inputs], scale)
            nb = layer.summary.n_blocks if blocks is not None else 0
            step.with_estimate(
                layer, res.out.view(Hkv, G, 1, D), res.lse.view(Hkv, G, 1), blocks, read=res.block_reads[0, :, :nb]
            )
            calls.append(res)

    recorded = []
    real = ops.host_step_prepared  # the call engine.decode.host.read makes

    def recording(*args, **kwargs):
        recorded.append((args, kwargs))
        return real(*args, **kwargs)

    ops.host_step_prepared = recording
    try:
        native()
    finally:
        ops.host_step_prepared = real
    if len(recorded) != len(parts):
        raise RuntimeError(f"recorded {len(recorded)} native calls of {len(parts)} steps: the step's call has moved")
    # the same calls with nothing read past the rating: the threshold (the ninth argument) infinite
    rating_only = [((*a[:8], np.full_like(a[8], np.inf), *a[9:]), k) for a, k in recorded]
    n = len(parts)
    row = {
        "python_ms": median_ms(python, repeats) / n,
        "native_ms": median_ms(native, repeats) / n,
        "call_ms": median_ms(lambda: [real(*a, **k) for a, k in recorded], repeats) / n,
        "selection_ms": median_ms(lambda: [real(*a, **k) for a, k in rating_only], repeats) / n,
    }
    row["read_per_head"] = statistics.mean(float(r.n_read.float().mean()) for r in calls)
    row["rated_per_head"] = statistics.mean(float(r.n_rated.float().mean()) for r in calls)
    row["kv_read_frac"] = row["read_per_head"] / layer.host.n
    return row


def recorded_contexts(args):
    """For each of a layer benchmark's models and contexts (`layer_args`): (model name, context, the first
    layer of a cache filled with that synthetic context, its RECORDED decode queries, the attention scale)."""
    for model_name in args.models:
        model, tok = benchmark_model(model_name, layers=1, attn_implementation="hybrid")
        stats = channel_stats(model, tok)
        for context in args.contexts:
            cache = HybridCache(model, OffloadConfig(device="cpu"), max_length=context + 64, progress=False)
            fill(cache, stats, context, dtype=next(model.parameters()).dtype, context=args.context)
            yield model_name, context, cache.layers[0], record_queries(model, cache), model.config.head_dim**-0.5


def run(args) -> list[dict]:
    rows = []
    for model_name, context, layer, queries, scale in recorded_contexts(args):
        times = measure(layer, queries, scale, args.repeats)
        row = {"model": model_name, "context": context, "context_kind": args.context}
        row |= {"host_tokens": layer.host.n} | {k: round(v, 4) for k, v in times.items()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def layer_args(p: argparse.ArgumentParser, argv, contexts: list[int]) -> argparse.Namespace:
    """The arguments of a benchmark on one layer of a model's shape (this one's and
    bench.speed.device_ops'): p's own, --models, --contexts (default `contexts`; --quick: the tiny
    model at 2K tokens), --context, --threads (pinned), --json."""
    add_output_args(p, quick="the tiny model at 2K tokens")
    p.add_argument("--models", nargs="+", choices=["smollm2-135m", *SHAPES], help="default: llama-3-8b-shape")
    shown = " ".join(map(str, contexts))
    p.add_argument("--contexts", type=positive_int, nargs="+", help=f"default {shown} (--quick: 2048)")
    add_context_arg(p)
    add_threads_arg(p)
    args = p.parse_args(argv)
    distinct(args, "models", "contexts")
    quick_defaults(args, models=(["tiny-llama"], ["llama-3-8b-shape"]), contexts=([2048], contexts))
    pin_threads(args.threads)
    return args


def main(argv=None):
    p = parser(__doc__, __spec__)
    p.add_argument("--repeats", type=positive_int, default=9, help="rounds over the recorded steps")
    args = layer_args(p, argv, [8192, 131072])
    save_run(args, {"contexts": args.contexts, "repeats": args.repeats}, run(args))


if __name__ == "__main__":
    run_script(main)
