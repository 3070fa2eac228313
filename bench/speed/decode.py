"""Decode speed against context length: the hybrid engine, full attention, and
transformers' offloaded cache, on the same model in the same run.

Two models: the bundled SmolLM2-135M (real weights) and a Llama-3-8B-shaped
model (32 query / 8 KV heads, head dim 128) with random weights and few layers.
A context of N tokens is built directly in each cache (bench.common.caches: a
prefill of 128K tokens is far out of a CPU's reach): keys, values and the prefill
queries the host indexes are built from are drawn per channel with the mean and
spread that a real prefill of the model shows, and with --context prose (the
default) laid out so that the decode token's attention has the structure real
text gives it (runs of tokens that matter, in clusters, a few heavy hitters);
--context flat leaves the draw as it is, with flat attention, where the engine
reads next to nothing. Every method of a context gets the same draw. Decode then
runs the real model, one token at a time. Prefill itself is timed separately,
really, up to --prefill-max tokens.

Per case: decode_ms_per_token (the whole model, median over steps after
warm-up), attn_ms_per_layer (cache update + attention per layer per token: the
part the engine replaces) and attn_ms_per_layer_mean (their mean), for the engine
attn_ms_per_layer_over_block (the mean over one block of steps, block_size, timed after them:
it counts once what a step does once a block, the key index's adds, which the median and a mean
over fewer steps leave out), prefill_s (a real prefill, with the engine's host index build
after it: the time to the first decode step), index_build_s (the build alone, of the filled cache),
device/host bytes, and
kv_read_frac (host KV rows read per step / host KV rows; 1 for full attention), and for
the engine rerun_attn_ms_per_layer {positions: ms} (the same for the newest positions run
again as an exact chunk, as at a near tie, engine.decode.recheck: the step alone, and the
positions of one exact run at the rate measured on prose, bench.common.timing.RECHECK_SPAN at
most OffloadConfig.exact_span; such a run reads every host
row, rerun_kv_read_frac 1), wider_attn_ms_per_layer and wider_kv_read_frac (lists: the step alone
run again wider, as a near tie is first, and again wider still, OffloadConfig.recheck_wider_runs)
and attn_ms_per_layer_with_rechecks (the step's mean cost over a block with wider and exact runs at
the prose rates, bench.common.timing.with_rechecks). `hybrid-default-python-selection`
is the default through the Python selection, the native host call's reference (before and
after in one run); `hybrid-all-resident`, run only where --methods names it, is the engine with a
window that holds the whole context (nothing offloaded: what a short context gains from a wide
window). Each row names its context_kind.

    python -m bench.speed.decode [--quick] [--json PATH] [--plot PATH] [--models ...] [--contexts ...]
                                 [--methods ...] [--interleave] [--context prose|flat] [--threads N]
"""

from __future__ import annotations

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
    non_negative_int,
    parser,
    pin_threads,
    positive_int,
    quick_defaults,
)
from bench.common.output import method_panels, save_run
from bench.common.timing import RECHECK_SPAN, LayerClock, in_turns, running_again, with_rechecks
from engine import HybridCache, OffloadConfig
from engine.api import prefill
from engine.cli import run_script
from engine.config import KEY_INDEXES
from engine.decode.host import python_selection

# cache.update() + attention of every layer, timed apart from the rest of the model
TIMED = "hybrid_timed"
CLOCK = LayerClock()
AttentionInterface.register(TIMED, CLOCK)
TimedHybridCache, TimedDynamicCache = CLOCK.timed(HybridCache), CLOCK.timed(DynamicCache)
# A lighter HNSW build than the index's default, so that 128K-key builds finish in minutes on a CPU.
BENCH_PARAMS = {"hnsw": {"M": 16, "ef_construction": 40}}
RULES = {"hybrid-default-python-selection": python_selection}  # methods whose steps take another selection rule
ON_REQUEST = {"hybrid-all-resident"}  # methods that run only where --methods names them
# timed samples (their median) of each run again: with three, one slow spell on a shared machine
# once made the median of an exact run five times the others
AGAIN_SAMPLES = 5


