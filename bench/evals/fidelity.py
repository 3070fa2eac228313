"""Per-layer fidelity of the decode attention: each engine configuration's relative error
against exact attention, beside the oracle at the same read share, with and without the
estimate of unread tokens.

Prompts are segments of natural text (Debian's license and copyright texts, read from
the tokens past `--offset`, so apart from the text the defaults were tuned on). Each is
prefilled once (the engine's prefill is exact); then, for every configuration, the next
`--steps` tokens of the text are fed one at a time (teacher forcing, so every
configuration decodes the same positions). At every decode step of every layer:

    err         ‖O − O_exact‖ / ‖O_exact‖ over the layer's query heads (the engine's output)
    read        host tokens read / host tokens (per KV head, averaged)
    oracle_err  the same for the host tokens exact attention weighs most, as many per KV
                head as the engine read in that step, and nothing for the rest
    oracle_est_err  that oracle with the unread tokens estimated (configurations with an estimate)

Summary per configuration: the mean over layers (and steps) of each, with a 95% interval
over prompts.

With --dtype bfloat16 the model, and with it the engine's device parts (its block summaries
and their products), run in bf16 as on a GPU; the default is float32, as on the CPU.

    python -m bench.evals.fidelity [--quick] [--json PATH] [--prompts N] [--context T] [--steps S]
                                   [--dtype float32|bfloat16]
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface

from bench.common import options
from bench.common.output import write_json
from bench.common.text import segments
from bench.evals.probes import LayerProbe, copy_state, named
from bench.stats import mean_interval
from engine import HybridCache
from engine.api import prefill
from engine.cli import run_script
from engine.models import load_model

PROBE = "hybrid_fidelity"
CONFIGS = named(
    "default", "tight", "fixed", "fixed-noest", "neighbours", "mean-blocks", "fewer-blocks", "default-no-growth"
)
ON_REQUEST = ("neighbours", "mean-blocks", "fewer-blocks", "default-no-growth")
SOURCE = CONFIGS["default"]  # the prefill's configuration: its key index and sketch serve every other one
METRICS = ("err", "read", "oracle_err", "oracle_est_err")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@torch.inference_mode()
def measure(model, ids: torch.Tensor, context: int, configs: dict, probe: LayerProbe, chunk: int) -> dict:
    """Per configuration: {layer: {metric: mean over the decode steps}}."""
    model.set_attn_implementation("hybrid")
    source = HybridCache(model, SOURCE, progress=False)  # builds every index the configurations share
    prefill(model, ids[:, :context], source, chunk, progress=False)
    source.build_indexes()
    out = {}
    for name, cfg in configs.items():
        cache = copy_state(source, model, cfg)
        probe.records.clear()
        model.set_attn_implementation(PROBE)
        for t in range(context, ids.shape[1]):
            model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True, logits_to_keep=1)
        model.set_attn_implementation("hybrid")
        out[name] = probe.layer_means()
    return out


def summarise(per_prompt: list[dict], configs) -> dict:
    """{config: {metric: (mean over prompts of the mean over layers, 95% low, high), 'layers': {...}}}."""
    summary = {}
    for name in configs:
        layers = per_prompt[0][name].keys()
        entry = {"layers": {}}
        for metric in METRICS:
            if metric not in next(iter(per_prompt[0][name].values())):
                continue
            per_layer = np.array([[p[name][i][metric] for i in layers] for p in per_prompt])  # [prompts, layers]
            entry[metric] = mean_interval(per_layer.mean(axis=1))
            for j, i in enumerate(layers):
                entry["layers"].setdefault(i, {})[metric] = float(per_layer[:, j].mean())
        summary[name] = entry
    return summary


def table(summary: dict) -> str:
    lines = ["config        mean over layers: err [95%]        read    oracle_err  oracle+est_err"]
    for name, e in summary.items():
        m, lo, hi = e["err"]
        oe = f"{e['oracle_est_err'][0]:.3f}" if "oracle_est_err" in e else "  -  "
        lines.append(
            f"{name:<13} {m:.3f} [{lo:.3f}, {hi:.3f}]  {100 * e['read'][0]:5.2f}%   {e['oracle_err'][0]:.3f}       {oe}"
        )
    lines.append("")
    names = list(summary)
    lines.append("layer  " + "  ".join(f"{n + ' err/read/orc/orc+est':>32}" for n in names))
    for i in next(iter(summary.values()))["layers"]:
        cells = []
        for n in names:
            d = summary[n]["layers"][i]
            est = f"{d['oracle_est_err']:.3f}" if "oracle_est_err" in d else "  -  "
            cells.append(f"{d['err']:.3f} / {100 * d['read']:4.1f}% / {d['oracle_err']:.3f} / {est}")
        lines.append(f"{i:>5}  " + "  ".join(f"{c:>32}" for c in cells))
    return "\n".join(lines)


def main(argv=None):
    p = options.parser(__doc__, __spec__)
    options.add_output_args(p, quick="2 short prompts, 4 steps")
    p.add_argument("--prompts", type=options.positive_int, help="default 12 (--quick: 2)")
    p.add_argument("--context", type=options.positive_int, help="prompt tokens; default 4096 (--quick: 512)")
    p.add_argument("--steps", type=options.positive_int, help="decode steps per prompt; default 24 (--quick: 4)")
    p.add_argument(
        "--offset", type=options.non_negative_int, default=200_000, help="text tokens skipped before the first prompt"
    )
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=[c for c in CONFIGS if c not in ON_REQUEST])
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the model's dtype (bfloat16: as on a GPU)")
    options.add_model_args(p, rope_scale=True)
    options.add_threads_arg(p)
    args = p.parse_args(argv)
    options.quick_defaults(args, prompts=(2, 12), context=(512, 4096), steps=(4, 24))
    options.pin_threads(args.threads)

    model, tok = load_model(
        args.model, dtype=DTYPES[args.dtype], attn_implementation="hybrid", rope_scale=args.rope_scale
    )
    probe = LayerProbe()
    AttentionInterface.register(PROBE, probe)
    configs = {name: CONFIGS[name] for name in args.configs}
    started = time.perf_counter()
    per_prompt = []
    for ids in tqdm(segments(tok, args.prompts, args.context + args.steps, args.offset), desc="prompts"):
        per_prompt.append(measure(model, ids, args.context, configs, probe, args.chunk))
    summary = summarise(per_prompt, configs)
    print(table(summary))
    if args.json:
        result = {
            "config": {
                "model": args.model,
                "rope_scale": args.rope_scale,
                "dtype": args.dtype,
                "prompts": args.prompts,
                "context": args.context,
                "steps": args.steps,
                "offset": args.offset,
                "threads": args.threads,
                "engine_configs": {k: v.__dict__ for k, v in configs.items()},
                "seconds": round(time.perf_counter() - started, 1),
            },
            "summary": summary,
            "per_prompt": per_prompt,
        }
        write_json(args.json, result)


if __name__ == "__main__":
    run_script(main)
