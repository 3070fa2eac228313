"""RULER through lm-evaluation-harness: full attention (lm-eval's own `hf` model, sdpa, on the same
weights) beside the engine's configurations, on the same samples; per task and length the mean
score with its 95% interval and, for the engine, the mean read share per decode step (re-checks
included) and the share of steps re-checked.

The tasks' data are built once (with the model's tokenizer, from `--seed`) and every method
answers the same documents; the same seed builds the same documents in every run. Offline RULER
tasks: niah_single_1, niah_multikey_2, niah_multikey_3, ruler_vt (from 1024 tokens), ruler_cwe,
ruler_fwe.

The engine's configurations and, with `--peers`, published selection rules (bench.evals.peers:
StreamingLLM, SnapKV-style, Quest) answer from one exact prefill per document
(bench.evals.shared_lm), each peer reading per step the share of host tokens the configuration
`--peers-at` (default: the first of `--configs`) read on that document, rows "peer@config".

With `--resume FILE`, every answer is kept in FILE as it comes (bench.evals.answer_log), and the
same command run again after an interruption takes the answers there and asks only the rest.

    python -m bench.evals.ruler --tasks niah_single_1 ruler_vt --seq-lengths 4096 8192 --limit 50 \\
        --configs default default-norecheck --peers streaming snapkv quest --json bench/out/ruler.json
"""

from __future__ import annotations

import json
import random
import time

import numpy as np

from bench.common import options
from bench.common.output import write_json
from bench.evals.peers import PEERS
from bench.stats import mean_interval, wilson_interval
from engine.cli import run_script


def plain_greedy(model) -> None:
    """The model's generation config reduced to its special tokens: lm-eval's `hf` model decodes through
    transformers' `generate`, which would apply the rest (a repetition penalty, say) where the engine's own
    greedy decoding does not, and the full-attention answers would follow other rules than the engine's."""
    from transformers import GenerationConfig

    own = model.generation_config
    kept = ("bos_token_id", "eos_token_id", "pad_token_id")
    model.generation_config = GenerationConfig(**{name: getattr(own, name) for name in kept})


OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
ENGINE_CONFIGS = ("default", "default-norecheck", "tight", "fixed", "exact")


def cells(samples: dict, reports: dict | None) -> list[dict]:
    """Per task and metric (RULER: one per length), from lm-eval's logged samples: n, the mean
    score [95% interval: t, or Wilson's for scores all 0 or 1] and each document's score (in
    document order); with the engine's reports, its mean read share per step and the share of
    steps re-checked."""
    rows = []
    for task, docs in samples.items():
        by_metric: dict[str, list[tuple[int, float]]] = {}
        for doc in docs:
            for metric in doc["metrics"]:
                score = doc[metric]
                if isinstance(score, (int, float)) and score >= 0:  # RULER marks lengths not run with -1
                    by_metric.setdefault(metric, []).append((doc["doc_id"], float(score)))
        for metric, scored in by_metric.items():
            scores = [s for _, s in scored]
            mean, low, high = mean_interval(scores)
            if set(scores) <= {0.0, 1.0}:  # right or wrong: Wilson's interval (sensible at 0% and 100%)
                low, high = wilson_interval(mean, len(scores))
            row = {"task": task, "metric": metric, "n": len(scored), "score": mean, "low": low, "high": high}
            row["scores"] = [s for _, s in sorted(scored)]  # per document, in id order: methods compared pairwise
            found = [reports[task, d] for d, _ in scored if reports is not None and (task, d) in reports]
            if found:
                row["read_frac"] = sum(r.kv_read_frac for r in found) / len(found)
                steps = sum(r.decode_steps for r in found)
                row["rechecked_frac"] = sum(r.rechecked_steps for r in found) / steps if steps else 0.0
            rows.append(row)
    return rows


def build_tasks(tasks: list[str], seq_lengths: list[int], tokenizer: str, seed: int, include_path=None) -> dict:
    """lm-eval's tasks, RULER's documents built at `seq_lengths` with `tokenizer`: the same
    documents for the same seed (its generators draw from the global random and numpy states)."""
    from engine.harness import task_manager

    random.seed(seed)
    np.random.seed(seed)
    metadata = {"tokenizer": tokenizer, "max_seq_lengths": seq_lengths}
    return task_manager(tasks, include_path, metadata).load(tasks)


