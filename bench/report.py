"""Markdown tables from the benchmarks' JSON files (the README's results section).

python bench/report.py [--kernel PATH] [--decode PATH] [--eval PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def kernel(result: dict) -> str:
    rows = [
        [
            c["dtype"],
            c["n_ids"],
            f"{c['ms_cpp']:.3f}",
            f"{c['ms_torch']:.3f}",
            f"{c['speedup']:.1f}x",
            f"{c['gathered_gbps']:.1f}",
            f"{100 * c['gathered_gbps'] / c['read_gbps']:.0f}%",
            f"{c['max_abs_err']:.1e}",
        ]
        for c in result["cases"]
    ]
    header = ["dtype", "ids per KV head", "C++ ms", "torch ms", "speedup", "gathered GB/s", "of read BW", "max abs err"]
    cfg = result["config"]
    return f"N = {cfg['n_tokens']}, read bandwidth {cfg['read_gbps']} GB/s, {cfg['threads']} threads\n\n" + table(
        header, rows
    )


def _by_context(cases: list[dict], value) -> tuple[list[int], dict]:
    contexts = sorted({c["context"] for c in cases})
    cells: dict[tuple, dict] = {}
    for c in cases:
        cells.setdefault((c["model"], c["method"]), {})[c["context"]] = value(c)
    return contexts, cells


def decode(result: dict) -> str:
    def value(c):
        if "error" in c:
            return "n/a"
        ms = c["attn_ms_per_layer"] if c["model"] != "smollm2-135m" else c["decode_ms_per_token"]
        return f"{ms:.1f} ({100 * c['kv_read_frac']:.1f}%)"

    out = []
    for model, what in (("smollm2-135m", "decode ms/token"), ("llama-3-8b-shape", "attention ms/layer/token")):
        cases = [c for c in result["cases"] if c["model"] == model]
        if not cases:
            continue
        contexts, cells = _by_context(cases, value)
        rows = [[method] + [cells[(m, method)].get(n, "") for n in contexts] for (m, method) in cells]
        out.append(f"**{model}**: {what} (share of host KV read per step)\n\n" + table(["method"] + contexts, rows))
    return "\n\n".join(out)


def accuracy(result: dict) -> str:
    rows_in = result["rows"]
    contexts = sorted({r["context"] for r in rows_in})
    cells: dict[tuple, dict] = {}
    for r in rows_in:
        cells.setdefault((r["task"], r["method"]), {})[r["context"]] = r
    rows = []
    for (task, method), by_ctx in cells.items():
        row = [task, method]
        for n in contexts:
            r = by_ctx.get(n)
            row.append(
                ""
                if r is None
                else f"{100 * r['accuracy']:.0f} / {100 * r['agreement']:.0f} / {r['attn_rel_err']:.3f} / "
                f"{100 * r['kv_read_frac']:.1f}%"
            )
        rows.append(row)
    n = {r["n"] for r in rows_in}
    return (
        f"per cell: accuracy % / token agreement with full % / attention rel. error / host KV read per step "
        f"(n = {', '.join(map(str, sorted(n)))} prompts per cell)\n\n" + table(["task", "method"] + contexts, rows)
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", type=Path)
    p.add_argument("--decode", type=Path)
    p.add_argument("--eval", type=Path, nargs="+", help="one or more eval_accuracy JSON files (rows concatenated)")
    args = p.parse_args(argv)
    for path, render in ((args.kernel, kernel), (args.decode, decode)):
        if path is not None:
            print(render(json.loads(path.read_text())) + "\n")
    if args.eval:
        print(accuracy({"rows": [r for path in args.eval for r in json.loads(path.read_text())["rows"]]}))


if __name__ == "__main__":
    main()
