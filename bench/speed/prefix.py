"""Questions about one long document: the first token of each with the document prefilled once
(`HybridLLM.prefix`) against the whole prompt prefilled for it, in one run, on the bundled model.

The document is the pass-key haystack of `--context` tokens; the questions after it are the pass
key's, one about the filler, and the pass key's again (which must answer as it did the first time:
the cache goes back to the document's state after each). For each: its first token's seconds, the
answer, whether it names the pass key, and the share of host rows read per decode step; beside
them, the whole prompt (document + the pass key's question) prefilled and answered as one.

Then the prefix saved to a file and loaded by another engine over the same model, as a later process
would (`Prefix.save`, `HybridLLM.load_prefix`), the pass key's question after it: the file's size, the
save's and the load's seconds, and the answer, which must be the prefix's own.

With `--server`, then the same questions as HTTP requests to the engine's server (engine.server,
`hybridattn serve --prefix-dir`, in this process on a free port): the whole prompt; the document as
the requests' `document` field, which the first such request prefills (and saves to the folder) and
the next find kept; a chat about the document, whose second turn finds the first's prompt kept; the
document's question again, its prefix loaded from the folder. Each request's seconds from sending it to
its whole answer, and the tokens of its prompt found kept.

With `--samples N --conversations`, each of the N prompts is instead two turns of a conversation in a
kept cache (engine.prefix.KeptCache): the prompt, then its answer and the question again; the second
turn's answer is compared with the same tokens prefilled whole.

With `--samples N`, then N prompts of an evaluation cell (`--task`, at --context tokens; the
question after the haystack's last blank line) are each answered twice, as the whole prompt and
after their haystack as a prefix: how many give the same tokens, and each way's score.

    python -m bench.speed.prefix [--quick] [--context 8192] [--threads 2] [--json PATH]
                                 [--server] [--samples 40 --task niah_multikey [--conversations]]
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

from bench.common import options
from bench.common.output import write_json
from bench.common.timing import kept_prefill_s, warm_up
from bench.evals.tasks import MAX_NEW, TASKS, cell_sample, make_sample, score
from engine import OffloadConfig
from engine.api import HybridLLM
from engine.cli import run_script
from engine.prefix import KeptCache

OTHER_QUESTION = "\n\nWhat colour is the grass? The grass is"
CHAT_ROOM = 96  # tokens of the document left out of the chat: its template's and the second turn's


def row(name: str, result, sample) -> dict:
    r = result.report
    out = {"question": name, "first_token_s": round(r.first_token_s, 3)}
    out.update(prompt_tokens=r.prompt_tokens, prefilled_tokens=r.prompt_tokens - r.prefix_tokens)
    out.update(answer=result.text, names_the_key=score(sample, result.text) == 1.0)
    out.update(kv_read_frac=round(r.kv_read_frac, 4), decode_steps=r.decode_steps)
    return out


def agreement(llm: HybridLLM, task: str, context: int, n: int, *, conversations: bool = False) -> dict:
    """N prompts of the cell (task, context), each answered as the whole prompt and after a kept cache (its
    haystack as a prefix; with `conversations`, the second turn of a conversation): the answers that are
    the same tokens, and each way's mean score."""
    way = "kept" if conversations else "prefix"
    same, whole_scores, kept_scores, found = 0, [], [], []
    for i in range(n):
        sample = cell_sample(task, context, llm.tokenizer, i, n)
        answer = second_turn if conversations else after_haystack
        whole, after, extra = answer(llm, sample, MAX_NEW[task])
        same += after.token_ids == whole.token_ids
        found += [extra["found"]] if extra else []
        whole_scores.append(score(sample, whole.text))
        kept_scores.append(score(sample, after.text))
        print(json.dumps({"prompt": i, "same_tokens": after.token_ids == whole.token_ids, **extra}), flush=True)
    out = {"task": task, "context": context, "prompts": n, "same_tokens": same}
    out.update({"found_kept_min": min(found)} if found else {})
    out.update({"whole_score": sum(whole_scores) / n, f"{way}_score": sum(kept_scores) / n})
    return out


