"""The engine on a CUDA GPU under a 24 GB cap: exactness, conservation, decode speed of a
Llama-3-8B-shaped model against full attention, and prefill with the index build.

1. Caps the process with torch.cuda.set_per_process_memory_fraction (the card may
   be larger) and reports every case's peak allocated device bytes.
2. Exactness: a random-weight Llama with GQA, in fp32 and bf16, budgets that cover
   every token: prefill and decode logits against full attention (sdpa) on the same
   GPU (fp32: max abs difference <= 1e-4; bf16: <= BF16_TOL, bench/gpu_correctness.py), greedy
   tokens equal, and every position in exactly one place after many evictions; a document
   prefilled once (engine.prefix) and two questions after it in turn, the first asked again
   after the second: its tokens and logits again, and in fp32 the whole prompt's tokens.
3. Decode: the Llama-3-8B shape (32 layers, 32 query / 8 KV heads, bf16, random
   weights); each context is built directly in the cache from keys and values drawn
   on the device with the per-channel statistics of a short real prefill
   (bench.common.caches, as bench.speed.decode does); ms per token (the per-layer clock paused)
   and attention ms per layer (each layer synchronised, in steps taken in turns with those),
   with the read share, against full attention under the cap where it fits and, for
   reference, uncapped; the engine's step with its host side in one native call and, beside
   it, with the Python selection; its mean over one block of steps (the median leaves out
   what a step does once a block: the key index takes in the newest host keys); the step
   with near ties re-checked at the rate measured on prose (bench.common.timing: 3.86% of
   the steps run again wider, then wider still, 0.85% also exactly, each exact run covering
   the positions decoded since the last one, engine.decode.recheck),
   derived from the timed step and the timed runs again; and batch 8 against batch 1 at --batch-context,
   batch 8 with its device parts stacked (the GPU's default) and sequence by sequence.
4. Prefill: time to first token of a real chunked prefill of --prefill tokens through
   the engine as HybridLLM runs it (index builds overlapped, host stores from the engine's
   pool: a first call, and a second that reuses its stores), the same layer by layer
   (engine.layer_prefill, stores reused), and through sdpa (under the cap, else uncapped),
   with the ratio to sdpa, at each of --chunk; beside each, the host K/V its chunks bring
   back to the device (in chunks, every chunk of a layer attends to every host row before
   it: n * n / chunk rows in all, counted, not timed; layer by layer, none).

Without CUDA (--device cpu, as the test suite runs it) the same steps run at toy
sizes, so the script is tested everywhere; its figures mean something on a GPU only.
On a machine without network, bench/gpu_run.sh installs what it needs and runs it.
`--cases` runs part of the check (exactness, decode, batch, prefill), to split it over
calls where each may run only so long; every row is printed as one JSON line when it is done.

    python -m bench.gpu_check [--json PATH] [--cap-gb 24] [--contexts 32768 65536 131072] [--threads N]
                              [--cases exactness decode batch prefill] [--chunk 2048 8192]
"""

from __future__ import annotations

import json
import platform
import signal
import statistics
import traceback
from pathlib import Path

import torch
from transformers import AttentionInterface, DynamicCache

from ann.precompile import precompile
from bench.common.caches import channel_stats, fill
from bench.common.device import peak_bytes, reset_peak
from bench.common.options import add_threads_arg, parser, pin_threads, positive_int
from bench.common.output import environment, write_json
from bench.common.profiling import profiled, torch_profiled
from bench.common.timing import RECHECK_SPAN, LayerClock, Synced, in_turns, running_again, with_rechecks
from bench.gpu_correctness import TOY, exactness, exactness_case, llama, prefix_case, prefix_rewind
from engine import HybridCache, OffloadConfig
from engine.api import prefill
from engine.cache.store import StorePool
from engine.cli import output_file, run_script
from engine.decode import step as decode_steps
from engine.decode.host import python_selection
from engine.native import ops
from engine.plan import MODEL_PRESETS, ModelShape
from engine.prefill import chunk_bounds

