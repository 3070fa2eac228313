"""What a decode step asks of the device: the tensor operations one layer's step dispatches
(engine.decode.step.native_step), counted, views left out. On a GPU each is a kernel launched from
the CPU, and at a decode step's small sizes a launch costs about as much as the kernel runs, 32
layers a token; the count is the same on every device, so it is measured here, where its time is
not (a few of them, in engine.decode.host.read, work on the host's copies, not the device's).

Per context (and batch): the operations of one step, the default configuration on one layer of a
synthetic context (bench.common.caches) and the model's own decode queries, by where in the code
each comes from; with --batch B > 1, B sequences through one step with their device parts
stacked (the GPU's default). With --times N, also what those operations cost on this machine:
N steps timed (`step_ms`), then N more under torch.profiler, the operators' own time per step
(`operators_ms`; the native host call is no operator, so the step's time beyond it is mostly that
call) and the operations that took the most (`slowest`: name, input shapes, calls and ms per step).

    python -m bench.speed.device_ops [--quick] [--json PATH] [--models ...] [--contexts ...] [--batch B] [--times N]
"""

from __future__ import annotations

import collections
import json
import time
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common.caches import channel_stats, fill
from bench.common.models import benchmark_model
from bench.common.options import parser, positive_int
from bench.common.output import save_run
from bench.speed.host_side import layer_args, record_queries
from engine import HybridCache, OffloadConfig
from engine.cli import run_script
from engine.decode import step

# operations that make views or read metadata, and allocations, which launch no kernel
VIEWS = frozenset(
    "view _unsafe_view slice select expand as_strided t transpose unsqueeze squeeze permute alias detach "
    "lift_fresh _reshape_alias unbind split split_with_sizes narrow resolve_conj resolve_neg empty "
    "empty_strided unflatten flatten reshape contiguous to".split()
)
SLOWEST = 12  # operations listed by --times
# ... of which these copy where the tensor is not already as asked (a dtype, a device, a layout):
# in inference mode a conversion dispatches as `to`, not `_to_copy`; counted as "NAME (copy)" then
MAY_COPY = frozenset("to contiguous reshape flatten unflatten".split())
ROOT = Path(__file__).resolve().parents[2]


class OpCounter(TorchDispatchMode):
    """Counts the operations dispatched while it is active, by (site, operation): the site is the
    innermost frame in the engine or ann (file:line)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if name not in VIEWS:
            self.counts[(_site(), name)] += 1
        elif name in MAY_COPY and _copied(args[0], out):
            self.counts[(_site(), f"{name} (copy)")] += 1
        return out


def _copied(source, out) -> bool:
    """Whether `out` lies in memory of its own, not in `source`'s."""
    if not (isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor)):
        return False
    return out.device != source.device or out.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()


def _site() -> str:
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(ROOT) and path.parts[len(ROOT.parts)] in ("engine", "ann"):
            return f"{path.relative_to(ROOT)}:{frame.lineno}"
    return "elsewhere"


@torch.inference_mode()
def count(layers, q: torch.Tensor, scale: float) -> collections.Counter:
    """The operations of one native_step of `layers` with queries q [B, Hkv, G, 1, D], device parts
    stacked, after one step uncounted (a key index built at the first step is not a step's work)."""
    step.native_step(layers, q, scale, stack=True)
    with OpCounter() as counter:
        step.native_step(layers, q, scale, stack=True)
    return counter.counts


@torch.inference_mode()
def times(layers, q: torch.Tensor, scale: float, steps: int) -> dict:
    """What `steps` native_step calls of `layers` cost, with the device's own default for stacking
    (after as many untimed): ms per step, and under torch.profiler the operators' own time per step
    and the SLOWEST operations by it (grouped by input shapes)."""

    def run_steps():
        for _ in range(steps):
            step.native_step(layers, q, scale)

    run_steps()
    start = time.perf_counter()
    run_steps()
    step_ms = (time.perf_counter() - start) * 1e3 / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        run_steps()
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: e.self_cpu_time_total, reverse=True)
    per_step = 1e3 * steps  # the profiler counts microseconds over all the steps
    slowest = [
        {
            "operation": e.key,
            "shapes": str(e.input_shapes),
            "calls": e.count / steps,
            "ms": e.self_cpu_time_total / per_step,
        }
        for e in events[:SLOWEST]
    ]
    operators_ms = sum(e.self_cpu_time_total for e in events) / per_step
    return {"step_ms": round(step_ms, 3), "operators_ms": round(operators_ms, 3), "slowest": slowest}


def run(args) -> list[dict]:
    rows = []
    for model_name in args.models:
        model, tok = benchmark_model(model_name, layers=1, attn_implementation="hybrid")
        stats, dtype = channel_stats(model, tok), next(model.parameters()).dtype
        for context in args.contexts:
            caches = []
            for seed in range(args.batch):
                cache = HybridCache(model, OffloadConfig(device="cpu"), max_length=context + 64, progress=False)
                fill(cache, stats, context, dtype=dtype, seed=seed, context=args.context)
                caches.append(cache)
            q = torch.stack([record_queries(model, cache)[-1] for cache in caches])
            counts = count([cache.layers[0] for cache in caches], q, model.config.head_dim**-0.5)
            by_site, by_operation = collections.Counter(), collections.Counter()
            for (site, op), n in counts.items():
                by_site[site] += n
                by_operation[op] += n
            row = {"model": model_name, "context": context, "context_kind": args.context, "batch": args.batch}
            row |= {"operations": sum(counts.values()), "by_site": dict(by_site.most_common())}
            row["by_operation"] = dict(by_operation.most_common())
            if args.times:
                row |= times([cache.layers[0] for cache in caches], q, model.config.head_dim**-0.5, args.times)
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("by_") and k != "slowest"}), flush=True)
            for op in row.get("slowest", []):
                print(f"  {op['ms']:7.3f} ms  {op['calls']:5.1f} calls  {op['operation']} {op['shapes']}", flush=True)
            rows.append(row)
    return rows


def main(argv=None):
    p = parser(__doc__, __spec__)
    p.add_argument("--batch", type=positive_int, default=1, help="sequences through one step (stacked)")
    p.add_argument("--times", type=positive_int, help="also time this many steps, and profile as many")
    args = layer_args(p, argv, [8192, 32768, 131072])
    save_run(args, {"contexts": args.contexts, "batch": args.batch, "times": args.times}, run(args))


if __name__ == "__main__":
    run_script(main)
