"""`hybridattn` command line: generate, chat, serve, plan, bench, eval. The parser, the commands
that need no engine (plan, and bench and eval, which run a benchmark module) and the exit status;
the options in `engine.cli.options`, the commands that answer prompts in `engine.cli.answer`.

Exit status: 0 done, 1 the plan does not fit, 2 bad input (one line on stderr,
`hybridattn: error: ...`), 70 an internal error, 130 interrupted, 141 the reader of stdout
closed it (`hybridattn plan | head`: nothing said).
HYBRIDATTN_DEBUG=1 lets errors raise with their traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

from engine.cli.answer import DEMO_TOKENS, cmd_chat, cmd_generate, cmd_serve
from engine.cli.options import (
    OneLineParser,
    _check_local_model,
    _check_model_args,
    _offload_args,
    _offload_config,
    _sampling_args,
    add_model_args,
    gib_bytes,
    output_file,
    output_folder,
    positive_int,
    write_output,
)

BENCHES = {
    "kernel": "bench.speed.kernel",
    "ann": "bench.evals.ann_recall",
    "decode": "bench.speed.decode",
    "throughput": "bench.speed.throughput",
    "host-side": "bench.speed.host_side",
    "prefix": "bench.speed.prefix",
}
EVAL = "bench.evals.accuracy"

EXIT_USAGE = 2  # as argparse exits on bad arguments
EXIT_INTERNAL = 70  # sysexits' EX_SOFTWARE: apart from plan's 1 = "does not fit"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE, what a command killed by a closed pipe reports
# What bad input raises: a bad value, a missing file or model, an optional package not installed.
USER_ERRORS = (ValueError, TypeError, OSError, ModuleNotFoundError)


def cmd_lm_eval(args) -> int:
    """lm-evaluation-harness tasks on the engine (engine.harness), offline; lm-eval's table on stdout."""
    offload = _offload_config(args)
    _check_model_args(args)
    if args.limit is not None and not 0 < args.limit < float("inf"):
        raise ValueError(f"--limit must be a positive number of documents (a share of them below 1), got {args.limit}")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise FileNotFoundError(f"--include-path is not a folder: {args.include_path}")
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    from engine import harness
    from engine.api import HybridLLM

    llm = HybridLLM.from_pretrained(args.model, offload=offload, rope_scale=args.rope_scale)
    lm = harness.HybridAttnLM(pretrained=args.model, batch_size=args.batch_size, llm=llm)
    with harness.tokenizer_folder(llm.tokenizer) as tokenizer:  # for tasks that build their data (RULER)
        metadata = {"tokenizer": tokenizer}
        if args.seq_lengths:
            metadata["max_seq_lengths"] = args.seq_lengths
        tasks = harness.task_manager(args.lm_eval, args.include_path, metadata)
        unknown = [t for t in args.lm_eval if t not in tasks.all_tasks]
        if unknown:
            raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}")
        results = lm_eval.simple_evaluate(
            model=lm, tasks=args.lm_eval, limit=args.limit, task_manager=tasks, random_seed=args.seed
        )
    print(make_table(results))
    if args.json:
        results["config"]["offload"] = dataclasses.asdict(offload)
        write_output(args.json, json.dumps(results, indent=2, default=handle_non_serializable))
    return 0


def cmd_plan(args) -> int:
    from engine.plan import full_attention_batch, largest_batch, plan_memory, trained_positions

    gpu = gib_bytes(args.gpu_gb, "--gpu-gb")
    host = None if args.host_gb is None else gib_bytes(args.host_gb, "--host-gb")
    _check_local_model(args.model)
    model = args.model
    if Path(model).is_dir():  # a model directory: its config
        model = Path(model) / "config.json"
        if not model.is_file():
            raise FileNotFoundError(f"no config.json in the model directory {args.model}")
    if Path(model).is_file():  # a config.json
        try:
            model = json.loads(Path(model).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(
                f"{args.model} is not a config.json: plan takes a model preset, a model folder, its config.json "
                "or a hub id"
            ) from None
    elif "/" in model:  # a hub id (no preset names an owner): its config
        from engine.models import hub_config

        model = hub_config(model)
    if args.device is None:  # the plan is for a GPU budget, whatever this machine has
        args.device = "cuda"
    cfg = _offload_config(args)
    import torch

    # the weights' dtype the engine loads there (HybridLLM.from_pretrained): bfloat16 on a GPU, float32 on a CPU
    weights = torch.float32 if cfg.device.startswith("cpu") else torch.bfloat16
    sizes = dict(host_budget_bytes=host, weight_dtype=weights)
    plan = plan_memory(model, args.context, cfg, gpu, batch=args.batch, **sizes)
    print(
        f"model {args.model} ({str(weights).removeprefix('torch.')}), context {args.context} tokens, batch {args.batch}"
    )
    trained = trained_positions(model)
    if trained is not None and args.context > trained:
        print(
            f"note: {args.context} tokens run past the {trained} positions the model was trained on "
            "(max_position_embeddings); its output may degrade there (generate --rope-scale stretches it by YaRN)"
        )
    print(plan.table())
    print(f"device bytes beside weights: {plan.device_beside_weights / 2**30:.3f} GiB")
    most = largest_batch(model, args.context, cfg, gpu, **sizes)
    fitted = plan_memory(model, args.context, cfg, gpu, batch=max(1, most), **sizes)
    full = full_attention_batch(model, args.context, gpu, weight_dtype=weights)
    print(
        f"largest batch that fits: {most} (device {fitted.device_total / 2**30:.2f} GiB, "
        f"host {fitted.host_total / 2**30:.2f} GiB); full attention: {full}"
    )
    return 0 if plan.fits else 1


_script_commands: list[str] = []  # the command line of the script `cmd_script` runs, for its usage line


def cmd_script(module: str, rest: list[str], command: str) -> int:
    """Run a benchmark module (installed with the package) as `python -m module rest...` would;
    its usage line names `command` (`script_command`)."""
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"benchmark module {module} is not installed")
    sys.argv = [module, *rest]
    _script_commands.append(command)
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        _script_commands.pop()
    return 0