TIMED, TIMED_PYTHON = "hybrid_gpu_timed", "hybrid_gpu_timed_python_selection"
CASES = ("exactness", "decode", "batch", "prefill")  # what --cases may name, in the order they run


def failure(exc: BaseException) -> str:
    """One line naming an unexpected error and where it arose; the whole traceback goes to stderr,
    so that one broken case still lets the others run and report (time on a GPU machine may be short)."""
    traceback.print_exception(exc)
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {exc} ({Path(frame.filename).name}:{frame.lineno})"


# --------------------------------------------------------------------- decode


def filled(kind: str, model, stats, n: int, cfg: OffloadConfig | None) -> tuple:
    """A cache holding n synthetic positions drawn on the device; (cache, index build seconds)."""
    cache = HybridCache(model, cfg, max_length=n + 64, progress=False) if kind == "hybrid" else DynamicCache()
    return cache, fill(cache, stats, n, dtype=next(model.parameters()).dtype)


@torch.inference_mode()
def time_decode(
    model, cache, clock: LayerClock, steps: int, device, rerun: int = 0, wider: float = 0.0, per_layer: bool = True
) -> dict:
    """Median decode step times after 2 warm-up steps, and the mean ms per token (which, over
    `block_size` steps or more, counts the work a step does once a block: the key index's adds);
    with `rerun` n, of the n newest positions run again as an exact chunk, with `wider`, of the
    newest run again that many times wider, as a near tie's are (engine.decode.recheck).

    A token's time comes from steps with the clock paused; with `per_layer`, its attention's per
    layer from steps in turns with them with the clock running (`ms_per_token_clocked`: their
    whole time, which on a GPU counts the clock's two synchronisations a layer)."""
    token = torch.full((1, max(1, rerun)), 17, device=device)

    def step(_, clocked: bool) -> tuple[float, float, float]:
        clock.seconds = 0.0
        with clock.paused(not clocked), Synced(device) as t, running_again(cache, rerun, wider):
            model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
        read = cache.step_stats()["kv_read_frac"] if isinstance(cache, HybridCache) else 1.0
        return t.seconds, clock.seconds / model.config.num_hidden_layers, read

    runs = {"token": lambda i: step(i, clocked=False)}
    if per_layer:
        runs["layers"] = lambda i: step(i, clocked=True)
    samples = in_turns(runs, steps)
    tokens, layers = samples["token"], samples.get("layers", [])
    out = {
        "ms_per_token": 1e3 * statistics.median(s[0] for s in tokens),
        "ms_per_token_mean": 1e3 * statistics.mean(s[0] for s in tokens),
        "kv_read_frac": statistics.mean(s[2] for s in tokens + layers),
    }
    if layers:
        out["ms_per_token_clocked"] = 1e3 * statistics.median(s[0] for s in layers)
        out["attn_ms_per_layer"] = 1e3 * statistics.median(s[1] for s in layers)
    return out


SHOWN: list[dict] = []  # the rows printed so far: what a run stopped at its time limit writes


class Stopped(BaseException):
    """SIGTERM, as `timeout` sends at a part's limit: the run writes the rows it finished and ends."""


def _stop(signum, frame):
    raise Stopped


def shown(row: dict) -> None:
    """A finished row, printed (one JSON line) and kept for a run stopped before its end."""
    SHOWN.append(row)
    print(json.dumps(row), flush=True)


def host_bytes(cache) -> int:
    return sum(cache.memory_report()["host"].values()) if isinstance(cache, HybridCache) else 0


