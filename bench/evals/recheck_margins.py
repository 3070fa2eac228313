"""What a re-check margin costs and what it catches (engine.decode.recheck, `recheck_margin`).

Each prompt is prefilled once. Full attention answers greedily: `--new` tokens after a
segment of prose (as in bench.evals.generation), or a task's answer up to its end (as in
bench.evals.accuracy). The engine's default without re-checks is then fed full attention's
tokens (teacher forcing) and records, at every step, the gap between its two highest
logits and whether its pick differs from full attention's. A margin m re-checks the steps
whose gap lies below m; per margin the table gives the share of steps re-checked, the
differing picks among them (a differing pick outside the margin is one no re-check
fixes) and the host KV read per step that implies: the selection's share plus one read
of every host token per re-check. The first row re-checks the differing steps alone:
what a perfect trigger would read. Steps are pooled over prompts.

Fed full attention's tokens, every step counts, not only a free-running text's first
difference; without re-checks each step's context carries the approximate K/V of the
steps before it, as between two re-checks of a free-running text.

With `--widen F` each step whose gap lies under `--first-margin` (0.5, the default's
margin) first runs again F times wider (OffloadConfig.recheck_widen) and never exactly; the
margins then apply to the wider runs' gaps (`recheck_wide_margin`), which only those steps
have, and the reads include the wider runs.

    python -m bench.evals.recheck_margins [--quick] [--json PATH] [--source prose|TASK] [--context T]
                                          [--prompts N] [--new K] [--offset N] [--margins ...]
                                          [--widen F] [--first-margin M]
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from bench.common import options
from bench.common.output import write_json
from bench.common.text import segments
from bench.evals.probes import CONFIGS, copy_state, greedy, prefill_and_answer
from bench.evals.tasks import MAX_NEW, TASKS, cell_sample
from bench.tables import margin_rows, margins
from engine.cli import run_script
from engine.config import OffloadConfig
from engine.generation import eos_ids
from engine.models import load_model

SOURCE, ENGINE = CONFIGS["default"], CONFIGS["default-norecheck"]
MARGINS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0]


def wider_engine(widen: float, first_margin: float) -> OffloadConfig:
    """The engine that runs every step whose gap lies under `first_margin` again `widen` times
    wider, and never exactly: the margins then apply to the wider runs' gaps."""
    return CONFIGS["default"].replace(
        recheck_margin=first_margin, recheck_widen=widen, recheck_wide_margin=0.0, recheck_share=1.0
    )


@torch.inference_mode()
def forced_steps(model, ids: torch.Tensor, new: int, eos: set[int], chunk: int, engine: OffloadConfig) -> dict:
    """One prompt: per decode step the engine's top-two gap and whether its pick differs
    from full attention's, and the mean share of host tokens its selection read; with wider
    runs, which steps ran wider and the mean share read with them."""
    source, logits, full = prefill_and_answer(model, ids, SOURCE, chunk, new, eos)
    steps = []
    picks = greedy(model, copy_state(source, model, engine), logits, len(full), set(), record=steps, forced=full)
    # the logits of step j - 1 pick token j (token 0 comes from the prefill, exact)
    out = {
        "gaps": [round(s["gap"], 4) for s in steps],
        "differs": [picks[j] != full[j] for j in range(1, len(full))],
        "selected_frac": statistics.mean(s["selected_frac"] for s in steps) if steps else 0.0,
    }
    if engine.recheck_margin and engine.recheck_widen > 1:
        out["widened"] = [bool(s["widened"]) for s in steps]
        out["read_frac"] = statistics.mean(s["kv_read_frac"] for s in steps) if steps else 0.0
    return out


def main(argv=None):
    p = options.parser(__doc__, __spec__)
    options.add_output_args(p, quick="2 short prompts, 16 tokens")
    p.add_argument("--source", default="prose", choices=["prose", *TASKS], help="prose segments or a task's prompts")
    p.add_argument("--context", type=options.positive_int, help="prompt tokens; default 4096 (--quick: 512)")
    p.add_argument("--prompts", type=options.positive_int, help="default 20 (--quick: 2)")
    p.add_argument(
        "--new",
        type=options.positive_int,
        help="prose: tokens generated, default 256 (--quick: 16); a task: its answer length",
    )
    p.add_argument(
        "--offset",
        type=options.non_negative_int,
        default=600_000,
        help="prose: text tokens skipped before the first prompt",
    )
    p.add_argument("--margins", type=float, nargs="+", default=MARGINS)
    p.add_argument(
        "--widen",
        type=float,
        default=1.0,
        help="run each step whose gap lies under --first-margin again this many times wider "
        "(OffloadConfig.recheck_widen); the margins then apply to the wider runs' gaps (default 1: none)",
    )
    p.add_argument("--first-margin", type=float, default=0.5, help="with --widen: the gap that runs a step wider")
    options.add_model_args(p, rope_scale=True)
    options.add_threads_arg(p)
    args = p.parse_args(argv)
    options.quick_defaults(args, context=(512, 4096), prompts=(2, 20), new=(16, 256))
    if any(m <= 0 for m in args.margins):
        p.error(f"--margins must be > 0, got {args.margins}")
    if not 1 <= args.widen < float("inf") or args.first_margin <= 0:
        p.error(f"--widen must be a finite number >= 1 and --first-margin > 0, got {args.widen}, {args.first_margin}")
    engine = ENGINE if args.widen == 1 else wider_engine(args.widen, args.first_margin)
    options.pin_threads(args.threads)

    model, tok = load_model(args.model, attn_implementation="hybrid", rope_scale=args.rope_scale)
    if args.source == "prose":
        prompts = [(ids, args.new, set()) for ids in segments(tok, args.prompts, args.context, args.offset)]
    else:  # the prompts of bench.evals.accuracy's cell (seeds 0.., depths spread alike)
        samples = [cell_sample(args.source, args.context, tok, i, args.prompts) for i in range(args.prompts)]
        eos = eos_ids(model)
        prompts = [(tok(s.prompt, return_tensors="pt").input_ids, MAX_NEW[args.source], eos) for s in samples]
    started = time.perf_counter()
    per_prompt = [
        forced_steps(model, ids, new, stop, args.chunk, engine) for ids, new, stop in tqdm(prompts, desc="prompts")
    ]
    keys = ("source", "context", "prompts", "new", "offset", "model", "widen", "first_margin")
    result = {"config": {k: getattr(args, k) for k in keys}}
    result["config"]["threads"] = args.threads
    result["margins"], result["per_prompt"] = margin_rows(per_prompt, sorted(args.margins)), per_prompt
    print(margins(result))
    if args.json:
        result["config"]["seconds"] = round(time.perf_counter() - started, 1)
        write_json(args.json, result)


if __name__ == "__main__":
    run_script(main)
