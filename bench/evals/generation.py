"""Long generation: how closely the engine follows full attention over many decode steps.

Each prompt is a segment of natural text (Debian's license and copyright texts, from
`--offset` tokens on); after it, full attention continues greedily for `--new` tokens.
Every engine configuration then continues the same prefilled state twice:

    free     its own greedy continuation; agreement = the share of positions where its
             token equals full attention's, and the first position where they differ
             (after it the two texts continue from different tokens), and the share
             of the host KV it read per step (every run of a step re-checked at a near
             tie, engine.decode.recheck) and the share of steps re-checked
    forced   fed full attention's tokens (teacher forcing), so that its cache holds the
             K/V its own attention computed for them; agreement = the share of steps whose
             greedy pick equals full attention's next token, and at each step where it
             differs the engine's own gap between its two highest logits (run
             `default-norecheck` to see the gaps a re-check margin must exceed)

Means over prompts with 95% intervals. The `exact` configuration reads every host token (the
block index taking every block, no estimate): it computes full attention through the engine's
own gather and merge, so where it parts from full attention, arithmetic alone did it (a near
tie of full attention's top two logits), and its agreement is what any configuration can reach.

    python -m bench.evals.generation [--quick] [--json PATH] [--prompts N] [--context T] [--new K]
                                    [--configs ...] [--no-forced]
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from bench.common import options
from bench.common.output import write_json
from bench.common.text import segments
from bench.evals.probes import copy_state, greedy, named, prefill_and_answer
from bench.stats import mean_interval
from engine.cli import run_script
from engine.models import load_model

CONFIGS = named(
    "default",
    "fixed-noest",
    "default-norecheck",
    "default-credit-24",
    "default-credit-all",
    "default-5pct-widen4",
    "default-full-span",
    "default-exact-2pct",
    "default-exact-2pct-widen3",
    "default-exact-2pct-one-wider",
    "default-no-credit-fit",
    "exact",
)
SOURCE = CONFIGS["default"]


@torch.inference_mode()
def continuations(
    model, ids: torch.Tensor, new: int, chunk: int, configs: list[str], forced: bool = True
) -> dict[str, dict]:
    source, logits, full = prefill_and_answer(model, ids, SOURCE, chunk, new, eos=set())
    out = {}
    for name in configs:
        cfg = CONFIGS[name]
        steps = []
        free = greedy(model, copy_state(source, model, cfg), logits, new, eos=set(), record=steps)
        same = [a == b for a, b in zip(free, full)]
        out[name] = {
            "free_agreement": sum(same) / len(full),
            "first_difference": same.index(False) if False in same else len(full),
            # (one new token: no decode step, nothing read)
            "kv_read_frac": statistics.mean(s["kv_read_frac"] for s in steps) if steps else 0.0,
            "rechecked_frac": statistics.mean(s["rechecked"] for s in steps) if steps else 0.0,
            "rechecks": sum(s["rechecked"] for s in steps),
            "rechecks_changed": sum(s["changed"] for s in steps if s["rechecked"]),  # whose exact run changed it
            "widened": sum(s["widened"] for s in steps),  # steps run again wider first
            "wider_runs": sum(s["wider_runs"] for s in steps),  # ... and their runs (up to recheck_wider_runs a step)
        }
        if forced:
            steps = []
            fed = greedy(model, copy_state(source, model, cfg), logits, new, eos=set(), record=steps, forced=full)
            out[name]["forced_agreement"] = sum(a == b for a, b in zip(fed, full)) / len(full)
            # the engine's own top-two gap where its pick differs (what a re-check margin must exceed)
            differ = [j for j in range(1, len(full)) if fed[j] != full[j]]
            out[name]["forced_gaps_where_different"] = [round(steps[j - 1]["gap"], 4) for j in differ]
    return out


def main(argv=None):
    p = options.parser(__doc__, __spec__)
    options.add_output_args(p, quick="2 short prompts, 16 tokens")
    options.add_model_args(p, rope_scale=True)
    p.add_argument("--prompts", type=options.positive_int, help="default 20 (--quick: 2)")
    p.add_argument("--context", type=options.positive_int, help="prompt tokens; default 4096 (--quick: 512)")
    p.add_argument("--new", type=options.positive_int, help="generated tokens; default 256 (--quick: 16)")
    p.add_argument(
        "--offset", type=options.non_negative_int, default=600_000, help="text tokens skipped before the first prompt"
    )
    options.add_threads_arg(p)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["default", "fixed-noest"])
    p.add_argument("--no-forced", action="store_true", help="leave out the teacher-forced runs")
    args = p.parse_args(argv)
    options.quick_defaults(args, prompts=(2, 20), context=(512, 4096), new=(16, 256))
    options.pin_threads(args.threads)

    model, tok = load_model(args.model, attn_implementation="hybrid", rope_scale=args.rope_scale)
    started = time.perf_counter()
    per_prompt = [
        continuations(model, ids, args.new, args.chunk, args.configs, not args.no_forced)
        for ids in tqdm(segments(tok, args.prompts, args.context, args.offset), desc="prompts")
    ]
    summary = {}
    for name in args.configs:
        numbers = [k for k, v in per_prompt[0][name].items() if not isinstance(v, list)]  # gaps stay per prompt
        summary[name] = {k: mean_interval([p[name][k] for p in per_prompt]) for k in numbers}
        cells = ", ".join(f"{k} {m:.3f} [{lo:.3f}, {hi:.3f}]" for k, (m, lo, hi) in summary[name].items())
        print(f"{name}: {cells}")
    if args.json:
        config = {
            k: getattr(args, k) for k in ("model", "rope_scale", "prompts", "context", "new", "offset", "threads")
        }
        config["engine_configs"] = {k: CONFIGS[k].__dict__ for k in args.configs}
        config["seconds"] = round(time.perf_counter() - started, 1)
        write_json(args.json, {"config": config, "summary": summary, "per_prompt": per_prompt})


if __name__ == "__main__":
    run_script(main)
