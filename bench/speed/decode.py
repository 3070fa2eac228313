"""Decode speed against context length: the hybrid engine, full attention, and
transformers' offloaded cache, on the same model in the same run.

Two models: the bundled SmolLM2-135M (real weights) and a Llama-3-8B-shaped
model (32 query / 8 KV heads, head dim 128) with random weights and few layers.
A context of N tokens is built directly in each cache (prefill of 128K tokens
is far out of a CPU's reach): keys, values and the prefill queries the host
indexes are built from are drawn per channel with the mean and spread that a
real prefill of the model shows. Decode then runs the real model, one token at
a time. Prefill itself is timed separately, really, up to --prefill-max tokens.

Per case: decode_ms_per_token (the whole model, median over steps after
warm-up), attn_ms_per_layer (cache update + attention per layer per token: the
part the engine replaces), prefill_s, index_build_s, device/host bytes, and
kv_read_frac (host KV rows read per step / host KV rows), and for the engine
rerun_attn_ms_per_layer {positions: ms} (the same for the newest positions run again as
an exact chunk, as at a near tie, engine.decode.recheck: the step alone and a whole window).

    python -m bench.speed.decode [--quick] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM

from bench.evals.tasks import FILLER
from engine import HybridCache, OffloadConfig
from engine.api import prefill
from engine.attention import hybrid_attention_forward
from engine.config import KEY_INDEXES
from engine.models import load_model
from engine.plan import MODEL_PRESETS

TIMED = "hybrid_timed"
# Random-weight models built from a config: the 8B shape of the targets, and a
# tiny one that lets the test suite run this script in seconds.
SHAPES = {
    "llama-3-8b-shape": MODEL_PRESETS["llama-3-8b"],
    "tiny-llama": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=64, intermediate_size=128, vocab_size=256
    ),
}
FILL_CHUNK = 65536  # synthetic positions handed to an engine cache at a time
# A lighter HNSW build than the index's default, so that 128K-key builds finish in minutes on a CPU.
BENCH_PARAMS = {"hnsw": {"M": 16, "ef_construction": 40}}


class LayerTimer:
    """Seconds spent in cache.update() + the attention function, summed over the layers of a step."""

    seconds = 0.0

    @classmethod
    def attention(cls, module, query, key, value, attention_mask, **kwargs):
        t0 = time.perf_counter()
        out = hybrid_attention_forward(module, query, key, value, attention_mask, **kwargs)
        cls.seconds += time.perf_counter() - t0
        return out


class _TimedUpdate:
    def update(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = super().update(*args, **kwargs)
        LayerTimer.seconds += time.perf_counter() - t0
        return out


class TimedHybridCache(_TimedUpdate, HybridCache):
    pass


class TimedDynamicCache(_TimedUpdate, DynamicCache):
    pass


AttentionInterface.register(TIMED, LayerTimer.attention)


# ---------------------------------------------------------------- models


def make_model(name: str, layers: int):
    """(model, tokenizer or None) for a benchmark model name: the bundled SmolLM2, or a random-weight shape."""
    if name == "smollm2-135m":
        model, tok = load_model(name, attn_implementation=TIMED)
        return model, tok
    config = LlamaConfig(
        **{**SHAPES[name], "num_hidden_layers": layers},
        max_position_embeddings=262144,
        rope_theta=500000.0,
        attn_implementation=TIMED,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model, None


@torch.inference_mode()
def channel_stats(model, tok, n_tokens: int = 1024):
    """Per layer: mean and std per channel of keys, values [Hkv, D] and queries [Hq, D]
    over a short real prefill (random token ids for a model without a tokenizer)."""
    if tok is not None:
        ids = tok(" ".join([FILLER] * (n_tokens // 20)), return_tensors="pt").input_ids[:, :n_tokens]
    else:
        ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    seen = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = [(t[0].float().mean(1), t[0].float().std(1)) for t in (key, value, query)]
        return hybrid_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("record_stats", record)
    model.set_attn_implementation("record_stats")
    model(ids.to(next(model.parameters()).device), use_cache=False)
    model.set_attn_implementation(TIMED)
    return [seen[i] for i in range(model.config.num_hidden_layers)]


def synthetic_layer(stats, n: int, n_queries: int, dtype, gen):
    """K, V [Hkv, n, D] and queries [Hq, n_queries, D] drawn with the recorded per-channel statistics."""
    (km, ks), (vm, vs), (qm, qs) = stats

    def draw(mean, std, count):  # head by head: a million fp32 rows of every head at once would not fit
        out = torch.empty(mean.shape[0], count, mean.shape[1], dtype=dtype)
        for h in range(mean.shape[0]):
            out[h] = (mean[h] + std[h] * torch.randn(count, mean.shape[1], generator=gen)).to(dtype)
        return out

    return draw(km, ks, n), draw(vm, vs, n), draw(qm, qs, n_queries)


# --------------------------------------------------------------- caches


def fill_cache(kind: str, model, stats, n: int, cfg: OffloadConfig | None, seed: int = 0):
    """A cache of `kind` ("hybrid", "full", "offloaded") holding n synthetic positions; returns
    (cache, seconds to build the host indexes)."""
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    if kind == "hybrid":
        cache = TimedHybridCache(model, cfg, max_length=n + 64, progress=False)
    else:
        cache = TimedDynamicCache(offloading=kind == "offloaded")
    with torch.inference_mode():
        for i, layer_stats in enumerate(stats):
            n_q = cfg.max_build_queries if cfg is not None else 0
            if (
                kind == "hybrid"
            ):  # chunk by chunk, as a prefill fills it: a million tokens' copies at once would not fit
                layer = cache.layers[i]
                for start in range(0, n, FILL_CHUNK):
                    k, v, _ = synthetic_layer(layer_stats, min(FILL_CHUNK, n - start), 0, dtype, gen)
                    layer.update(k[None], v[None])
                layer.last_added = None  # the last chunk's K/V, which only a prefill's attention reads
                q = synthetic_layer(layer_stats, 0, n_q, dtype, gen)[2]
                layer.query_sample.add(q, torch.linspace(0, n - 1, n_q).long())
            else:
                k, v, _ = synthetic_layer(layer_stats, n, 0, dtype, gen)
                cache.update(k[None], v[None], i)
            del k, v
    t0 = time.perf_counter()
    if kind == "hybrid":
        cache.build_indexes()
    return cache, time.perf_counter() - t0


def cache_bytes(cache, device: torch.device) -> tuple[int, int]:
    """(device bytes, host bytes) held by a cache, by where its tensors are."""
    if isinstance(cache, HybridCache):
        report = cache.memory_report()
        return sum(report["device"].values()), sum(report["host"].values())
    on_device = on_host = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t.device == device:
                on_device += t.nbytes
            else:
                on_host += t.nbytes
    return on_device, on_host


@torch.inference_mode()
def decode_once(model, cache) -> tuple[float, float, float]:
    """One decode step: seconds for the whole model, seconds per layer in update + attention, kv_read_frac."""
    LayerTimer.seconds = 0.0
    t0 = time.perf_counter()
    model(input_ids=torch.tensor([[17]]), cache=cache, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - t0
    read = cache.step_stats()["kv_read_frac"] if isinstance(cache, HybridCache) else 1.0
    return seconds, LayerTimer.seconds / model.config.num_hidden_layers, read


def time_decode(model, caches: dict, steps: int, warmup: int = 2) -> dict[str, tuple[float, float, float]]:
    """Per cache: median ms per token (whole model), median ms per layer in update + attention,
    mean kv_read_frac. With several caches the steps alternate between them, so that the
    machine's drift over the run falls on all of them alike."""
    samples = {name: [] for name in caches}
    for step in range(warmup + steps):
        for name, cache in caches.items():
            sample = decode_once(model, cache)
            if step >= warmup:
                samples[name].append(sample)
    return {
        name: (
            1e3 * statistics.median(s[0] for s in got),
            1e3 * statistics.median(s[1] for s in got),
            statistics.mean(s[2] for s in got),
        )
        for name, got in samples.items()
    }