def after_haystack(llm: HybridLLM, sample, new: int) -> tuple:
    """The whole prompt's answer, and its question's after its haystack as a prefix."""
    document, question = sample.prompt.rsplit("\n\n", 1)
    whole = llm.generate(sample.prompt, new, progress=False)
    prefix = llm.prefix(document, progress=False)
    try:
        return whole, llm.generate("\n\n" + question, new, prefix=prefix, progress=False), {}
    finally:
        prefix.release()


def second_turn(llm: HybridLLM, sample, new: int) -> tuple:
    """A conversation of two turns in a kept cache (the server's and HybridLLM.conversation's): the prompt,
    then its answer and the question again, which extends the cache. The second turn's answer as the same
    tokens prefilled whole give it and as the kept cache does, and the share of its tokens found kept."""
    question = "\n\n" + sample.prompt.rsplit("\n\n", 1)[1]
    kept = KeptCache(llm)
    try:
        rest, prefix, _ = kept.prompt(llm.encode(sample.prompt))
        first = llm.generate(rest, new, prefix=prefix, progress=False)
        again = llm.tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids
        turn = torch.cat([llm.encode(sample.prompt), torch.tensor([first.token_ids]), again], dim=1)
        rest, prefix, found = kept.prompt(turn)
        after = llm.generate(rest, new, prefix=prefix, progress=False)
    finally:
        kept.release()
    return llm.generate(turn, new, progress=False), after, {"found": found / turn.shape[1]}