def model_cases(args, device, cap_fraction: float) -> list[dict]:
    """The cases of the Llama-3-8B-shaped model (a toy shape on the CPU), built once: decode,
    batch and prefill, those of them `--cases` names (none: the model is not built)."""
    if not set(args.cases) & {"decode", "batch", "prefill"}:
        return []
    shape = MODEL_PRESETS["llama-3-8b"] if device.type == "cuda" else TOY
    layers = shape["num_hidden_layers"] if device.type == "cuda" else 2
    clocks = {TIMED: LayerClock(device), TIMED_PYTHON: LayerClock(device, select=python_selection)}
    for name, clock in clocks.items():
        AttentionInterface.register(name, clock)
    model = llama(shape, layers, torch.bfloat16, device, impl=TIMED)
    stats = channel_stats(model, None)  # random token ids, on the model's device
    cfg = OffloadConfig(device=device.type)
    rows = decode_cases(args, model, stats, cfg, clocks, device, cap_fraction) if "decode" in args.cases else []
    model.set_attn_implementation(TIMED)
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(cap_fraction, device)
    if "batch" in args.cases:
        rows += batch_cases(args, model, device, stats, cfg, clocks[TIMED])
    if "prefill" in args.cases:
        rows += prefill_cases(args, model, device, cfg, cap_fraction)
    return rows


def decode_cases(args, model, stats, cfg, clocks, device, cap_fraction: float) -> list[dict]:
    """Decode steps at each of --contexts: the engine's (native call, Python selection, counts
    kept at every length; near ties' runs again) and full attention's, capped where it fits."""
    rows = []
    for n in args.contexts:
        runs = [("hybrid-default", "hybrid", TIMED, True, cfg)]
        runs += [("hybrid-python-selection", "hybrid", TIMED_PYTHON, True, cfg)]
        # the default's counts kept at every length (OffloadConfig.grow_from): what growing them costs
        runs += [("hybrid-default-no-growth", "hybrid", TIMED, True, cfg.replace(grow_from=0))]
        runs += [("full-sdpa", "full", TIMED, True, None), ("full-sdpa-uncapped", "full", TIMED, False, None)]
        for name, kind, impl, capped, run_cfg in runs:
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(cap_fraction if capped else 1.0, device)
            reset_peak(device)
            row = {"case": "decode", "method": name, "context": n, "capped": capped}
            model.set_attn_implementation(impl)
            clock = clocks[impl]
            cache = None
            try:
                cache, build_s = filled(kind, model, stats, n, run_cfg)
                row.update(time_decode(model, cache, clock, args.steps, device))
                row["peak_device_bytes"] = peak_bytes(device)  # of the steps: not of the runs again after them
                if name == "hybrid-default":
                    # every step of one block: what a step does once a block (the key index's adds) counted once
                    block = time_decode(model, cache, clock, cfg.block_size, device, per_layer=False)
                    row["ms_per_token_over_block"] = block["ms_per_token_mean"]
                    # near ties run again (engine.decode.recheck): wider, and exactly
                    wide = [time_decode(model, cache, clock, 3, device, wider=f) for f in cfg.wider_factors]
                    span = min(RECHECK_SPAN, cfg.exact_span(n - cfg.n_sink - cfg.window))
                    again = time_decode(model, cache, clock, 3, device, rerun=span)
                    # from the mean over a block of steps, which counts the key index's adds as a generation does
                    step = row["ms_per_token_over_block"]
                    mean = with_rechecks(step, [w["ms_per_token"] for w in wide], again["ms_per_token"])
                    row.update(
                        wider_ms_per_token=[w["ms_per_token"] for w in wide],
                        wider_kv_read_frac=[w["kv_read_frac"] for w in wide],
                        ms_per_token_with_rechecks=mean,
                        rerun_positions=span,
                        rerun_ms_per_token=again["ms_per_token"],
                        rerun_attn_ms_per_layer=again["attn_ms_per_layer"],
                    )
                if args.profile and name == "hybrid-default":  # extra steps: the profiler slows what it watches
                    with profiled(args.profile, f"decode-{name}-{n}"):
                        time_decode(model, cache, clock, 4, device, per_layer=False)
                    with torch_profiled(args.profile, f"decode-{name}-{n}", device):
                        time_decode(model, cache, clock, 2, device, per_layer=False)
                row.update(index_build_s=build_s if kind == "hybrid" else None, host_bytes=host_bytes(cache))
            except torch.OutOfMemoryError:
                row["error"] = "out of memory under the cap" if capped else "out of memory"
            except Exception as exc:
                row["error"] = failure(exc)
            finally:
                cache = None  # also after a failure: the next case starts without this one's memory
            if name == "hybrid-default" and "peak_device_bytes" in row:  # an exact run again holds a layer's
                row["peak_device_bytes_with_rechecks"] = peak_bytes(device)  # host rows on the device at once
            else:
                row["peak_device_bytes"] = peak_bytes(device)
            rows.append(row)
            shown(row)
            if name == "full-sdpa" and "error" not in row:
                break  # it fits under the cap: the uncapped run would say nothing more
    return rows