@torch.inference_mode()
def time_rerun(model, cache, positions: int, steps: int) -> float:
    """Median ms per layer in update + attention of the `positions` newest positions run again
    as an exact chunk, as a near tie's are (engine.decode.recheck): every host token read."""
    samples = []
    ids = torch.full((1, positions), 17)
    for _ in range(steps):
        LayerTimer.seconds = 0.0
        with cache.rerun_exactly([0], positions):
            model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        samples.append(LayerTimer.seconds / model.config.num_hidden_layers)
    return 1e3 * statistics.median(samples)


@torch.inference_mode()
def time_prefill(model, kind: str, n: int, cfg: OffloadConfig | None, chunk: int) -> float:
    """Seconds of a real chunked prefill of n random tokens (and the host index build for the engine)."""
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    cache = HybridCache(model, cfg, max_length=n, progress=False) if kind == "hybrid" else DynamicCache()
    t0 = time.perf_counter()
    prefill(model, ids, cache, chunk, progress=False)
    if kind == "hybrid":
        cache.build_indexes()
    return time.perf_counter() - t0


# ----------------------------------------------------------------- main


def methods(model_name: str, all_methods: bool) -> dict[str, tuple[str, OffloadConfig | None]]:
    out = {
        "hybrid-default": ("hybrid", OffloadConfig(device="cpu")),
        # the fixed budget with and without the estimate: what the estimate and the adaptive budget cost
        "hybrid-fixed": ("hybrid", OffloadConfig.preset("fixed", device="cpu")),
        "hybrid-fixed-noest": ("hybrid", OffloadConfig.preset("fixed", device="cpu", estimate=False)),
    }
    if all_methods:
        for m in KEY_INDEXES:
            out[f"hybrid-{m}"] = (
                "hybrid",
                OffloadConfig(device="cpu", key_index=m, index_params=BENCH_PARAMS.get(m, {})),
            )
        out["hybrid-block-only"] = ("hybrid", OffloadConfig.preset("block", device="cpu"))
        out["hybrid-neighbours"] = ("hybrid", OffloadConfig(device="cpu", neighbours=3))  # what rating neighbours costs
        out["hybrid-mean-blocks"] = ("hybrid", OffloadConfig(device="cpu", landmark="mean"))  # blocks by mean key
    out["full-sdpa"] = ("full", None)
    out["offloaded-dynamic"] = ("offloaded", None)
    return out