def served(llm: HybridLLM, document: str, question: str, new_tokens: int, sample) -> list[dict]:
    """The questions as requests to the engine's HTTP server, run with a prefix folder (`--prefix-dir`), in
    turn: the whole prompt; the document as the `document` field, with each question; a chat about the
    document, two turns; the document's first question again, its prefix loaded from the folder. Each
    request's seconds, answer, and the tokens of its prompt it found in the server's kept cache."""
    from engine.prefix_file import PrefixFolder
    from engine.server import Server

    folder = tempfile.TemporaryDirectory()
    server = Server(llm, port=0, model="smollm2-135m", prefix_folder=PrefixFolder(llm, folder.name, 2**40))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    rows = []

    def ask(name: str, path: str, body: dict) -> dict:
        body = body | {"max_tokens": new_tokens, "temperature": 0}
        request = urllib.request.Request(server.url + path, data=json.dumps(body).encode())
        start = time.perf_counter()
        with urllib.request.urlopen(request) as response:
            answer = json.loads(response.read())
        seconds = time.perf_counter() - start
        report, choice = answer["hybridattn"][0], answer["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        kept = report.get("kept", {})
        first_token = kept_prefill_s(report) + report["first_token_s"]  # what it prefilled into the kept cache too
        rows.append({"request": name, "seconds": round(seconds, 3), "first_token_s": round(first_token, 3)})
        rows[-1].update(prompt_tokens=report["prompt_tokens"], kept=kept.get("kind"))
        rows[-1].update(reused_tokens=kept.get("reused_tokens", 0), answer=text, names_the_key=score(sample, text) == 1)
        rows[-1].update(kv_read_frac=round(report["kv_read_frac"], 4), loaded=kept.get("loaded", False))
        print(json.dumps(rows[-1]), flush=True)
        return answer

    try:
        ask("whole prompt, the pass key's", "/completions", {"prompt": document + question})
        for name, text in questions(question):
            ask(f"document field, {name}", "/completions", {"prompt": text, "document": document})
        chat = [{"role": "user", "content": within_context(llm, document, CHAT_ROOM) + question}]
        first = ask("chat, the pass key's", "/chat/completions", {"messages": chat})
        chat += [first["choices"][0]["message"], {"role": "user", "content": OTHER_QUESTION.strip()}]
        ask("chat, next turn: the grass'", "/chat/completions", {"messages": chat})
        ask("document field after the chat, the pass key's", "/completions", {"prompt": question, "document": document})
    finally:
        server.shutdown()
        server.close()
        folder.cleanup()
    whole = llm.generate(chat, new_tokens, progress=False)  # the next turn, the whole conversation prefilled
    rows.append(row("chat, next turn, whole (the Python API)", whole, sample))
    rows[-1] = {"request": rows[-1].pop("question"), "seconds": None, **rows[-1], "kept": None, "reused_tokens": 0}
    rows[-1]["loaded"] = False
    print(json.dumps(rows[-1]), flush=True)
    return rows


def within_context(llm: HybridLLM, document: str, room: int) -> str:
    """The document less its last `room` tokens (filler after the pass key), which leave room for a
    chat's template and turns within the model's trained positions."""
    ids = llm.tokenizer(document, add_special_tokens=False).input_ids
    return llm.tokenizer.decode(ids[: max(len(ids) - room, len(ids) // 2 + 64)])


def questions(question: str) -> list[tuple[str, str]]:
    """The questions asked after the document, in turn: the pass key's, the grass', the pass key's again."""
    return [("the pass key's", question), ("the grass'", OTHER_QUESTION), ("the pass key's again", question)]


def from_file(llm: HybridLLM, prefix, question: str, new_tokens: int, sample) -> dict:
    """The prefix saved to a file and loaded by another engine over the same model, as a later process would
    load it (engine.prefix_file); the pass key's question asked after it. Its row, with the file's bytes and
    the seconds the save and the load took."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "document.prefix"
        start = time.perf_counter()
        size = prefix.save(path, progress=False)
        saved_s = time.perf_counter() - start
        other = HybridLLM(llm.model, llm.tokenizer, llm.offload)
        start = time.perf_counter()
        loaded = other.load_prefix(path, progress=False)
        load_s = time.perf_counter() - start
    try:
        out = row(
            "loaded from a file, the pass key's",
            other.generate(question, new_tokens, prefix=loaded, progress=False),
            sample,
        )
    finally:
        loaded.release()
    out.update(file_bytes=size, save_s=round(saved_s, 3), load_s=round(load_s, 3))
    return out


def main(argv=None) -> None:
    p = options.parser(__doc__, __spec__)
    options.add_output_args(p, quick="a 1,024-token document")
    p.add_argument("--context", type=options.positive_int, help="the document's tokens (default 8192; --quick: 1024)")
    p.add_argument("--new-tokens", type=options.positive_int, default=8, help="tokens each answer may take")
    p.add_argument("--samples", type=options.positive_int, help="prompts of a cell answered both ways (default none)")
    p.add_argument("--server", action="store_true", help="also ask the questions through the HTTP server")
    p.add_argument(
        "--conversations",
        action="store_true",
        help="with --samples: each prompt as two turns of a conversation, the second against the same tokens whole",
    )
    p.add_argument("--task", choices=TASKS, default="niah_multikey", help="the cell's task, with --samples")
    options.add_threads_arg(p)
    args = p.parse_args(argv)
    if args.conversations and not args.samples:  # read with --samples only: ignored without a word
        p.error("--conversations needs --samples")
    options.quick_defaults(args, context=(1024, 8192))
    options.pin_threads(args.threads)
    llm = HybridLLM.from_pretrained(offload=OffloadConfig(device="cpu"))
    sample = make_sample("passkey", args.context, llm.tokenizer, seed=0, depth=0.5)
    document, question = sample.prompt.rsplit("\n\n", 1)
    question = "\n\n" + question
    warm_up(llm, document)  # the whole prompt's row, the others' reference, ran cold
    whole = llm.generate(document + question, args.new_tokens, progress=False)
    rows = [row("whole prompt, the pass key's", whole, sample)]
    prefix = llm.prefix(document, progress=False)
    try:
        made = {"prefix_tokens": prefix.tokens, "prefill_s": round(prefix.prefill_s, 3)}
        made["index_build_s"] = round(prefix.index_build_s, 3)
        print(json.dumps(made), flush=True)
        for name, text in questions(question):
            rows.append(
                row(
                    f"after the prefix, {name}",
                    llm.generate(text, args.new_tokens, prefix=prefix, progress=False),
                    sample,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
        saved = from_file(llm, prefix, question, args.new_tokens, sample)
        print(json.dumps(saved), flush=True)
    finally:
        prefix.release()
    print(json.dumps(rows[0]), flush=True)
    result = {"prefix": made, "rows": rows, "file": saved}
    if args.server:
        result["server"] = served(llm, document, question, args.new_tokens, sample)
    if args.samples:
        result["agreement"] = agreement(llm, args.task, args.context, args.samples, conversations=args.conversations)
        print(json.dumps(result["agreement"]), flush=True)
    if args.json:
        config = {"model": "smollm2-135m", "threads": args.threads, "context": args.context}
        write_json(args.json, {"config": config, **result})


if __name__ == "__main__":
    run_script(main)