def fill_cache(kind: str, model, stats, n: int, cfg: OffloadConfig | None, context: str, seed: int = 0):
    """A timed cache of `kind` ("hybrid", "full", "offloaded") holding n synthetic positions
    of a `context` kind (bench.common.caches.CONTEXTS); returns (cache, seconds to build the
    host indexes)."""
    if kind == "hybrid":
        cache = TimedHybridCache(model, cfg, max_length=n + 64, progress=False)
    else:
        cache = TimedDynamicCache(offloading=kind == "offloaded")
    build_s = fill(cache, stats, n, dtype=next(model.parameters()).dtype, seed=seed, context=context)
    return cache, build_s


@torch.inference_mode()
def decode_once(model, cache, select=None) -> tuple[float, float, float]:
    """One decode step (with the selection rule `select`, None: the engine's): seconds for the whole
    model, seconds per layer in update + attention, kv_read_frac."""
    CLOCK.seconds, CLOCK.select = 0.0, select
    t0 = time.perf_counter()
    model(input_ids=torch.tensor([[DECODE_TOKEN]]), cache=cache, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - t0
    read = cache.step_stats()["kv_read_frac"] if isinstance(cache, HybridCache) else 1.0
    return seconds, CLOCK.seconds / model.config.num_hidden_layers, read


def time_decode(model, caches: dict, steps: int, warmup: int = 2) -> dict[str, tuple[float, float, float, float]]:
    """Per cache: median ms per token (whole model), median ms per layer in update + attention,
    mean kv_read_frac, and the mean ms per layer; with several caches their steps take turns
    (`in_turns`)."""
    samples = in_turns(
        {
            name: lambda _, cache=cache, name=name: decode_once(model, cache, RULES.get(name))
            for name, cache in caches.items()
        },
        steps,
        warmup,
    )
    return {
        name: (
            1e3 * statistics.median(s[0] for s in got),
            1e3 * statistics.median(s[1] for s in got),
            statistics.mean(s[2] for s in got),
            1e3 * statistics.mean(s[1] for s in got),
        )
        for name, got in samples.items()
    }


@torch.inference_mode()
def time_block(model, cache, steps: int, select=None) -> float:
    """Mean ms per layer in update + attention over `steps` decode steps of the cache alone."""
    return 1e3 * statistics.mean(decode_once(model, cache, select)[1] for _ in range(steps))


@torch.inference_mode()
def time_again(model, cache, steps: int, exact: int = 0, wider: float = 0.0) -> tuple[float, float]:
    """Median ms per layer in update + attention, and the mean kv_read_frac, of the newest
    position(s) run again as a near tie's are (engine.decode.recheck, timing.running_again): the
    `exact` newest as an exact chunk (every host token read), or the newest `wider` times wider."""
    samples, reads = [], []
    ids = torch.full((1, max(1, exact)), DECODE_TOKEN)
    CLOCK.select = None
    for _ in range(steps):
        CLOCK.seconds = 0.0
        with running_again(cache, exact, wider):
            model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        samples.append(CLOCK.seconds / model.config.num_hidden_layers)
        reads.append(cache.step_stats()["kv_read_frac"])
    return 1e3 * statistics.median(samples), statistics.mean(reads)


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


def methods(model_name: str, all_methods: bool) -> dict[str, tuple[str, object]]:
    """Per method: the cache's kind and its OffloadConfig (None: not the engine's; a function of the
    context: one made for it)."""
    out = {
        "hybrid-default": ("hybrid", OffloadConfig(device="cpu")),
        # the default's counts kept at every length (before the budget grew with the context): what growing costs
        "hybrid-default-no-growth": ("hybrid", OffloadConfig(device="cpu", grow_from=0)),
        # the same through the Python selection, the native host call's reference: what the native call saves
        "hybrid-default-python-selection": ("hybrid", OffloadConfig(device="cpu")),
        # the fixed budget with and without the estimate: what the estimate and the adaptive budget cost
        "hybrid-fixed": ("hybrid", OffloadConfig.preset("fixed", device="cpu")),
        "hybrid-fixed-noest": ("hybrid", OffloadConfig.preset("fixed", device="cpu", estimate=False)),
    }
    # a window that holds the context and the steps after it: nothing offloaded, the step is full attention
    # through the engine's resident part (what a short context on a CPU gains from a wide window)
    out["hybrid-all-resident"] = ("hybrid", lambda context: OffloadConfig(device="cpu", window=context + 64))
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


def chosen_methods(model_name: str, context: int, named: list[str] | None, all_methods: bool) -> dict:
    """The methods of a context's run, as `methods` gives them: those `named` (--methods), else those not
    ON_REQUEST (SmolLM2's few unless `all_methods`); an engine's only where the context offloads tokens."""
    chosen = {}
    # (methods named are run on SmolLM2 too: they were left out without a word)
    for m, (kind, cfg) in methods(model_name, model_name != "smollm2-135m" or all_methods or bool(named)).items():
        if m not in named if named else m in ON_REQUEST:
            continue
        if callable(cfg):
            cfg = cfg(context)
        elif kind == "hybrid" and context < cfg.resident_tokens:  # nothing would be offloaded
            continue
        chosen[m] = (kind, cfg)
    return chosen


def run(args) -> list[dict]:
    rows = []
    for model_name in args.models:
        model, tok = benchmark_model(model_name, layers=args.layers, attn_implementation=TIMED)
        stats = channel_stats(model, tok)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        for context in args.contexts:
            chosen = chosen_methods(model_name, context, args.methods, args.all_methods)
            groups = [chosen] if args.interleave else [{m: c} for m, c in chosen.items()]
            for group in groups:
                rows += measure_group(args, model, model_name, stats, weights, context, group)
        del model
    return rows


def measure_group(args, model, model_name, stats, weights, context, group) -> list[dict]:
    """Fill a cache per method of the group, time their decode steps (alternating), one row each."""
    rows, caches, builds = [], {}, {}
    for method, (kind, cfg) in group.items():
        base = {"model": model_name, "method": method, "context": context, "context_kind": args.context}
        try:
            caches[method], builds[method] = fill_cache(kind, model, stats, context, cfg, args.context)
        except (AssertionError, RuntimeError) as exc:  # the offloaded cache needs CUDA streams
            rows.append({**base, "error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(rows[-1]), flush=True)
    if not caches:
        return rows
    full_only = all(group[m][0] != "hybrid" for m in caches)
    steps = args.steps if not full_only or context <= 16384 else min(args.steps, max(3, args.steps // 3))
    timings = time_decode(model, caches, steps)
    device = next(model.parameters()).device
    for method, (ms_token, ms_layer, read, ms_layer_mean) in timings.items():
        kind, cfg = group[method]
        rerun, wider, span, over_block = {}, [], 0, None
        if cfg:  # one exact run at the prose rate covers about RECHECK_SPAN positions, as many as its work allows
            span = min(RECHECK_SPAN, cfg.exact_span(context - cfg.n_sink - cfg.window), context)
        offloads = kind == "hybrid" and context >= cfg.resident_tokens  # else no host token, no near tie to re-check
        if offloads:  # every step of one block: what a step does once a block (the key index's adds) counted once
            over_block = time_block(model, caches[method], cfg.block_size, RULES.get(method))
        if offloads and cfg.recheck_margin and method not in RULES:
            # a near tie's runs again: the step alone exactly, the positions of one exact run at the prose rate,
            # and the step alone wider, then wider still
            samples = min(steps, AGAIN_SAMPLES)
            rerun = {n: time_again(model, caches[method], samples, exact=n)[0] for n in sorted({1, span})}
            wider = [time_again(model, caches[method], samples, wider=f) for f in cfg.wider_factors]
        # from the mean over a block of steps, which counts the key index's adds once as a generation pays them
        with_again = round(with_rechecks(over_block, [ms for ms, _ in wider], rerun[span]), 4) if rerun else None
        dev, host = cache_bytes(caches[method], device)
        prefill_s = None
        if context <= args.prefill_max:
            prefill_s = round(time_prefill(model, kind, context, cfg, args.chunk), 3)
        row = {
            "model": model_name,
            "method": method,
            "context": context,
            "context_kind": args.context,
            "decode_ms_per_token": round(ms_token, 3),
            "attn_ms_per_layer": round(ms_layer, 4),
            "attn_ms_per_layer_mean": round(ms_layer_mean, 4),
            "attn_ms_per_layer_over_block": None if over_block is None else round(over_block, 4),
            "prefill_s": prefill_s,
            "index_build_s": round(builds[method], 3) if kind == "hybrid" else None,
            "device_bytes": dev + weights,
            "host_bytes": host,
            "kv_read_frac": round(read, 5),
            # near ties' positions run again exactly (engine.decode.recheck), by how many
            "rerun_attn_ms_per_layer": {n: round(ms, 4) for n, ms in rerun.items()} or None,
            "rerun_kv_read_frac": 1.0 if rerun else None,  # an exact chunk reads every host row
            # the step alone run again wider (OffloadConfig.recheck_widen), then wider still, and what each read
            "wider_attn_ms_per_layer": [round(ms, 4) for ms, _ in wider] or None,
            "wider_kv_read_frac": [round(read, 5) for _, read in wider] or None,
            "attn_ms_per_layer_with_rechecks": with_again,
            "n_layers": model.config.num_hidden_layers,
            "steps": steps,
            "interleaved": len(caches) > 1,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def plot(rows: list[dict], path) -> None:
    method_panels(
        rows,
        path,
        panel=lambda r: r["model"],
        title=str,
        x="context",
        y="attn_ms_per_layer",
        xlabel="context (tokens)",
        ylabel="update + attention ms per layer",
        size=(6, 4.5),
    )


def main(argv=None):
    p = parser(__doc__, __spec__)
    add_output_args(p, quick="short contexts, few steps", plot="update + attention ms per layer against context (PNG)")
    p.add_argument(
        "--models",
        nargs="+",
        default=["smollm2-135m", "llama-3-8b-shape"],
        choices=["smollm2-135m", *SHAPES],
    )
    p.add_argument("--contexts", type=positive_int, nargs="+", help="default: 4K to 128K tokens (--quick: 2K and 8K)")
    p.add_argument("--layers", type=positive_int, default=1, help="decoder layers of the Llama-3-8B-shaped model")
    p.add_argument(
        "--steps", type=positive_int, help="timed decode steps after 2 warm-up steps; default 9 (--quick: 3)"
    )
    p.add_argument(
        "--prefill-max",
        type=non_negative_int,
        help="longest context whose prefill is run for real; default 8192 (--quick: 2048)",
    )
    p.add_argument("--chunk", type=positive_int, default=1024, help="prefill chunk")
    p.add_argument("--all-methods", action="store_true", help="every retrieval method on SmolLM2 too")
    p.add_argument("--methods", nargs="+", help="only these methods (e.g. hybrid-default full-sdpa)")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="hold every method's cache of a context at once and alternate their decode steps (for ratios)",
    )
    add_context_arg(p)
    add_threads_arg(p)
    args = p.parse_args(argv)
    known = methods("", all_methods=True)
    distinct(args, "models", "contexts", "methods")
    unknown = [m for m in args.methods or () if m not in known]
    if unknown:
        raise ValueError(f"--methods: no method {', '.join(unknown)}; methods: {', '.join(known)}")
    quick_defaults(
        args,
        steps=(3, 9),
        prefill_max=(2048, 8192),
        contexts=([2048, 8192], [4096, 8192, 16384, 32768, 65536, 131072]),
    )
    pin_threads(args.threads)
    precompile()  # the key index's numba kernels loaded before any timing (the first build paid it)
    started = time.perf_counter()
    rows = run(args)
    config = {
        "contexts": args.contexts,
        "context_kind": args.context,
        "layers_8b_shape": args.layers,
        "seconds": round(time.perf_counter() - started, 1),
    }
    save_run(args, config, rows, plot)


if __name__ == "__main__":
    run_script(main)
