"""Generated tokens per second against batch size: the engine (a HybridCache of B
sequences, one batched decode step per token) and full attention (sdpa over a
DynamicCache of the same B sequences), on the same model in the same run.

As in bench_decode.py, each sequence's context is built directly in the caches
(keys, values and build queries drawn with the per-channel statistics of a real
prefill of the model; every sequence its own draw), and decode runs the real
model. Per (model, context, batch, method): attn_tokens_per_s (B / seconds of
cache update + attention per layer and step: the part the engine replaces),
model_tokens_per_s (B / seconds of the whole forward pass), their medians over
steps that alternate between the methods, device and host bytes.

    python -m bench.speed.throughput [--quick] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from bench.speed.decode import (
    SHAPES,
    LayerTimer,
    TimedDynamicCache,
    TimedHybridCache,
    cache_bytes,
    channel_stats,
    fill_cache,
    make_model,
    write_json,
)
from engine import OffloadConfig


def sequence_caches(model, stats, context: int, cfg: OffloadConfig, count: int) -> list[TimedHybridCache]:
    """`count` single-sequence engine caches of `context` positions each, every one its own draw."""
    return [fill_cache("hybrid", model, stats, context, cfg, seed=i)[0] for i in range(count)]


def hybrid_batch(seqs: list[TimedHybridCache]) -> TimedHybridCache:
    """The sequences stacked into one batch, the single caches left intact (a batch size's run
    reuses the sequences of the one before: stacking moves layers, so stack shallow copies)."""
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
def step(model, cache, positions: torch.Tensor) -> tuple[float, float]:
    """One decode step of the batch (positions [B, 1]): seconds for the whole model, and
    seconds per layer in cache update + attention."""
    LayerTimer.seconds = 0.0
    ids = torch.full_like(positions, 17)
    t0 = time.perf_counter()
    model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0, LayerTimer.seconds / model.config.num_hidden_layers


def time_batch(model, caches: dict, B: int, context: int, steps: int, warmup: int = 2) -> dict:
    """Per cache: median seconds per step (model, attention per layer), steps alternating between caches."""
    samples = {name: [] for name in caches}
    for i in range(warmup + steps):
        positions = torch.full((B, 1), context + i)
        for name, cache in caches.items():
            s = step(model, cache, positions)
            if i >= warmup:
                samples[name].append(s)
    return {name: tuple(statistics.median(x[j] for x in got) for j in (0, 1)) for name, got in samples.items()}


def run(args) -> list[dict]:
    rows = []
    cfg = OffloadConfig(device="cpu")
    for model_name in args.models:
        model, tok = make_model(model_name, args.layers)
        stats = channel_stats(model, tok)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        for context in args.contexts:
            seqs = sequence_caches(model, stats, context, cfg, max(args.batches))
            kv = None if args.no_full else contexts_of(seqs)
            for B in sorted(args.batches):
                caches = {"hybrid": hybrid_batch(seqs[:B])}
                if not args.no_full:
                    caches["full-sdpa"] = full_batch(kv[:B])
                timings = time_batch(model, caches, B, context, args.steps)
                for method, (model_s, attn_s) in timings.items():
                    dev, host = cache_bytes(caches[method], torch.device("cpu"))
                    row = {
                        "model": model_name,
                        "context": context,
                        "batch": B,
                        "method": method,
                        "attn_tokens_per_s": round(B / attn_s, 2),
                        "model_tokens_per_s": round(B / model_s, 3),
                        "attn_ms_per_layer": round(1e3 * attn_s, 3),
                        "step_ms": round(1e3 * model_s, 2),
                        "device_bytes": dev + weights,
                        "host_bytes": host,
                        "n_layers": model.config.num_hidden_layers,
                        "steps": args.steps,
                    }
                    if method == "hybrid":
                        row["kv_read_frac"] = round(caches[method].step_stats()["kv_read_frac"], 5)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                del caches
            del seqs, kv
        del model
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["context"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (model, context) in zip(axes[0], panels):
        for method in sorted({r["method"] for r in rows}):
            pts = sorted(
                (r["batch"], r["attn_tokens_per_s"])
                for r in rows
                if (r["model"], r["context"], r["method"]) == (model, context, method)
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens/s (update + attention, per layer)")
        ax.set_title(f"{model}, {context} tokens per sequence", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny model, short contexts, batches 1 and 2")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--models", nargs="+", choices=["smollm2-135m", *SHAPES], help="default: llama-3-8b-shape")
    p.add_argument("--contexts", type=int, nargs="+", help="tokens per sequence; default 8192 32768")
    p.add_argument("--batches", type=int, nargs="+", help="default 1 2 4 8 16")
    p.add_argument("--layers", type=int, default=1, help="decoder layers of the random-weight shapes")
    p.add_argument("--steps", type=int, default=9, help="timed decode steps (after 2 warm-up steps)")
    p.add_argument("--no-full", action="store_true", help="leave out full attention")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or ["tiny-llama"]
        args.contexts, args.batches, args.steps = args.contexts or [512], args.batches or [1, 2], 2
    args.models = args.models or ["llama-3-8b-shape"]
    args.contexts = args.contexts or [8192, 32768]
    args.batches = args.batches or [1, 2, 4, 8, 16]
    if min(args.batches) < 1 or min(args.contexts) < 1:
        p.error("batches and contexts must be positive")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = run(args)
    config = {
        "threads": args.threads,
        "layers_shape": args.layers,
        "offload": "default",
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        write_json(args.json, config, rows)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
