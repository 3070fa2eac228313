"""Generated tokens per second against batch size: the engine (a HybridCache of B
sequences, one batched decode step per token) and full attention (sdpa over a
DynamicCache of the same B sequences), on the same model in the same run.

As in bench.speed.decode, each sequence's context is built directly in the caches
(bench.common.caches: keys, values and build queries drawn with the per-channel
statistics of a real prefill of the model, laid out as prose by default or flat with
--context flat; every sequence its own draw, the same for both methods), and decode
runs the real model. Per (model, context, batch, method): attn_tokens_per_s (B / seconds of
cache update + attention per layer and step: the part the engine replaces),
model_tokens_per_s (B / seconds of the whole forward pass), their medians over
steps that alternate between the methods, kv_read_frac (host KV rows read per step / host
KV rows, the mean over the steps; 1 for full attention), device and host bytes. With
--python-selection the engine also runs through the Python selection (hybrid-python-selection),
the native host call's reference, in turns with it on the same caches; with --stacked, through
the device parts of the batch stacked into one set of kernels (hybrid-stacked, the GPU's default;
engine.decode.step.native_step), in turns with it on the same caches.

    python -m bench.speed.throughput [--quick] [--json PATH] [--plot PATH] [--batches ...]
                                     [--context prose|flat] [--python-selection] [--threads N]
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import torch
from transformers import AttentionInterface, DynamicCache

from ann.precompile import precompile
from bench.common.caches import DECODE_TOKEN, add_context_arg, cache_bytes, channel_stats, fill
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
from bench.common.output import method_panels, save_run
from bench.common.timing import LayerClock, in_turns
from engine import HybridCache, OffloadConfig
from engine.cli import run_script
from engine.decode import step as decode_steps
from engine.decode.host import python_selection

# cache.update() + attention of every layer, timed apart from the rest of the model
TIMED = "hybrid_timed_batch"
RULES = {"hybrid-python-selection": python_selection}  # methods whose steps take another selection rule
CLOCK = LayerClock()
AttentionInterface.register(TIMED, CLOCK)
TimedHybridCache, TimedDynamicCache = CLOCK.timed(HybridCache), CLOCK.timed(DynamicCache)


def sequence_caches(
    model, stats, context: int, cfg: OffloadConfig, count: int, kind: str = "prose"
) -> list[TimedHybridCache]:
    """`count` single-sequence engine caches of `context` positions of a `kind` of context
    (bench.common.caches.CONTEXTS) each, every one its own draw."""
    dtype = next(model.parameters()).dtype
    caches = [TimedHybridCache(model, cfg, max_length=context + 64, progress=False) for _ in range(count)]
    for i, cache in enumerate(caches):
        fill(cache, stats, context, dtype=dtype, seed=i, context=kind)
    return caches


def hybrid_batch(seqs: list[TimedHybridCache]) -> TimedHybridCache:
    """The sequences stacked into one batch, the single caches kept (stacking moves layers, so stack
    shallow copies): their layers are the batch's, and take its steps (`rewind` takes them back)."""
    views = []
    for cache in seqs:
        view = copy.copy(cache)
        view.layers = list(cache.layers)
        views.append(view)
    return TimedHybridCache.stack(views)


