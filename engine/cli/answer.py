"""The commands that answer prompts with a loaded engine: `generate` (a prompt, questions after a
document, the demo), `chat` (a conversation on the terminal) and `serve` (HTTP, engine.server)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from engine.cli.options import (
    _bars,
    _check_model_args,
    _offload_config,
    _read_prompt,
    _sampling,
    _text,
    gib_bytes,
    stdin_open,
    write_output,
)

DEMO_TOKENS = 4096


def cmd_generate(args) -> int:
    # Everything the user typed is checked before the model loads (seconds to minutes).
    offload = _offload_config(args)
    _check_model_args(args)
    if args.demo and args.chat:
        raise ValueError("--demo builds its own prompt: leave --chat out")
    if args.demo:
        _check_demo_args(args)
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


def _check_demo_args(args) -> None:
    """The demo compares greedy answers to its own question: sampling and stop strings would be left out."""
    given = [
        name
        for name, value, default in (
            ("--temperature", args.temperature, 0.0),
            ("--sample-top-k", args.sample_top_k, 0),
            ("--sample-top-p", args.sample_top_p, 1.0),
            ("--stop", args.stop, None),
        )
        if value != default
    ]
    if given:
        raise ValueError(f"--demo compares greedy answers to its own question: leave {', '.join(given)} out")


def _streamed(llm, prompt, args, sampling, prefix=None):
    """The answer streamed to stdout, a line of its own; returns its report."""
    from engine.api import GenerationReport

    report = GenerationReport()
    for piece in llm.stream(prompt, args.max_new_tokens, report=report, prefix=prefix, **sampling):
        print(piece, end="", flush=True)
    print()
    return report


def _check_questions(args) -> None:
    if args.prefix_file and not args.ask:
        raise ValueError("--prefix-file keeps the prompt's cache for the questions after it: give them with --ask")
    if not args.ask:
        return
    if args.demo or args.chat:
        raise ValueError(f"--ask continues the prompt as text: it does not go with --{'demo' if args.demo else 'chat'}")
    if not all(args.ask):
        raise ValueError("--ask: a question is empty")


def _answer_questions(llm, document: str, args, offload, sampling) -> None:
    """The document prefilled once; each question after it answered in turn, an answer a line of
    stdout and its report on stderr (with --json, all of them, after the prefix's)."""
    prefix, kept = _document_prefix(llm, document, args.prefix_file, sampling["progress"])
    try:
        reports = []
        for question in args.ask:
            reports.append(_streamed(llm, question, args, sampling, prefix))
            print(reports[-1].summary(), file=sys.stderr)
    finally:
        prefix.release()
    if args.json:
        done = dict(tokens=prefix.tokens, prefill_s=prefix.prefill_s, index_build_s=prefix.index_build_s, **kept)
        answers = [dict(question=q, **r.as_dict()) for q, r in zip(args.ask, reports)]
        _write_json(args, offload, {"prefix": done, "answers": answers})


def _document_prefix(llm, document: str, path: Path | None, progress: bool):
    """The document's Prefix, loaded from the file `path` where it exists, else prefilled (and saved to `path`),
    with a line on stderr saying which and what it took; and what the JSON reports of the file."""
    start = time.perf_counter()
    if path is not None and path.exists():
        prefix = llm.load_prefix(path, document=document, progress=progress)
        seconds = time.perf_counter() - start
        print(f"prefix {prefix.tokens} tokens: loaded from {path} in {seconds:.2f} s", file=sys.stderr)
        return prefix, {"prefix_file": str(path), "loaded_s": seconds}
    prefix = llm.prefix(document, progress=progress)
    try:
        device, host = (prefix.nbytes()[where]["prefix_copies"] / 2**20 for where in ("device", "host"))
        print(
            f"prefix {prefix.tokens} tokens: prefill {prefix.prefill_s:.2f} s, host index build "
            f"{prefix.index_build_s:.2f} s after it; copies to go back to it: device {device:.1f} MiB, "
            f"host {host:.1f} MiB",
            file=sys.stderr,
        )
        if path is None:
            return prefix, {}
        start = time.perf_counter()
        size = prefix.save(path, progress=progress)
        seconds = time.perf_counter() - start
        print(f"prefix saved to {path}: {size / 2**20:.1f} MiB in {seconds:.2f} s", file=sys.stderr)
        return prefix, {"prefix_file": str(path), "saved_s": seconds}
    except BaseException:
        prefix.release()
        raise


def cmd_chat(args) -> int:
    """A conversation on the terminal (engine.conversation): each line of stdin a message, each answer
    streamed to stdout; each turn prefills only what is new, so a --file document is prefilled once."""
    offload = _offload_config(args)
    _check_model_args(args)
    sampling = _sampling(args)
    if not stdin_open():
        raise ValueError("chat reads its messages from stdin, which is closed")
    document = _text(Path(args.file).read_bytes(), f"--file {args.file}") if args.file else None
    if document == "":  # generate refuses an empty prompt; here it would go before the first message unseen
        raise ValueError(f"--file {args.file} is empty")
    session = args.session  # a file that can be written (output_file), checked before the conversation
    if session is not None and session.exists() and (args.file or args.system):
        raise ValueError(f"--session: {session} holds a conversation already; --file and --system begin a new one")
    from engine.api import GenerationReport, HybridLLM

    bars = _bars()
    llm = HybridLLM.from_pretrained(args.model, offload=offload, rope_scale=args.rope_scale)
    if session is not None and session.exists():
        start = time.perf_counter()
        chat = llm.load_conversation(session, progress=bars)
        seconds = time.perf_counter() - start
        told = f"{len(chat.messages)} messages from {session}, {chat.kept_tokens} tokens loaded in {seconds:.2f} s"
        print(f"[resumed {told}]", file=sys.stderr, flush=True)
    else:
        chat = llm.conversation([{"role": "system", "content": args.system}] if args.system else None)
    try:
        for message in _typed_lines():
            if document is not None:  # the document goes before the first message kept
                message = f"{document}\n\n{message}"
            report, start, first = GenerationReport(), time.perf_counter(), None
            turns = len(chat.messages)
            try:
                for piece in chat.stream(message, args.max_new_tokens, report=report, progress=False, **sampling):
                    first = first or time.perf_counter()
                    print(piece, end="", flush=True)
            except KeyboardInterrupt:  # Ctrl-C stops the answer, not the chat (Ctrl-D ends it)
                print(flush=True)
                kept = len(chat.messages) > turns  # not where it stopped in its prefill (the document waits then)
                said = "the conversation keeps what was shown" if kept else "the message, in its prefill, is not kept"
                print(f"[stopped: {said}]", file=sys.stderr, flush=True)
                document = None if kept else document
                continue
            print()
            document = None
            waited = (first or time.perf_counter()) - start
            print(
                f"[prompt {report.prompt_tokens} tokens, {chat.found_kept} of them kept from the turns before; "
                f"first text after {waited:.2f} s; {report.new_tokens} tokens at {report.decode_tokens_per_s:.1f} "
                f"tok/s; host KV read per step {100 * report.kv_read_frac:.2f}%]",
                file=sys.stderr,
                flush=True,
            )
    finally:
        try:
            if session is not None:
                _save_session(chat, session, bars)
        finally:
            chat.close()
    return 0


def _save_session(chat, path: Path, progress: bool) -> None:
    """The conversation written to its --session file, for the next run to resume (where it kept a cache)."""
    if chat.kept.prefix is None:
        return
    start = time.perf_counter()
    size = chat.save(path, progress=progress)
    told = f"{len(chat.messages)} messages, {size / 2**20:.1f} MiB in {time.perf_counter() - start:.2f} s"
    print(f"[conversation saved to {path}: {told}]", file=sys.stderr, flush=True)


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
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {args.max_batch}")
    folder_bytes = gib_bytes(args.prefix_dir_gb, "--prefix-dir-gb")
    from engine.api import HybridLLM
    from engine.prefix_file import PrefixFolder
    from engine.server import Server

    _bars()
    llm = HybridLLM.from_pretrained(args.model, offload=offload, rope_scale=args.rope_scale)
    folder = PrefixFolder(llm, args.prefix_dir, folder_bytes) if args.prefix_dir else None
    server = Server(
        llm,
        host=args.host,
        port=args.port,
        model=args.served_name or args.model,
        chat_max_tokens=args.max_tokens,
        reuse_prompts=args.reuse_prompts,
        prefix_folder=folder,
        max_batch=args.max_batch,
        join=args.join,
    )
    logging.getLogger("engine.server").setLevel(logging.INFO)  # a line per request and per answer
    print(f"hybridattn: serving {server.completions.model} at {server.url} (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
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
    write_output(args.json, json.dumps({**fields, "run": run}, indent=1))