@torch.inference_mode()
def batch_cases(args, model, device, stats, cfg, clock) -> list[dict]:
    """Decode steps of batches of 1 and --batch sequences, each holding --batch-context positions:
    tokens per second and attention ms per layer, with the batch's mean read share. The larger
    batch runs its device parts stacked (the default on a GPU) and, in turns with it on the same
    caches, sequence by sequence (`-per-sequence`; engine.decode.step.STACK)."""
    rows = []
    for size in (1, args.batch):
        reset_peak(device)
        variants = {"": None} if size == 1 else {"": True, "-per-sequence": False}  # stacked: the GPU's default
        names = {suffix: f"hybrid-default-batch{size}{suffix}" for suffix in variants}
        done, caches, batch, step = [], [], None, None
        try:
            caches = [filled("hybrid", model, stats, args.batch_context, cfg)[0] for _ in range(size)]
            batch = HybridCache.stack(caches)
            tokens = torch.full((size, 1), 17, device=device)

            def step(_, stack, clocked=False, batch=batch, tokens=tokens, size=size) -> tuple[float, float, float]:
                clock.seconds = 0.0
                decode_steps.STACK = stack
                try:
                    with clock.paused(not clocked), Synced(device) as t:
                        model(input_ids=tokens, cache=batch, use_cache=True, logits_to_keep=1)
                finally:
                    decode_steps.STACK = None
                reads = [batch.step_stats(b)["kv_read_frac"] for b in range(size)]
                return t.seconds, clock.seconds / model.config.num_hidden_layers, statistics.mean(reads)

            # a step's time with the clock paused, its attention's per layer from a step with it running
            runs = {
                (suffix, clocked): lambda i, stack=stack, clocked=clocked, step=step: step(i, stack, clocked)
                for suffix, stack in variants.items()
                for clocked in (False, True)
            }
            samples = in_turns(runs, args.steps)
            for suffix in variants:
                tokens, layers = samples[suffix, False], samples[suffix, True]
                seconds = statistics.median(s[0] for s in tokens)
                done.append(
                    dict(
                        case="batch",
                        method=names[suffix],
                        context=args.batch_context,
                        batch=size,
                        ms_per_step=1e3 * seconds,  # a step of the whole batch: `size` tokens
                        ms_per_token=1e3 * seconds / size,
                        tokens_per_s=size / seconds,
                        ms_per_token_clocked=1e3 * statistics.median(s[0] for s in layers) / size,
                        attn_ms_per_layer=1e3 * statistics.median(s[1] for s in layers),
                        kv_read_frac=statistics.mean(s[2] for s in tokens + layers),
                    )
                )
            if args.profile and size > 1:  # after the timed steps: the profiler slows what it watches
                with torch_profiled(args.profile, f"batch{size}-stacked", device):
                    for i in range(2):
                        step(i, True)
        except Exception as exc:  # out of memory under the cap, or a bug: a row that says which
            error = "out of memory under the cap" if isinstance(exc, torch.OutOfMemoryError) else failure(exc)
            done = [dict(case="batch", method=names[""], context=args.batch_context, error=error)]
        finally:
            caches, batch, step, runs = [], None, None, {}  # the step function and its closures hold the batch too
        for row in done:
            row["peak_device_bytes"] = peak_bytes(device)
            shown(row)
        rows += done
    one = next((r for r in rows if r["method"] == "hybrid-default-batch1" and "tokens_per_s" in r), None)
    for row in rows:
        if one is not None and row is not one and "tokens_per_s" in row:
            row["tokens_per_s_vs_batch1"] = row["tokens_per_s"] / one["tokens_per_s"]
    return rows