def script_command() -> str | None:
    """The `hybridattn` command line (e.g. "hybridattn bench decode") of the script running now
    through `cmd_script`; None when none runs through it."""
    return _script_commands[-1] if _script_commands else None


def _error(message: str) -> None:
    """`message` on one line of stderr, in argparse's format."""
    one_line = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"hybridattn: error: {one_line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Runs the command; turns errors into one line on stderr and an exit status (see the module docstring)."""
    return _handled(lambda: _run(argv))


def run_script(script_main: Callable[[], int | None]) -> None:
    """A benchmark module's `__main__`: `script_main()`, exiting with its status where not 0 (None: 0). Run
    directly (`python -m bench...`), its errors are one line and an exit status, as the command line's;
    through `hybridattn bench` (`cmd_script`) they are left to the command line's `main`."""
    status = script_main() if script_command() is not None else _handled(script_main)
    if status:
        sys.exit(status)


def _handled(command: Callable[[], int | None]) -> int:
    """`command()`'s exit status (None: 0), its errors turned into one line on stderr and an exit status."""
    try:
        return command() or 0
    except KeyboardInterrupt:
        print("\nhybridattn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader has what it wanted; the output left unflushed goes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE_CLOSED
    except Exception as exc:
        if os.environ.get("HYBRIDATTN_DEBUG") == "1":
            raise
        if isinstance(exc, USER_ERRORS):
            _error(str(exc) or type(exc).__name__)
            return EXIT_USAGE
        _error(f"internal error: {type(exc).__name__}: {exc} (HYBRIDATTN_DEBUG=1 shows the traceback)")
        return EXIT_INTERNAL


def _run(argv: list[str] | None) -> int:
    from engine.models import BUNDLED_NAME

    p = OneLineParser(prog="hybridattn", description="Long-context generation with retrieval attention")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate from a long prompt")
    add_model_args(g, BUNDLED_NAME)
    source = g.add_mutually_exclusive_group()  # one prompt: a second given would be ignored
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--file", help="read the prompt from a file ('-' for stdin)")
    source.add_argument(
        "--demo", action="store_true", help=f"passkey in ~{DEMO_TOKENS} tokens, full attention vs hybrid"
    )
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    _sampling_args(g, max_new_tokens=16, seed_help="the sampling's seed (and the demo prompt's)")
    g.add_argument(
        "--ask",
        action="append",
        metavar="TEXT",
        help="a question after the prompt, which is then prefilled once for all of them (may be given again)",
    )
    g.add_argument(
        "--prefix-file",
        type=output_file,
        metavar="PATH",
        help="with --ask: the prompt's prefilled cache kept in this file: where there is no such file, prefilled "
        "and saved to it for the next run; where there is, loaded from it (a file of another prompt, model or "
        "configuration is refused, never overwritten)",
    )
    g.add_argument(
        "--json", type=output_file, help="write the timing/memory report here, with the model and configuration run"
    )
    _offload_args(g)

    c = sub.add_parser(
        "chat",
        help="a conversation on the terminal: a line of stdin per message",
        description="A conversation: each line of stdin is a message, each answer is streamed to stdout, and each "
        "turn prefills only what is new to it. Ctrl-C stops an answer, Ctrl-D ends the conversation (saved to "
        "--session, where given).",
    )
    add_model_args(c, BUNDLED_NAME)
    c.add_argument("--file", help="a document put before the first message (prefilled once for the conversation)")
    c.add_argument("--system", help="a system message that begins the conversation")
    c.add_argument(
        "--session",
        type=output_file,
        metavar="PATH",
        help="resume the conversation saved in this file, if there is one, and save it there when the chat ends "
        "(its messages and their cache: the next run prefills none of them again)",
    )
    _sampling_args(c, max_new_tokens=256)
    _offload_args(c)

    s = sub.add_parser("serve", help="serve the engine over HTTP, as OpenAI's completions and chat completions")
    add_model_args(s, BUNDLED_NAME)
    s.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="the port to listen on (0: any free one)")
    s.add_argument("--served-name", help="the model's name in requests and responses (default: --model)")
    s.add_argument("--max-tokens", type=int, default=512, help="a chat answer's max_tokens when a request gives none")
    s.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="decode up to this many requests that wait together as one batch (1: one request at a time)",
    )
    s.add_argument(
        "--join",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let requests that come while a batch runs join it between its steps (--no-join: they wait for its end)",
    )
    s.add_argument(
        "--reuse-prompts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep each request's prompt cached: a request whose prompt begins with the one before's (a "
        "conversation's next turn) prefills only the rest",
    )
    s.add_argument(
        "--prefix-dir",
        metavar="DIR",
        type=output_folder,
        help="keep the prefilled cache of each request's `document` as a file here, loaded rather than prefilled "
        "when the document comes back (after another, or after a restart)",
    )
    s.add_argument(
        "--prefix-dir-gb",
        type=float,
        default=64.0,
        help="with --prefix-dir: at most this many GiB of files, those used least recently removed first",
    )
    _offload_args(s)

    pl = sub.add_parser("plan", help="memory plan for a model, context length and GPU budget")
    pl.add_argument(
        "--model",
        default="llama-3.1-8b",
        help="model preset name, model directory, config.json path or hub id (owner/name)",
    )
    pl.add_argument("--context", type=int, default=131072)
    pl.add_argument("--gpu-gb", type=float, default=24.0, help="GPU budget in GiB")
    pl.add_argument("--host-gb", type=float, help="host memory budget in GiB (default: none)")
    pl.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    _offload_args(pl)

    # bench and eval pass their other options, -h included, to the script they run
    b = sub.add_parser("bench", help="run a benchmark script: " + ", ".join(BENCHES), add_help=False)
    b.add_argument("-h", "--help", action="store_true", help="show this help, or after NAME the benchmark's options")
    b.add_argument("name", nargs="?", choices=list(BENCHES), help="the benchmark to run")
    e = sub.add_parser(
        "eval",
        help="the accuracy evaluation (bench.evals.accuracy; its options follow), or with --lm-eval "
        "lm-evaluation-harness tasks on the engine (the eval extra)",
        add_help=False,
    )
    e.add_argument("-h", "--help", action="store_true", help="show this help and the accuracy evaluation's options")
    e.add_argument(
        "--lm-eval", nargs="+", metavar="TASK", help="lm-eval tasks to run (hybridattn eval --lm-eval TASK -h)"
    )

    args, rest = p.parse_known_args(argv)
    if args.command in ("bench", "eval") and args.help:
        rest.append("-h")
    if args.command == "eval" and args.lm_eval:
        return cmd_lm_eval(_lm_eval_parser(BUNDLED_NAME).parse_args(rest, namespace=args))
    if args.command == "bench" and args.name is None:
        if not args.help:
            b.error("name the benchmark to run")
        b.print_help()
        return 0
    if args.command == "eval" and args.help:
        e.print_help()
        print()
    if args.command in ("bench", "eval"):
        if args.command == "bench":
            return cmd_script(BENCHES[args.name], rest, f"hybridattn bench {args.name}")
        return cmd_script(EVAL, rest, "hybridattn eval")
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    commands = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "plan": cmd_plan}
    return commands[args.command](args)


def _lm_eval_parser(default_model: str) -> argparse.ArgumentParser:
    p = OneLineParser(prog="hybridattn eval --lm-eval TASK [TASK ...]")
    add_model_args(p, default_model)
    p.add_argument("--seq-lengths", type=positive_int, nargs="+", help="RULER's context lengths (its max_seq_lengths)")
    p.add_argument("--limit", type=float, help="documents per task (a fraction of them when below 1)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="sequences decoded together")
    p.add_argument("--include-path", help="a folder of task YAML files of your own")
    p.add_argument("--seed", type=int, default=0, help="lm-eval's random seed")
    p.add_argument("--json", type=output_file, help="write lm-eval's results here")
    _offload_args(p)
    return p
