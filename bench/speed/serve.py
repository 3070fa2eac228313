"""Clients at once: N requests sent to the engine's HTTP server (engine.server), each its own prompt, all
together or one every `--stagger` seconds, answered in up to five ways in one run, in turns (`--ways`,
the first three by default): one at a time (`max_batch` 1); in batches formed only when the engine takes
what waits (`max_batch` `--max-batch`, `join=False`: `serve --no-join`); joining, where requests join a
running batch between its steps, one a step, those that waited together included, each prefilled a chunk
(`--prefill-chunk`: the engine's `prefill_chunk`, 1024 tokens by default) a step while the batch decodes;
joining with whole prefills, every prompt prefilled in one pass (`prefill_chunk` twice `--context`), so
that a prompt that joins stalls the batch's steps for its whole prefill; and joining with prompts kept,
as the server runs by default (`reuse_prompts=True`), where each batch's first request keeps its prompt
for a next turn.

Each prompt is a pass-key haystack of `--context` tokens (its own seed), asked for `--new-tokens` greedy
tokens with no end-of-sequence stop, so that every answer runs its full length. Except in the last way
the server keeps no prompt between requests (`reuse_prompts=False`: the runs are independent), so the
first request, which finds the engine free, runs alone in the first two ways and starts a batch in the
others. Per way and round: the seconds from sending the first request to the last answer, the completion
tokens per second of that, the prompts' prefill seconds (their first chunk to their first token) and the
tokens per second of the rest of the time, the requests' mean seconds to their first text and to their
whole answer (each streamed), the longest a streamed answer waited between two of its pieces (mean over
the requests, and the longest), the most requests each was decoded with (the server's
`hybridattn[0].batch`), and how many answers are the ones the first way gives (greedy: the same tokens,
up to the batch's rounding).

    python -m bench.speed.serve [--quick] [--clients 8] [--context 1024] [--new-tokens 64] [--stagger 0]
                                [--rounds 2] [--ways 0,1,2] [--prefill-chunk 1024] [--threads 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request

from bench.common import options
from bench.common.output import write_json
from bench.common.timing import kept_prefill_s, warm_up
from bench.evals.tasks import make_sample
from engine import OffloadConfig
from engine.api import HybridLLM
from engine.cli import run_script
from engine.server import Server

WAYS = ("one at a time", "batches at the start", "joining", "joining, whole prefills", "joining, prompts kept")


def answered(llm: HybridLLM, prompts: list[str], new_tokens: int, max_batch: int, way: str, stagger: float) -> dict:
    """The prompts sent, `stagger` seconds apart, to a server of `llm` answering `way` (of WAYS) with
    `max_batch`: the wall seconds, each answer and its seconds."""
    max_batch = 1 if way == WAYS[0] else max_batch
    join = way in WAYS[2:]
    reuse = way == WAYS[4]
    server = Server(llm, port=0, model="smollm2-135m", max_batch=max_batch, reuse_prompts=reuse, join=join)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    answers: list[dict | None] = [None] * len(prompts)

    def ask(i: int) -> None:
        body = {"prompt": prompts[i], "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        request = urllib.request.Request(server.url + "/completions", data=json.dumps(body).encode())
        sent = time.perf_counter()
        pieces, times, last = [], [], None  # each text piece and its seconds since sent
        with urllib.request.urlopen(request) as response:
            for line in response:  # server-sent events: "data: {chunk}", then "data: [DONE]"
                data = line.decode().strip().removeprefix("data: ")
                if not data or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    times.append(time.perf_counter() - sent)
                    pieces.append(chunk["choices"][0]["text"])
                last = chunk if "usage" in chunk else last
        answers[i] = {"text": "".join(pieces), "seconds": time.perf_counter() - sent, "first_token_s": times[0]}
        answers[i]["longest_gap_s"] = max((b - a for a, b in zip(times, times[1:])), default=0.0)
        report = last["hybridattn"][0]
        answers[i].update(tokens=last["usage"]["completion_tokens"], batch=report.get("batch", 1))
        # (with prompts kept, the prompt's prefill into the kept cache is its own: it was left out)
        answers[i]["prefill_s"] = report["prefill_s"] + report["index_build_s"] + kept_prefill_s(report)
        answers[i]["ended"] = time.perf_counter()

    def asked(i: int) -> None:
        try:
            ask(i)
        except Exception as error:  # named here: a None answer failed later in other words
            answers[i] = {"error": f"{type(error).__name__}: {error}"}

    clients = [threading.Thread(target=asked, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    try:
        for i, client in enumerate(clients):
            client.start()
            if i + 1 < len(clients):
                time.sleep(stagger or 0.01)  # in order: the first finds the engine free
        for client in clients:
            client.join()
    finally:
        server.shutdown()
        server.close()
    failed = [f"client {i}: {a['error']}" for i, a in enumerate(answers) if "error" in a]
    if failed:
        raise RuntimeError(f"{way}: " + "; ".join(failed))
    # to the last answer's end: the server's shutdown waits up to half a second for its loop's next turn
    wall = max(a["ended"] for a in answers) - start
    tokens = sum(a["tokens"] for a in answers)
    prefill = sum(a["prefill_s"] for a in answers)  # the prompts' own prefill work, one after another
    return {
        "way": way,
        "max_batch": max_batch,
        "wall_s": round(wall, 3),
        "prefill_s": round(prefill, 3),
        "decode_tokens_per_s": round(tokens / (wall - prefill), 2),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "mean_request_s": round(statistics.mean(a["seconds"] for a in answers), 3),
        "mean_first_token_s": round(statistics.mean(a["first_token_s"] for a in answers), 3),
        "mean_longest_gap_s": round(statistics.mean(a["longest_gap_s"] for a in answers), 3),
        "longest_gap_s": round(max(a["longest_gap_s"] for a in answers), 3),
        "batches": [a["batch"] for a in answers],
        "answers": [a["text"] for a in answers],
    }


def parse_ways(text: str) -> list[str]:
    """--ways: WAYS by their numbers, comma-separated, in order (the first is the others' reference)."""
    try:
        ways = [WAYS[int(n)] for n in text.split(",")]
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"ways are numbers 0-{len(WAYS) - 1}, comma-separated, got {text!r}") from None
    if len(set(ways)) < len(ways):
        raise argparse.ArgumentTypeError(f"each way once, got {text!r}")
    return ways