@torch.inference_mode()
def prefill_cases(args, model, device, cfg, cap_fraction: float) -> list[dict]:
    """Time to first token as HybridLLM gets it (the index builds overlapped with the prefill, the
    host stores from the engine's pool) at each of --chunk: a first call, whose stores are
    allocated ahead while it runs (the first chunk size only), and calls that reuse them, in chunks
    and layer by layer; beside sdpa's prefill in the same chunks under the cap and, where that
    does not fit, uncapped."""
    ids = torch.randint(0, model.config.vocab_size, (1, args.prefill), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)
    model.set_attn_implementation("hybrid")
    stores = StorePool()
    rows = []
    for i, chunk in enumerate(args.chunk):
        runs = [("hybrid-default-first-call", True)] if i == 0 else []
        runs += [("hybrid-default-stores-reused", True), ("hybrid-by-layer-stores-reused", True)]
        runs += [("full-sdpa", True), ("full-sdpa-uncapped", False)]
        rows += prefill_runs(runs, model, ids, chunk, device, cfg, stores, cap_fraction, args.profile)
    model.set_attn_implementation(TIMED)
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(cap_fraction, device)
    return rows


def prefill_runs(runs, model, ids, chunk: int, device, cfg, stores, cap_fraction: float, profile) -> list[dict]:
    """The prefill rows of one chunk size, each hybrid one with its ratio to sdpa's first token."""
    rows, n = [], ids.shape[1]
    for name, capped in runs:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(cap_fraction if capped else 1.0, device)
        reset_peak(device)
        hybrid = name.startswith("hybrid")
        row = {"case": "prefill", "method": name, "context": n, "chunk": chunk, "capped": capped}
        order = "layers" if "by-layer" in name else "chunks"  # engine.layer_prefill: nothing read back
        if hybrid:
            read_back = host_bytes_read_back(model.config, model.dtype, cfg, n, chunk)
            row["host_bytes_read_back"] = read_back if order == "chunks" else 0
        cache = None
        under_profiler = bool(profile) and name == "hybrid-default-first-call"  # a first call has no second
        if under_profiler:
            row["timed_under_profiler"] = True  # its seconds count the profiler's own work
        try:
            # (the timer inside: the profile's writing of its table after the block is not counted)
            with profiled(profile, f"prefill-{name}", under_profiler), Synced(device) as t:
                cache = (
                    HybridCache(model, cfg, max_length=n, prompt_length=n, progress=False, stores=stores)
                    if hybrid
                    else DynamicCache()
                )
                prefill(model, ids, cache, chunk, progress=False, order=order)
            row["prefill_s"] = t.seconds
            row["index_build_after_s"] = 0.0
            if hybrid:
                with Synced(device) as t:
                    cache.build_indexes()  # what the overlapped builds left
                row["index_build_after_s"] = t.seconds
            row["first_token_s"] = row["prefill_s"] + row["index_build_after_s"]
        except torch.OutOfMemoryError:
            row["error"] = "out of memory under the cap" if capped else "out of memory"
        except Exception as exc:
            row["error"] = failure(exc)
        finally:
            if isinstance(cache, HybridCache):
                cache.release()
        row["peak_device_bytes"] = peak_bytes(device)
        del cache
        rows.append(row)
        shown(row)
        if name == "full-sdpa" and "error" not in row:
            break  # it fits under the cap: the uncapped run would say nothing more
    sdpa = next((r["first_token_s"] for r in rows if not r["method"].startswith("hybrid") and "error" not in r), None)
    for r in rows:
        if sdpa and r["method"].startswith("hybrid") and "error" not in r:
            r["ratio_to_sdpa"] = r["first_token_s"] / sdpa
    return rows