def table(rows: list[dict]) -> str:
    lines = ["| task | metric | method | n | score [95%] | read per step | steps re-checked |", "|---" * 7 + "|"]
    for r in rows:
        read = f"{100 * r['read_frac']:.2f}%" if "read_frac" in r else ""
        again = f"{100 * r['rechecked_frac']:.1f}%" if "rechecked_frac" in r else ""
        score = f"{r['score']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"
        lines.append(f"| {r['task']} | {r['metric']} | {r['method']} | {r['n']} | {score} | {read} | {again} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = options.parser(__doc__, __spec__)
    options.add_output_args(p, quick="one task, 2 documents at 1024 tokens")
    p.add_argument("--model", default="smollm2-135m", help="bundled name or local model directory")
    p.add_argument("--tasks", nargs="+", help=f"lm-eval tasks (default: {' '.join(OFFLINE_TASKS)})")
    p.add_argument("--seq-lengths", type=options.positive_int, nargs="+", help="RULER lengths, default 4096 8192")
    p.add_argument("--limit", type=options.positive_int, help="documents per task, default 50 (--quick: 2)")
    p.add_argument("--configs", nargs="+", choices=ENGINE_CONFIGS, default=["default", "default-norecheck"])
    p.add_argument("--no-full", action="store_true", help="skip full attention")
    p.add_argument("--peers", nargs="*", choices=list(PEERS), default=[], help="published selection rules beside")
    p.add_argument("--peers-at", help="the configuration whose read share the peers get (default: the first)")
    p.add_argument("--include-path", help="a folder of task YAML files of your own")
    p.add_argument("--seed", type=int, default=0, help="seed of the documents' random haystacks, needles and values")
    p.add_argument("--resume", metavar="FILE", help="keep answers in FILE as they come; a rerun takes those there")
    options.add_threads_arg(p)
    args = p.parse_args(argv)
    options.quick_defaults(
        args, tasks=(["niah_single_1"], list(OFFLINE_TASKS)), seq_lengths=([1024], [4096, 8192]), limit=(2, 50)
    )
    peers_at = args.peers_at or args.configs[0]
    if args.peers and peers_at not in args.configs:
        p.error(f"--peers-at {peers_at} is not among --configs ({', '.join(args.configs)}): its read shares are needed")
    options.pin_threads(args.threads)

    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from bench.evals.answer_log import AnswerLog, LoggedLM
    from bench.evals.shared_lm import SharedPrefillLM
    from engine.harness import tokenizer_source
    from engine.models import load_model

    task_dict = build_tasks(args.tasks, args.seq_lengths, tokenizer_source(args.model), args.seed, args.include_path)
    log = None
    if args.resume:
        run = {k: getattr(args, k) for k in ("model", "configs", "peers", "seed")} | {"peers_at": peers_at}
        try:
            log = AnswerLog(args.resume, run)
        except ValueError as e:
            p.error(str(e))
    model, tokenizer = load_model(args.model, attn_implementation="hybrid")
    shared = SharedPrefillLM(model, tokenizer, args.configs, args.peers, peers_at, log, pretrained=args.model)
    methods = ([] if args.no_full else ["full"]) + shared.methods
    rows, started = [], time.perf_counter()
    for method in methods:  # the first engine method decodes every method; the others replay their answers
        if method == "full":
            plain_greedy(model)
            model.set_attn_implementation("sdpa")
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
            lm = LoggedLM(lm, log, "full") if log else lm
        else:
            model.set_attn_implementation("hybrid")
            shared.answer_as(method)
            lm = shared
        out = evaluate(lm=lm, task_dict=task_dict, limit=args.limit, log_samples=True, verbosity="WARNING")
        for row in cells(out["samples"], getattr(lm, "reports", None)):
            rows.append({"method": method, **row})
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        names = ("model", "tasks", "seq_lengths", "limit", "configs", "peers", "threads", "seed", "resume")
        config = {k: getattr(args, k) for k in names} | {"peers_at": peers_at if args.peers else None}
        write_json(args.json, {"config": config, "rows": rows, "seconds": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    run_script(main)