def main(argv=None) -> None:
    p = options.parser(__doc__, __spec__)
    options.add_output_args(p, quick="3 clients, 256-token prompts, 8 new tokens, one round")
    p.add_argument("--clients", type=options.positive_int, help="requests sent (default 8; --quick: 3)")
    p.add_argument("--context", type=options.positive_int, help="each prompt's tokens (default 1024; --quick: 256)")
    p.add_argument("--new-tokens", type=options.positive_int, help="tokens each answer takes (default 64; --quick: 8)")
    p.add_argument("--stagger", type=float, default=0.0, help="seconds between two clients' requests (0: at once)")
    p.add_argument("--max-batch", type=options.positive_int, default=8, help="the batched server's max_batch")
    p.add_argument("--rounds", type=options.positive_int, help="turns of the ways (default 2; --quick: 1)")
    ways_help = "the ways, by number: " + ", ".join(f"{i} {way}" for i, way in enumerate(WAYS)) + " (default 0,1,2)"
    p.add_argument("--ways", type=parse_ways, default=list(WAYS[:3]), help=ways_help)
    p.add_argument(
        "--prefill-chunk",
        type=options.positive_int,
        default=OffloadConfig().prefill_chunk,
        help="tokens per prefill pass, and a joining prompt's per step, in every way but whole prefills (default 1024)",
    )
    options.add_threads_arg(p)
    args = p.parse_args(argv)
    if not 0 <= args.stagger < 3600:
        p.error(f"--stagger must be seconds in [0, 3600), got {args.stagger}")
    options.quick_defaults(args, clients=(3, 8), context=(256, 1024), new_tokens=(8, 64), rounds=(1, 2))
    options.pin_threads(args.threads)
    llm = HybridLLM.from_pretrained(offload=OffloadConfig(device="cpu", prefill_chunk=args.prefill_chunk))
    whole = HybridLLM(llm.model, llm.tokenizer, OffloadConfig(device="cpu", prefill_chunk=2 * args.context))
    prompts = [make_sample("passkey", args.context, llm.tokenizer, seed=i).prompt for i in range(args.clients)]
    warm_up(llm, prompts[0])  # the reference way's first round ran cold
    runs = []
    for round_ in range(args.rounds):
        for way in args.ways:
            engine = whole if way == WAYS[3] else llm
            runs.append(
                {"round": round_, **answered(engine, prompts, args.new_tokens, args.max_batch, way, args.stagger)}
            )
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "answers"}), flush=True)
    first = args.ways[0]
    reference = next(r for r in runs if r["way"] == first)["answers"]
    for run in runs:
        run["same_answers"] = sum(a == b for a, b in zip(run["answers"], reference))
    summary = {}
    for way in args.ways:
        mine = [r for r in runs if r["way"] == way]
        keys = ("wall_s", "tokens_per_s", "mean_request_s", "mean_first_token_s", "mean_longest_gap_s", "longest_gap_s")
        summary[way] = {k: round(statistics.median(r[k] for r in mine), 3) for k in keys}
        summary[way]["same_answers"] = min(r["same_answers"] for r in mine)
    for way in args.ways[1:]:
        summary[way]["speed_up"] = round(summary[first]["wall_s"] / summary[way]["wall_s"], 2)
    print(json.dumps(summary), flush=True)
    if args.json:
        config = {"model": "smollm2-135m", "threads": args.threads, "clients": args.clients, "context": args.context}
        config.update(new_tokens=args.new_tokens, rounds=args.rounds, max_batch=args.max_batch, stagger=args.stagger)
        config["ways"], config["prefill_chunk"] = args.ways, args.prefill_chunk
        write_json(args.json, {"config": config, "runs": runs, "summary": summary})


if __name__ == "__main__":
    run_script(main)