def host_bytes_read_back(config, dtype: torch.dtype, cfg: OffloadConfig, n: int, chunk: int) -> int:
    """Bytes of host K/V a chunked prefill of n tokens brings back to the device: each chunk of
    each layer attends to every host row before it (engine.attention.prefill_attention), so
    the sum grows as n * n / chunk. Counted from the chunks' bounds, not measured."""
    m = ModelShape.of(config)
    row = 2 * m.num_key_value_heads * m.head_dim * dtype.itemsize  # K and V of one position
    rows = sum(max(0, min(end - cfg.window, start) - cfg.n_sink) for start, end in chunk_bounds(n, chunk))
    return rows * row * m.num_hidden_layers


def table(rows: list[dict]) -> str:
    gib = 2**30
    lines = [f"{'case':<22} {'context':>8} {'ms/token':>9} {'attn ms/layer':>13} {'read':>7} {'peak GiB':>9} notes"]
    for r in rows:
        name = r.get("method", r["case"])
        ms = f"{r['ms_per_token']:.1f}" if "ms_per_token" in r else ""
        attn = f"{r['attn_ms_per_layer']:.3f}" if "attn_ms_per_layer" in r else ""
        read = f"{100 * r['kv_read_frac']:.2f}%" if "kv_read_frac" in r else ""
        notes = r.get("error", "")
        if r["case"].startswith("exactness") and "error" not in r:
            notes = f"max |dlogit| {r['max_abs_logit_diff']:.2e} (tol {r['tolerance']:g}), greedy "
            notes += (
                "equal"
                if r["greedy_equal"]
                else f"parts at token {r['greedy_first_difference']} (a near-tie: {r['greedy_ok']})"
            )
            notes += f", conservation {r['conservation_ok']}"
        if r["case"].startswith("prefix") and "error" not in r:
            notes = f"a question again after another: the same {r['same_after_rewind']}, "
            notes += f"the whole prompt's tokens {r['equals_whole_prompt']}, "
            notes += f"after an extension {r['extended_equals_whole_prompt']}, "
            notes += f"saved and loaded the saved one's {r['loaded_equals_saved']}"
        if "ms_per_token_clocked" in r:
            notes += f"{r['ms_per_token_clocked']:.1f} ms/token with the clock running; "
        if "ms_per_token_over_block" in r:
            notes += f"mean over a block of steps {r['ms_per_token_over_block']:.1f} ms/token; "
        if "rerun_ms_per_token" in r:
            again, per_layer = r["rerun_ms_per_token"], r["rerun_attn_ms_per_layer"]
            runs = zip(r["wider_ms_per_token"], r["wider_kv_read_frac"])
            wider = ", ".join(f"{ms:.1f} ms, {100 * read:.2f}% read" for ms, read in runs)
            notes += (
                f"with re-checks at the prose rates {r['ms_per_token_with_rechecks']:.1f} ms/token "
                f"(wider runs: {wider}; "
                f"an exact run of {r['rerun_positions']} positions: {again:.1f} ms, {per_layer:.3f}/layer)"
            )
        if "tokens_per_s" in r:
            notes = f"batch {r['batch']}: {r['tokens_per_s']:.1f} tokens/s" + (
                f", {r['tokens_per_s_vs_batch1']:.2f}x batch 1" if "tokens_per_s_vs_batch1" in r else ""
            )
        if "first_token_s" in r:
            notes = f"chunk {r['chunk']}: first token {r['first_token_s']:.2f} s (prefill {r['prefill_s']:.2f} s"
            notes += f", index build after it {r['index_build_after_s']:.2f} s)"
            if "host_bytes_read_back" in r:
                notes += f", {r['host_bytes_read_back'] / gib:.1f} GiB of host K/V read back"
            notes += f", {r['ratio_to_sdpa']:.2f}x sdpa" if "ratio_to_sdpa" in r else ""
        context = r.get("context", "")
        lines.append(
            f"{name:<22} {context:>8} {ms:>9} {attn:>13} {read:>7} {r['peak_device_bytes'] / gib:>9.2f} {notes}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = parser(__doc__, __spec__)
    p.add_argument("--json", type=output_file, help="write the rows here as JSON")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cap-gb", type=float, default=24.0, help="device memory cap, GiB")
    p.add_argument("--contexts", type=int, nargs="+", help="decode contexts; default 32K 64K 128K (cpu: 2048)")
    p.add_argument("--prefill", type=int, help="prefill tokens; default 32768 (cpu: 1024)")
    p.add_argument("--chunk", type=positive_int, nargs="+", default=[2048], help="prefill chunk sizes, each timed")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per case (after 2 warm-up steps)")
    p.add_argument("--batch", type=int, default=8, help="the larger batch of the batch case (against batch 1)")
    p.add_argument(
        "--batch-context", type=int, help="positions per sequence of the batch case; default 32768 (cpu: 1024)"
    )
    p.add_argument("--profile", type=Path, help="folder for the engine's decode and prefill cProfiles (cumulative)")
    p.add_argument(
        "--cases",
        nargs="+",
        choices=CASES,
        default=list(CASES),
        help="which cases to run (default: all), e.g. to split the check over runs of limited length",
    )
    add_threads_arg(p)
    args = p.parse_args(argv)
    pin_threads(args.threads)
    precompile()  # the key index's numba kernels loaded before any timing (the first build paid it)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and device.index is None:  # the memory cap and peak counters need an index
        device = torch.device("cuda", torch.cuda.current_device())
    args.contexts = args.contexts or ([32768, 65536, 131072] if cuda else [2048])
    args.prefill = args.prefill or (32768 if cuda else 1024)
    args.batch_context = args.batch_context or (32768 if cuda else 1024)
    env = {
        **environment(),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "cap_gib": args.cap_gb if cuda else None,
        "cpu_threads": torch.get_num_threads(),
        "native_ext": ops.HAS_EXT,  # else every engine timing is the torch fallback's
    }
    cap_fraction = 1.0
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        cap_fraction = min(1.0, args.cap_gb * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(cap_fraction, device)
    print(json.dumps(env), flush=True)
    SHOWN.clear()
    signal.signal(signal.SIGTERM, _stop)
    try:
        rows = run_cases(args, device, cap_fraction)
    except Stopped:  # a time limit: the JSON held nothing of the rows it had finished
        stopped = {"case": "stopped", "error": "stopped (SIGTERM) before its end"}
        rows = [*SHOWN, {**stopped, "peak_device_bytes": peak_bytes(device)}]
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(table(rows))
    if args.json:
        write_json(args.json, {"environment": env, "rows": rows})
    if rows[-1]["case"] == "stopped":
        return 124
    exact = [r for r in rows if r["case"].startswith("exactness")]
    exact_ok = all(r.get("logits_ok") and r["greedy_ok"] and r["conservation_ok"] and r["all_read"] for r in exact)
    exact_ok &= all(r.get("prefix_ok") for r in rows if r["case"].startswith("prefix"))
    broken = [r for r in rows if "error" in r and "out of memory" not in r["error"]]
    return 0 if exact_ok and not broken else 1


def run_cases(args, device, cap_fraction: float) -> list[dict]:
    """The rows of the cases `args.cases` names."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16) if "exactness" in args.cases else ():
        try:
            rows.append(exactness(device, dtype, prompt=600, new=80))
        except Exception as exc:
            rows.append({"case": exactness_case(dtype), "error": failure(exc), "peak_device_bytes": peak_bytes(device)})
        shown(rows[-1])
        try:
            rows.append(prefix_rewind(device, dtype, document=600, new=40))
        except Exception as exc:
            rows.append({"case": prefix_case(dtype), "error": failure(exc), "peak_device_bytes": peak_bytes(device)})
        shown(rows[-1])
    try:
        rows += model_cases(args, device, cap_fraction)
    except Exception as exc:
        rows.append({"case": "decode", "error": failure(exc), "peak_device_bytes": peak_bytes(device)})
    return rows


if __name__ == "__main__":
    run_script(main)
