"""How soon the HTTP server (engine.server) lets go of a request nobody waits for: its client closes the
connection, or the server is stopped (Ctrl-C), while the request's prompt of `--context` tokens is in its
prefill or while its answer (without `stream`, up to `--new-tokens` greedy tokens, no end-of-sequence stop)
is decoded.

Per case and round, in turns: for a client that leaves, the seconds from its closing the connection until
a next client's short request (a few words, one token) is answered (the server takes one request at a
time, `max_batch` 1, so that it waits for the engine), beside that request's seconds on a free server;
for a server that stops, the seconds `shutdown()` and `close()` take. Where the request is
when it is let go is set by the time: in its prefill, half the prompt's first-token time after it was
sent (measured first, alone); decoding, a second after its first token.

    python -m bench.speed.leave [--quick] [--context 8000] [--new-tokens 180] [--rounds 3]
                                [--prefill-chunk 1024] [--threads 2] [--json PATH]
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
import urllib.request

from bench.common import options
from bench.common.output import write_json
from bench.common.timing import warm_up
from bench.evals.tasks import make_sample
from engine import OffloadConfig
from engine.api import HybridLLM
from engine.cli import run_script
from engine.server import Server

CASES = ("client leaves in the prefill", "client leaves while decoding", "stop in the prefill", "stop while decoding")
NEXT = {"prompt": "The sky is", "max_tokens": 1, "temperature": 0}


class Serving:
    """A server of `llm` on a thread of its own, one request at a time (a next request waits for the engine
    rather than joining the batch of the one before)."""

    def __init__(self, llm: HybridLLM):
        self.server = Server(llm, port=0, model="smollm2-135m", reuse_prompts=False, max_batch=1)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def post(self, body: dict) -> dict:
        data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
        request = urllib.request.Request(self.server.url + "/completions", data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    def seconds_to_answer(self, body: dict) -> float:
        t0 = time.perf_counter()
        self.post(body)
        return time.perf_counter() - t0

    def stop(self) -> float:
        """The seconds the server's `close()` takes to stop it (what Ctrl-C on `hybridattn serve` runs once its
        loop has ended; the loop's own end, `shutdown()`, waits for its next turn, which Ctrl-C does not)."""
        self.server.shutdown()
        t0 = time.perf_counter()
        self.server.close()
        seconds = time.perf_counter() - t0
        self.thread.join(10)
        return seconds


def let_go(llm: HybridLLM, body: dict, case: str, after_s: float) -> dict:
    """One round of `case`: the request `body` sent, let go `after_s` seconds later; the seconds it took
    the engine to let go of it (for a client, to answer the next request after it)."""
    serving = Serving(llm)
    try:
        if case.startswith("client"):
            data = json.dumps(body).encode()
            head = f"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            with socket.create_connection(("127.0.0.1", serving.server.server_port)) as client:
                client.sendall(head + data)
                time.sleep(after_s)
            return {"case": case, "seconds": serving.seconds_to_answer(NEXT)}
        sender = threading.Thread(target=lambda: _quietly(serving.post, body), daemon=True)
        sender.start()
        time.sleep(after_s)
        seconds = serving.stop()
        sender.join(60)
        return {"case": case, "seconds": seconds}
    finally:
        if serving.thread.is_alive():
            serving.stop()


def _quietly(call, *args) -> None:
    try:
        call(*args)
    except OSError:  # the server stopped under it
        pass


def main(argv=None) -> None:
    p = options.parser(__doc__, __spec__)
    options.add_output_args(p, quick="a 2,048-token prompt, one round")
    p.add_argument("--context", type=options.positive_int, help="the prompt's tokens (default 8000; --quick: 2048)")
    p.add_argument(
        "--new-tokens", type=options.positive_int, default=180, help="the answer's tokens at most (default 180)"
    )
    p.add_argument("--rounds", type=options.positive_int, help="turns of the cases (default 3; --quick: 1)")
    chunk = OffloadConfig().prefill_chunk
    p.add_argument("--prefill-chunk", type=options.positive_int, default=chunk, help="tokens per prefill pass")
    options.add_threads_arg(p)
    args = p.parse_args(argv)
    options.quick_defaults(args, context=(2048, 8000), rounds=(1, 3))
    options.pin_threads(args.threads)
    llm = HybridLLM.from_pretrained(offload=OffloadConfig(device="cpu", prefill_chunk=args.prefill_chunk))
    prompt = make_sample("passkey", args.context, llm.tokenizer, seed=0).prompt
    warm_up(llm, prompt)  # the first-token time below sets when each case lets go: not a cold one
    body = {"prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True}
    serving = Serving(llm)
    try:
        serving.post(NEXT)  # warm
        first = serving.post(body | {"max_tokens": 1})["hybridattn"][0]
        alone = statistics.median(serving.seconds_to_answer(NEXT) for _ in range(5))
    finally:
        serving.stop()
    first_token_s = first["first_token_s"]
    print(json.dumps({"prompt_tokens": first["prompt_tokens"], "first_token_s": round(first_token_s, 2)}), flush=True)
    runs = []
    for round_ in range(args.rounds):
        for case in CASES:
            after_s = first_token_s / 2 if case.endswith("prefill") else first_token_s + 1.0
            runs.append({"round": round_, **let_go(llm, body, case, after_s)})
            print(json.dumps(runs[-1]), flush=True)
    summary = {case: round(statistics.median(r["seconds"] for r in runs if r["case"] == case), 3) for case in CASES}
    summary["next request alone"] = round(alone, 3)
    summary["prompt first token"] = round(first_token_s, 3)
    summary["prompt tokens"] = first["prompt_tokens"]
    print(json.dumps(summary), flush=True)
    if args.json:
        config = {"model": "smollm2-135m", "threads": args.threads, "context": args.context, "rounds": args.rounds}
        config.update(new_tokens=args.new_tokens, prefill_chunk=args.prefill_chunk)
        write_json(args.json, {"config": config, "runs": runs, "summary": summary})


if __name__ == "__main__":
    run_script(main)
