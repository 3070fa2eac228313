"""`hybridattn` command line: generate, chat, serve, plan, bench, eval.

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
import math
import os
import runpy
import sys
import time
from contextlib import contextmanager
from pathlib import Path

BENCHES = {
    "kernel": "bench.speed.kernel",
    "ann": "bench.evals.ann_recall",
    "decode": "bench.speed.decode",
    "throughput": "bench.speed.throughput",
    "host-side": "bench.speed.host_side",
    "prefix": "bench.speed.prefix",
}
EVAL = "bench.evals.accuracy"
DEMO_TOKENS = 4096

EXIT_USAGE = 2  # as argparse exits on bad arguments
EXIT_INTERNAL = 70  # sysexits' EX_SOFTWARE: apart from plan's 1 = "does not fit"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE, what a command killed by a closed pipe reports
# What bad input raises: a bad value, a missing file or model, an optional package not installed.
USER_ERRORS = (ValueError, TypeError, OSError, ModuleNotFoundError)


# Flags that name a field otherwise than `--field-name`, kept from earlier versions.
FLAG_ALIASES = {"n_sink": ("--sinks",)}


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _json_object(text: str) -> dict:
    """A JSON object given on the command line (keyword arguments of the key index)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({exc})") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _offload_args(p: argparse.ArgumentParser) -> None:
    """One option per OffloadConfig field, with the field's description, grouped by section."""
    from engine.config import KEY_INDEXES, OLD_CANDIDATE_SOURCES, PRESETS, SECTIONS, OffloadConfig

    p.add_argument(
        "--preset", default="default", choices=list(PRESETS), help="named offload configuration the options override"
    )
    groups = {name: p.add_argument_group(f"offload: {title}") for name, title in SECTIONS.items()}
    for item in OffloadConfig.described():
        flags = [_flag(item.name), *FLAG_ALIASES.get(item.name, ())]
        text = item.help.replace("%", "%%")  # argparse formats help with %
        if item.type is bool:
            groups[item.section].add_argument(*flags, dest=item.name, action=argparse.BooleanOptionalAction, help=text)
            continue
        kind = _json_object if item.type is dict else item.type
        groups[item.section].add_argument(*flags, dest=item.name, type=kind, choices=item.choices, help=text)
    old = p.add_argument_group("offload: deprecated spellings")
    old.add_argument("--mode", choices=list(OLD_CANDIDATE_SOURCES), help="use --candidates-from (keys, blocks, both)")
    old.add_argument("--method", choices=KEY_INDEXES, help="use --key-index")


def _sampling_args(p: argparse.ArgumentParser, *, max_new_tokens: int, seed_help: str = "the sampling's seed") -> None:
    """How an answer is decoded: its length, greedy or sampled, and where it stops."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above it, sampled")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    # (--top-k is the fixed budget's, an offload field)
    p.add_argument("--sample-top-k", type=int, default=0, help="sample among this many most likely tokens (0: all)")
    p.add_argument(
        "--sample-top-p", type=float, default=1.0, help="sample among the fewest whose probabilities reach this"
    )
    p.add_argument(
        "--stop", action="append", metavar="TEXT", help="end the answer before this text (may be given again)"
    )


def _sampling(args) -> dict:
    """The --max-new-tokens/--temperature/... options checked (before the model loads), as generate's keywords."""
    from engine.api import check_sampling
    from engine.stop import StopStrings

    check_sampling(args.max_new_tokens, args.temperature, args.seed, args.sample_top_k, args.sample_top_p)
    StopStrings(None, args.stop)
    sampling = dict(temperature=args.temperature, top_k=args.sample_top_k, top_p=args.sample_top_p)
    return sampling | dict(seed=args.seed, stop=args.stop)


def _offload_config(args):
    """The preset with the options given on the command line (the deprecated ones with a warning)."""
    from engine.config import RENAMED_FIELDS, OffloadConfig, new_spelling

    given = {item.name: getattr(args, item.name) for item in OffloadConfig.described()}
    given = {name: value for name, value in given.items() if value is not None}
    for old in RENAMED_FIELDS:
        if getattr(args, old) is not None:
            new, value = new_spelling(old, getattr(args, old))
            print(f"hybridattn: warning: {_flag(old)} is deprecated: use {_flag(new)} {value}", file=sys.stderr)
            given[old] = getattr(args, old)  # the configuration warns too, and refuses both spellings
    return OffloadConfig.preset(args.preset, **given)


