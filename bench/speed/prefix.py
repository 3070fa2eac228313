"""Questions about one long document: the first token of each with the document prefilled once
(`HybridLLM.prefix`) against the whole prompt prefilled for it, in one run, on the bundled model.

The document is the pass-key haystack of `--context` tokens; the questions after it are the pass
key's, one about the filler, and the pass key's again (which must answer as it did the first time:
the cache goes back to the document's state after each). For each: its first token's seconds, the
answer, whether it names the pass key, and the share of host rows read per decode step; beside
them, the whole prompt (document + the pass key's question) prefilled and answered as one.

    python -m bench.speed.prefix [--quick] [--context 8192] [--threads 2] [--json PATH]
"""

from __future__ import annotations

import json

from bench.common import options
from bench.common.output import write_json
from bench.evals.tasks import make_sample, score
from engine import OffloadConfig
from engine.api import HybridLLM

OTHER_QUESTION = "\n\nWhat colour is the grass? The grass is"


def row(name: str, result, sample, first_token_s: float | None = None) -> dict:
    r = result.report
    out = {"question": name, "first_token_s": round(r.first_token_s if first_token_s is None else first_token_s, 3)}
    out.update(prompt_tokens=r.prompt_tokens, prefilled_tokens=r.prompt_tokens - r.prefix_tokens)
    out.update(answer=result.text, names_the_key=score(sample, result.text) == 1.0)
    out.update(kv_read_frac=round(r.kv_read_frac, 4), decode_steps=r.decode_steps)
    return out


def main(argv=None) -> None:
    p = options.parser(__doc__, __spec__)
    options.add_output_args(p, quick="a 1,024-token document")
    p.add_argument("--context", type=options.positive_int, help="the document's tokens (default 8192; --quick: 1024)")
    p.add_argument("--new-tokens", type=options.positive_int, default=8, help="tokens each answer may take")
    options.add_threads_arg(p)
    args = p.parse_args(argv)
    options.quick_defaults(args, context=(1024, 8192))
    options.pin_threads(args.threads)
    llm = HybridLLM.from_pretrained(offload=OffloadConfig(device="cpu"))
    sample = make_sample("passkey", args.context, llm.tokenizer, seed=0, depth=0.5)
    document, question = sample.prompt.rsplit("\n\n", 1)
    question = "\n\n" + question
    whole = llm.generate(document + question, args.new_tokens, progress=False)
    rows = [row("whole prompt, the pass key's", whole, sample)]
    prefix = llm.prefix(document, progress=False)
    try:
        made = {"prefix_tokens": prefix.tokens, "prefill_s": round(prefix.prefill_s, 3)}
        made["index_build_s"] = round(prefix.index_build_s, 3)
        print(json.dumps(made), flush=True)
        for name, text in (
            ("the pass key's", question),
            ("the grass'", OTHER_QUESTION),
            ("the pass key's again", question),
        ):
            rows.append(
                row(
                    f"after the prefix, {name}",
                    llm.generate(text, args.new_tokens, prefix=prefix, progress=False),
                    sample,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        prefix.release()
    print(json.dumps(rows[0]), flush=True)
    if args.json:
        config = {"model": "smollm2-135m", "threads": args.threads, "context": args.context}
        write_json(args.json, {"config": config, "prefix": made, "rows": rows})


if __name__ == "__main__":
    main()