def contexts_of(seqs: list[TimedHybridCache]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each sequence's K/V [Hkv, N, D] per layer, in position order, before any decode step."""
    with torch.inference_mode():
        return [[layer.ordered_kv() for layer in c.layers] for c in seqs]


def full_batch(kv: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> TimedDynamicCache:
    """Those sequences' K/V in one DynamicCache [B, Hkv, N, D] per layer."""
    cache = TimedDynamicCache()
    with torch.inference_mode():
        for i in range(len(kv[0])):
            cache.update(torch.stack([s[i][0] for s in kv]), torch.stack([s[i][1] for s in kv]), i)
    return cache


@torch.inference_mode()
def step(model, cache, B: int, select=None, stacked: bool = False) -> tuple[float, float, float]:
    """One decode step of the batch of B sequences of one length, at the position after it (`select`: the
    selection rule, None: the engine's; `stacked`: the device parts of the batch stacked, as on a GPU):
    seconds for the whole model, seconds per layer in cache update + attention, and the share of the host
    KV rows read (1 for full attention)."""
    CLOCK.seconds, CLOCK.select = 0.0, select
    positions = torch.full((B, 1), cache.get_seq_length())  # methods taking turns on one cache: each its own
    ids = torch.full_like(positions, DECODE_TOKEN)
    decode_steps.STACK = stacked or None
    try:
        t0 = time.perf_counter()
        model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        seconds = time.perf_counter() - t0
    finally:
        decode_steps.STACK = None
    read = cache.step_stats()["kv_read_frac"] if isinstance(cache, HybridCache) else 1.0
    return seconds, CLOCK.seconds / model.config.num_hidden_layers, read


def time_batch(model, caches: dict, B: int, steps: int, warmup: int = 2) -> dict:
    """Per cache: median seconds per step (model, attention per layer) and mean kv_read_frac,
    the caches' steps taking turns."""
    runs = {
        name: lambda _, c=cache, name=name: step(model, c, B, RULES.get(name), name == "hybrid-stacked")
        for name, cache in caches.items()
    }
    samples = in_turns(runs, steps, warmup)
    return {
        name: (
            statistics.median(x[0] for x in got),
            statistics.median(x[1] for x in got),
            statistics.mean(x[2] for x in got),
        )
        for name, got in samples.items()
    }


def run(args) -> list[dict]:
    rows = []
    cfg = OffloadConfig(device="cpu")
    for model_name in args.models:
        model, tok = benchmark_model(model_name, layers=args.layers, attn_implementation=TIMED)
        stats = channel_stats(model, tok)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        for context in args.contexts:
            seqs = sequence_caches(model, stats, context, cfg, max(args.batches), args.context)
            marks = [seq.mark() for seq in seqs]  # each batch size's run starts from the contexts as filled
            kv = None if args.no_full else contexts_of(seqs)
            for B in sorted(args.batches):
                caches = {"hybrid": hybrid_batch(seqs[:B])}
                if args.python_selection:  # the same caches, in turns: each step adds a position to both
                    caches["hybrid-python-selection"] = caches["hybrid"]
                if args.stacked:
                    caches["hybrid-stacked"] = caches["hybrid"]
                if not args.no_full:
                    caches["full-sdpa"] = full_batch(kv[:B])
                timings = time_batch(model, caches, B, args.steps)
                for method, (model_s, attn_s, read) in timings.items():
                    dev, host = cache_bytes(caches[method], torch.device("cpu"))
                    row = {
                        "model": model_name,
                        "context": context,
                        "context_kind": args.context,
                        "batch": B,
                        "method": method,
                        "attn_tokens_per_s": round(B / attn_s, 2),
                        "model_tokens_per_s": round(B / model_s, 3),
                        "attn_ms_per_layer": round(1e3 * attn_s, 3),
                        "step_ms": round(1e3 * model_s, 2),
                        "kv_read_frac": round(read, 5),
                        "device_bytes": dev + weights,
                        "host_bytes": host,
                        "n_layers": model.config.num_hidden_layers,
                        "steps": args.steps,
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                with torch.inference_mode():  # (where the stores were made: they take in-place writes there only)
                    for seq, mark in zip(seqs[:B], marks):  # the batch's steps taken back (the layers are shared)
                        seq.rewind(mark)
                del caches
            del seqs, kv
        del model
    return rows


def plot(rows: list[dict], path) -> None:
    method_panels(
        rows,
        path,
        panel=lambda r: (r["model"], r["context"]),
        title=lambda key: f"{key[0]}, {key[1]} tokens per sequence",
        x="batch",
        y="attn_tokens_per_s",
        xlabel="batch",
        ylabel="tokens/s (update + attention, per layer)",
    )


def main(argv=None):
    p = parser(__doc__, __spec__)
    add_output_args(
        p, quick="the tiny model, short contexts, batches 1 and 2", plot="tokens/s against batch size (PNG)"
    )
    p.add_argument(
        "--models", nargs="+", choices=["smollm2-135m", *SHAPES], help="default: llama-3-8b-shape (--quick: tiny-llama)"
    )
    p.add_argument(
        "--contexts", type=positive_int, nargs="+", help="tokens per sequence; default 8192 32768 (--quick: 512)"
    )
    p.add_argument("--batches", type=positive_int, nargs="+", help="default 1 2 4 8 16 (--quick: 1 2)")
    p.add_argument("--layers", type=positive_int, default=1, help="decoder layers of the random-weight shapes")
    p.add_argument(
        "--steps", type=positive_int, help="timed decode steps after 2 warm-up steps; default 9 (--quick: 2)"
    )
    p.add_argument("--no-full", action="store_true", help="leave out full attention")
    p.add_argument(
        "--python-selection",
        action="store_true",
        help="also the engine through the Python selection, the native host call's reference (hybrid-python-selection)",
    )
    p.add_argument(
        "--stacked",
        action="store_true",
        help="also the engine with the batch's device parts stacked into one set of kernels (hybrid-stacked)",
    )
    add_context_arg(p)
    add_threads_arg(p)
    args = p.parse_args(argv)
    distinct(args, "models", "contexts", "batches")
    quick_defaults(
        args,
        models=(["tiny-llama"], ["llama-3-8b-shape"]),
        contexts=([512], [8192, 32768]),
        batches=([1, 2], [1, 2, 4, 8, 16]),
        steps=(2, 9),
    )
    pin_threads(args.threads)
    precompile()  # the key index's numba kernels loaded before any timing (the first build paid it)
    started = time.perf_counter()
    rows = run(args)
    config = {
        "layers_shape": args.layers,
        "context_kind": args.context,
        "offload": "default",
        "seconds": round(time.perf_counter() - started, 1),
    }
    save_run(args, config, rows, plot)


if __name__ == "__main__":
    run_script(main)