def _check_local_model(model: str) -> None:
    """A model given as a path must exist. Hub ids never start with '.' or '/', so this
    rejects a mistyped path before the slow imports instead of asking the hub for it."""
    if (model.startswith((".", "/")) or model.endswith((".gguf", ".json"))) and not Path(model).exists():
        raise FileNotFoundError(f"model not found: {model}")


def _check_model_args(args) -> None:
    """--model and --rope-scale, before the model loads."""
    from engine.models import check_rope_scale

    _check_local_model(args.model)
    if args.rope_scale is not None:
        check_rope_scale(args.rope_scale)


def add_model_args(p: argparse.ArgumentParser, default_model: str, *, rope_scale: bool = True) -> None:
    """--model NAME and, with `rope_scale`, --rope-scale FACTOR (engine.models.stretched)."""
    p.add_argument(
        "--model", default=default_model, help="bundled name, local model directory, .gguf file or hub id (owner/name)"
    )
    if rope_scale:
        p.add_argument(
            "--rope-scale",
            type=float,
            help="stretch the model's RoPE by YaRN to this many times its trained context (e.g. 2: the bundled "
            "model's 8K to 16K)",
        )


def _text(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{source} is not UTF-8 text ({error.reason} at byte {error.start})") from None


def _read_prompt(args) -> str:
    """The prompt from --prompt, --file or stdin; not empty."""
    if args.prompt is not None:
        prompt = args.prompt
    elif args.file == "-" or (args.file is None and not sys.stdin.isatty()):
        prompt = _text(sys.stdin.buffer.read(), "stdin")
    elif args.file is not None:
        prompt = _text(Path(args.file).read_bytes(), f"--file {args.file}")
    else:
        raise ValueError("give a prompt: --prompt TEXT, --file PATH, stdin, or --demo")
    if not prompt:
        raise ValueError("the prompt is empty")
    return prompt


def output_file(text: str) -> Path:
    """argparse type of a file a command writes (--json, --plot): its folder is made at once, so that a
    path that cannot be written fails before the work whose results it is to hold, not after."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"is a folder, not a file: {text}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise argparse.ArgumentTypeError(f"a file stands where its folder would be: {text}") from None
    except OSError as error:
        raise argparse.ArgumentTypeError(f"its folder cannot be made: {error}") from None
    return path


def cmd_generate(args) -> int:
    # Everything the user typed is checked before the model loads (seconds to minutes).
    offload = _offload_config(args)
    _check_model_args(args)
    prompt = None if args.demo else _read_prompt(args)
    sampling = _sampling(args)
    _check_questions(args)
    from engine.api import HybridLLM

    bars = _bars()
    llm = HybridLLM.from_pretrained(args.model, offload=offload, rope_scale=args.rope_scale)
    sampling.update(progress=bars)
    if args.demo:
        _print_report(_demo(llm, args), args, offload)
    elif args.ask:
        _answer_questions(llm, prompt, args, offload, sampling)
    else:
        prompt = [{"role": "user", "content": prompt}] if args.chat else prompt
        _print_report(_streamed(llm, prompt, args, sampling), args, offload)
    return 0


def _bars() -> bool:
    """Whether progress bars are shown: on a terminal only (a log file gets the report's lines, not the
    bars' carriage returns); transformers' weight-loading bar is turned off elsewhere."""
    if sys.stderr.isatty():
        return True
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    return False


def _streamed(llm, prompt, args, sampling, prefix=None):
    """The answer streamed to stdout, a line of its own; returns its report."""
    from engine.api import GenerationReport

    report = GenerationReport()
    for piece in llm.stream(prompt, args.max_new_tokens, report=report, prefix=prefix, **sampling):
        print(piece, end="", flush=True)
    print()
    return report


def _check_questions(args) -> None:
    if not args.ask:
        return
    if args.demo or args.chat:
        raise ValueError(f"--ask continues the prompt as text: it does not go with --{'demo' if args.demo else 'chat'}")
    if not all(args.ask):
        raise ValueError("--ask: a question is empty")


def _answer_questions(llm, document: str, args, offload, sampling) -> None:
    """The document prefilled once; each question after it answered in turn, an answer a line of
    stdout and its report on stderr (with --json, all of them, after the prefix's)."""
    prefix = llm.prefix(document, progress=sampling["progress"])
    try:
        device, host = (prefix.nbytes()[where]["prefix_copies"] / 2**20 for where in ("device", "host"))
        print(
            f"prefix {prefix.tokens} tokens: prefill {prefix.prefill_s:.2f} s, host index build "
            f"{prefix.index_build_s:.2f} s after it; copies to go back to it: device {device:.1f} MiB, "
            f"host {host:.1f} MiB",
            file=sys.stderr,
        )
        reports = []
        for question in args.ask:
            reports.append(_streamed(llm, question, args, sampling, prefix))
            print(reports[-1].summary(), file=sys.stderr)
    finally:
        prefix.release()
    if args.json:
        done = dict(tokens=prefix.tokens, prefill_s=prefix.prefill_s, index_build_s=prefix.index_build_s)
        answers = [dict(question=q, **r.as_dict()) for q, r in zip(args.ask, reports)]
        _write_json(args, offload, {"prefix": done, "answers": answers})


def cmd_chat(args) -> int:
    """A conversation on the terminal (engine.conversation): each line of stdin a message, each answer
    streamed to stdout; each turn prefills only what is new, so a --file document is prefilled once."""
    offload = _offload_config(args)
    _check_model_args(args)
    sampling = _sampling(args)
    document = _text(Path(args.file).read_bytes(), f"--file {args.file}") if args.file else None
    from engine.api import GenerationReport, HybridLLM

    _bars()
    llm = HybridLLM.from_pretrained(args.model, offload=offload, rope_scale=args.rope_scale)
    chat = llm.conversation([{"role": "system", "content": args.system}] if args.system else None)
    try:
        for message in _typed_lines():
            if document is not None:  # the document goes before the first message
                message, document = f"{document}\n\n{message}", None
            report, start, first = GenerationReport(), time.perf_counter(), None
            try:
                for piece in chat.stream(message, args.max_new_tokens, report=report, progress=False, **sampling):
                    first = first or time.perf_counter()
                    print(piece, end="", flush=True)
            except KeyboardInterrupt:  # Ctrl-C stops the answer, not the chat (Ctrl-D ends it)
                print(flush=True)
                print("[stopped: the conversation keeps what was shown]", file=sys.stderr, flush=True)
                continue
            print()
            waited = (first or time.perf_counter()) - start
            print(
                f"[prompt {report.prompt_tokens} tokens, {chat.found_kept} of them kept from the turns before; "
                f"first text after {waited:.2f} s; {report.new_tokens} tokens at {report.decode_tokens_per_s:.1f} "
                f"tok/s; host KV read per step {100 * report.kv_read_frac:.2f}%]",
                file=sys.stderr,
                flush=True,
            )
    finally:
        chat.close()
    return 0


def _typed_lines():
    """The non-empty lines of stdin, each after a prompt on stderr where stdin is a terminal."""
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def cmd_serve(args) -> int:
    """The engine behind OpenAI-shaped HTTP endpoints (engine.server) until interrupted."""
    offload = _offload_config(args)
    _check_model_args(args)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must lie in [0, 65535], got {args.port}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    from engine.api import HybridLLM
    from engine.server import Server

    _bars()
    llm = HybridLLM.from_pretrained(args.model, offload=offload, rope_scale=args.rope_scale)
    server = Server(
        llm,
        host=args.host,
        port=args.port,
        model=args.served_name or args.model,
        chat_max_tokens=args.max_tokens,
        reuse_prompts=args.reuse_prompts,
    )
    logging.getLogger("engine.server").setLevel(logging.INFO)  # a line per request and per answer
    print(f"hybridattn: serving {server.completions.model} at {server.url} (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


def cmd_lm_eval(args) -> int:
    """lm-evaluation-harness tasks on the engine (engine.harness), offline; lm-eval's table on stdout."""
    offload = _offload_config(args)
    _check_model_args(args)
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise FileNotFoundError(f"--include-path is not a folder: {args.include_path}")
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    from engine import harness
    from engine.api import HybridLLM

    metadata = {"tokenizer": harness.tokenizer_source(args.model)}  # for tasks that build their data (RULER)
    if args.seq_lengths:
        metadata["max_seq_lengths"] = args.seq_lengths
    tasks = harness.task_manager(args.lm_eval, args.include_path, metadata)
    unknown = [t for t in args.lm_eval if t not in tasks.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    llm = HybridLLM.from_pretrained(args.model, offload=offload, rope_scale=args.rope_scale)
    lm = harness.HybridAttnLM(pretrained=args.model, batch_size=args.batch_size, llm=llm)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=args.lm_eval, limit=args.limit, task_manager=tasks, random_seed=args.seed
    )
    print(make_table(results))
    if args.json:
        results["config"]["offload"] = dataclasses.asdict(offload)
        Path(args.json).write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    return 0


def _demo(llm, args):
    """A passkey hidden in ~4K tokens of filler: full attention and the hybrid engine answer the same prompt.
    No progress bars: each answer's line is begun before its run and ended by the answer, so that
    the lines stay whole in a terminal and through a pipe (the report, returned, gives the phases' times)."""
    from bench.evals.tasks import make_sample, score

    sample = make_sample("passkey", DEMO_TOKENS, llm.tokenizer, seed=args.seed, depth=0.4)
    print(
        f"demo: a pass key hidden at depth {sample.depth:.0%} of a {sample.n_tokens}-token prompt; "
        f"expected answer {sample.answers[0]}",
        flush=True,
    )
    with _line("full attention : "):
        full = llm.generate_full_attention(sample.prompt, args.max_new_tokens)
        print(f"{full.strip()!r} -> {'correct' if score(sample, full) == 1 else 'wrong'}", end="")
    with _line("hybridattn     : "):
        result = llm.generate(sample.prompt, args.max_new_tokens, progress=False)
        print(f"{result.text.strip()!r} -> {'correct' if score(sample, result.text) == 1 else 'wrong'}", end="")
    return result.report


@contextmanager
def _line(label: str):
    """A line of stdout begun with `label` now and ended on leaving, also on an error (whose
    message then starts a line of its own)."""
    print(label, end="", flush=True)
    try:
        yield
    finally:
        print(flush=True)


def _print_report(report, args, offload) -> None:
    """The report on stderr; with --json, written there with what was run, so that a run can be repeated."""
    print(report.summary(), file=sys.stderr)
    if args.json:
        _write_json(args, offload, report.as_dict())


def _write_json(args, offload, fields: dict) -> None:
    """`fields` and what was run (model, generation arguments, configuration) to the --json file."""
    from importlib.metadata import version

    run = dict(model=args.model, rope_scale=args.rope_scale, max_new_tokens=args.max_new_tokens)
    run.update(temperature=args.temperature, sample_top_k=args.sample_top_k, sample_top_p=args.sample_top_p)
    run.update(seed=args.seed, stop=args.stop or [], demo_seed=args.seed if args.demo else None)
    run.update(offload=dataclasses.asdict(offload), hybridattn=version("hybridattn"))
    Path(args.json).write_text(json.dumps({**fields, "run": run}, indent=1))


def cmd_plan(args) -> int:
    from engine.plan import full_attention_batch, largest_batch, plan_memory, trained_positions

    if not (math.isfinite(args.gpu_gb) and args.gpu_gb > 0):
        raise ValueError(f"--gpu-gb must be a positive number of GiB, got {args.gpu_gb}")
    if args.host_gb is not None and not (math.isfinite(args.host_gb) and args.host_gb > 0):
        raise ValueError(f"--host-gb must be a positive number of GiB, got {args.host_gb}")
    _check_local_model(args.model)
    model = args.model
    if Path(model).is_dir():  # a model directory: its config
        model = Path(model) / "config.json"
        if not model.is_file():
            raise FileNotFoundError(f"no config.json in the model directory {args.model}")
    if Path(model).is_file():  # a config.json
        model = json.loads(Path(model).read_text())
    elif "/" in model:  # a hub id (no preset names an owner): its config
        from engine.models import hub_config

        model = hub_config(model)
    if args.device is None:  # the plan is for a GPU budget, whatever this machine has
        args.device = "cuda"
    gpu, host = int(args.gpu_gb * 2**30), None if args.host_gb is None else int(args.host_gb * 2**30)
    cfg = _offload_config(args)
    plan = plan_memory(model, args.context, cfg, gpu, batch=args.batch, host_budget_bytes=host)
    print(f"model {args.model}, context {args.context} tokens, batch {args.batch}")
    trained = trained_positions(model)
    if trained is not None and args.context > trained:
        print(
            f"note: {args.context} tokens run past the {trained} positions the model was trained on "
            "(max_position_embeddings); its output may degrade there (generate --rope-scale stretches it by YaRN)"
        )
    print(plan.table())
    print(f"device bytes beside weights: {plan.device_beside_weights / 2**30:.3f} GiB")
    most = largest_batch(model, args.context, cfg, gpu, host_budget_bytes=host)
    fitted = plan_memory(model, args.context, cfg, gpu, batch=max(1, most), host_budget_bytes=host)
    print(
        f"largest batch that fits: {most} (device {fitted.device_total / 2**30:.2f} GiB, "
        f"host {fitted.host_total / 2**30:.2f} GiB); full attention: {full_attention_batch(model, args.context, gpu)}"
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
    try:
        return _run(argv)
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

    p = argparse.ArgumentParser(prog="hybridattn", description="Long-context generation with retrieval attention")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate from a long prompt")
    add_model_args(g, BUNDLED_NAME)
    g.add_argument("--prompt", help="the prompt text")
    g.add_argument("--file", help="read the prompt from a file ('-' for stdin)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    g.add_argument("--demo", action="store_true", help=f"passkey in ~{DEMO_TOKENS} tokens, full attention vs hybrid")
    _sampling_args(g, max_new_tokens=16, seed_help="the sampling's seed (and the demo prompt's)")
    g.add_argument(
        "--ask",
        action="append",
        metavar="TEXT",
        help="a question after the prompt, which is then prefilled once for all of them (may be given again)",
    )
    g.add_argument(
        "--json", type=output_file, help="write the timing/memory report here, with the model and configuration run"
    )
    _offload_args(g)

    c = sub.add_parser(
        "chat",
        help="a conversation on the terminal: a line of stdin per message",
        description="A conversation: each line of stdin is a message, each answer is streamed to stdout, and each "
        "turn prefills only what is new to it. Ctrl-C stops an answer, Ctrl-D ends the conversation.",
    )
    add_model_args(c, BUNDLED_NAME)
    c.add_argument("--file", help="a document put before the first message (prefilled once for the conversation)")
    c.add_argument("--system", help="a system message that begins the conversation")
    _sampling_args(c, max_new_tokens=256)
    _offload_args(c)

    s = sub.add_parser("serve", help="serve the engine over HTTP, as OpenAI's completions and chat completions")
    add_model_args(s, BUNDLED_NAME)
    s.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="the port to listen on (0: any free one)")
    s.add_argument("--served-name", help="the model's name in requests and responses (default: --model)")
    s.add_argument("--max-tokens", type=int, default=512, help="a chat answer's max_tokens when a request gives none")
    s.add_argument(
        "--reuse-prompts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep each request's prompt cached: a request whose prompt begins with the one before's (a "
        "conversation's next turn) prefills only the rest",
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
    e.add_argument("--lm-eval", nargs="+", metavar="TASK", help="lm-eval tasks to run (hybridattn eval --lm-eval -h)")

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
    p = argparse.ArgumentParser(prog="hybridattn eval --lm-eval TASK [TASK ...]")
    add_model_args(p, default_model)
    p.add_argument("--seq-lengths", type=int, nargs="+", help="RULER's context lengths (its max_seq_lengths)")
    p.add_argument("--limit", type=float, help="documents per task (a fraction of them when below 1)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences decoded together")
    p.add_argument("--include-path", help="a folder of task YAML files of your own")
    p.add_argument("--seed", type=int, default=0, help="lm-eval's random seed")
    p.add_argument("--json", type=output_file, help="write lm-eval's results here")
    _offload_args(p)
    return p


if __name__ == "__main__":
    sys.exit(main())