def run(args) -> list[dict]:
    rows = []
    for model_name in args.models:
        model, tok = make_model(model_name, args.layers)
        stats = channel_stats(model, tok)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        all_methods = model_name != "smollm2-135m" or args.all_methods
        for context in args.contexts:
            chosen = {
                m: (kind, cfg)
                for m, (kind, cfg) in methods(model_name, all_methods).items()
                if (not args.methods or m in args.methods) and (kind != "hybrid" or context >= cfg.resident_tokens)
            }
            groups = [chosen] if args.interleave else [{m: c} for m, c in chosen.items()]
            for group in groups:
                rows += measure_group(args, model, model_name, stats, weights, context, group)
        del model
    return rows


def measure_group(args, model, model_name, stats, weights, context, group) -> list[dict]:
    """Fill a cache per method of the group, time their decode steps (alternating), one row each."""
    rows, caches, builds = [], {}, {}
    for method, (kind, cfg) in group.items():
        base = {"model": model_name, "method": method, "context": context}
        try:
            caches[method], builds[method] = fill_cache(kind, model, stats, context, cfg)
        except (AssertionError, RuntimeError) as exc:  # the offloaded cache needs CUDA streams
            rows.append({**base, "error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(rows[-1]), flush=True)
    if not caches:
        return rows
    full_only = all(group[m][0] != "hybrid" for m in caches)
    steps = args.steps if not full_only or context <= 16384 else max(3, args.steps // 3)
    timings = time_decode(model, caches, steps)
    device = next(model.parameters()).device
    for method, (ms_token, ms_layer, read) in timings.items():
        kind, cfg = group[method]
        rerun = {}
        if kind == "hybrid" and cfg.recheck_margin:  # a near tie's run again: the step alone, a whole window
            rerun = {n: time_rerun(model, caches[method], n, min(steps, 3)) for n in (1, min(cfg.window, context))}
        dev, host = cache_bytes(caches[method], device)
        prefill_s = None
        if context <= args.prefill_max:
            prefill_s = round(time_prefill(model, kind, context, cfg, args.chunk), 3)
        row = {
            "model": model_name,
            "method": method,
            "context": context,
            "decode_ms_per_token": round(ms_token, 3),
            "attn_ms_per_layer": round(ms_layer, 4),
            "prefill_s": prefill_s,
            "index_build_s": round(builds[method], 3) if kind == "hybrid" else None,
            "device_bytes": dev + weights,
            "host_bytes": host,
            "kv_read_frac": round(read, 5),
            # near ties' positions run again exactly (engine.decode.recheck), by how many
            "rerun_attn_ms_per_layer": {n: round(ms, 4) for n, ms in rerun.items()} or None,
            "n_layers": model.config.num_hidden_layers,
            "steps": steps,
            "interleaved": len(caches) > 1,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def write_json(path: Path, config: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": config, "cases": rows}, indent=1))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in sorted({r["method"] for r in rows if r["model"] == model}):
            pts = sorted(
                (r["context"], r["attn_ms_per_layer"])
                for r in rows
                if r["model"] == model and r["method"] == method and "error" not in r
            )
            if not pts:
                continue
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(
            xscale="log", yscale="log", xlabel="context (tokens)", ylabel="update + attention ms per layer", title=model
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short contexts, few steps")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument(
        "--models",
        nargs="+",
        default=["smollm2-135m", "llama-3-8b-shape"],
        choices=["smollm2-135m", *SHAPES],
    )
    p.add_argument("--contexts", type=int, nargs="+", help="default: 4K to 128K tokens (--quick: 2K and 8K)")
    p.add_argument("--layers", type=int, default=1, help="decoder layers of the Llama-3-8B-shaped model")
    p.add_argument("--steps", type=int, default=9, help="timed decode steps (after 2 warm-up steps)")
    p.add_argument("--prefill-max", type=int, default=8192, help="longest context whose prefill is run for real")
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk")
    p.add_argument("--all-methods", action="store_true", help="every retrieval method on SmolLM2 too")
    p.add_argument("--methods", nargs="+", help="only these methods (e.g. hybrid-default full-sdpa)")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="hold every method's cache of a context at once and alternate their decode steps (for ratios)",
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.prefill_max = 3, 2048
    args.contexts = args.contexts or ([2048, 8192] if args.quick else [4096, 8192, 16384, 32768, 65536, 131072])
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = run(args)
    config = {
        "threads": args.threads,
        "contexts": args.contexts,
        "layers_8b_shape": args.layers,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        write_json(args.json, config, rows)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
