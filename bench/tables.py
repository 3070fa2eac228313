"""The benchmarks' JSON files as Markdown tables: a renderer per kind of result (`RENDERERS`,
one file each; `MANY_FILES`, several), used by bench.report to print them and to keep the
docs' report blocks up to date."""

from __future__ import annotations

import json

from bench.stats import mean_interval, wilson_interval


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
        if c["method"].startswith("hybrid") and c.get("host_bytes") == 0:  # its window held the context
            return f"{ms:.1f} (none offloaded)"
        return f"{ms:.1f} ({100 * c['kv_read_frac']:.1f}%)"

    out = []
    for model in dict.fromkeys(c["model"] for c in result["cases"]):  # the bundled model whole, shapes by the layer
        what = "decode ms/token" if model == "smollm2-135m" else "attention ms/layer/token"
        cases = [c for c in result["cases"] if c["model"] == model]
        contexts, cells = _by_context(cases, value)
        rows = [[method] + [cells[(m, method)].get(n, "") for n in contexts] for (m, method) in cells]
        out.append(f"**{model}**: {what} (share of host KV read per step)\n\n" + table(["method"] + contexts, rows))
    return "\n\n".join(out)


def pool(rows: list[dict]) -> list[dict]:
    """One row per (task, context, method): the rows of runs over other seeds (`first`) pooled,
    their per-prompt scores joined in seed order and the means weighted by prompts. A run that
    repeats another's seeds with the same scores (full attention beside each configuration
    run apart) counts once; one that differs is refused."""
    groups: dict[tuple, list[dict]] = {}

    def first(r):
        return r.get("first", 0)  # runs before --first started at seed 0

    def answers(r):  # the accuracy too: rows of older files have no per-prompt scores
        return first(r), r["n"], r.get("scores"), r["accuracy"]

    for r in rows:
        same = groups.setdefault((r["task"], r["context"], r["method"]), [])
        if not any(answers(o) == answers(r) for o in same):
            same.append(r)

    pooled = []
    for key, rs in groups.items():
        rs = sorted(rs, key=first)
        for a, b in zip(rs, rs[1:]):
            if first(a) + a["n"] > first(b):
                raise ValueError(f"{key}: two runs share seeds from {first(b)} on; pool disjoint runs only")
        seeds = [s for r in rs for s in range(first(r), first(r) + r["n"])]
        if len(rs) == 1:
            pooled.append(dict(rs[0], seeds=seeds))
            continue
        n = sum(r["n"] for r in rs)
        row = {"task": key[0], "context": key[1], "method": key[2], "first": first(rs[0]), "n": n, "seeds": seeds}
        row["accuracy"] = sum(r["accuracy"] * r["n"] for r in rs) / n
        row["accuracy_ci"] = list(wilson_interval(row["accuracy"], n))
        if all("scores" in r for r in rs):
            row["scores"] = [x for r in rs for x in r["scores"]]
        for k in ("agreement", "attn_rel_err", "kv_read_frac", "selected_frac", "rechecked_frac"):
            known = [r for r in rs if r.get(k) is not None]
            row[k] = sum(r[k] * r["n"] for r in known) / sum(r["n"] for r in known) if known else None
        pooled.append(row)
    return pooled


def accuracy(result: dict) -> str:
    """One row per (task, context): each method's accuracy, the full-attention interval, and the
    share of host KV each engine configuration read; then the check against full attention.
    Runs of one cell over disjoint seeds are pooled."""
    rows_in = pool(result["rows"])
    methods = list(dict.fromkeys(r["method"] for r in rows_in))
    engines = [m for m in methods if m != "full" and "@" not in m]  # not the oracles and peers at their reads
    cells: dict[tuple, dict] = {}
    for r in rows_in:
        cells.setdefault((r["task"], r["context"]), {})[r["method"]] = r
    for (task, context), by in cells.items():
        if "full" not in by:
            raise ValueError(
                f"the accuracy table compares each cell with full attention, and {task} at {context} has no full "
                "attention row (a run with --no-full: render it with a run of full attention's)"
            )
    others = [m for m in methods if m != "full"]
    # full attention over the prompts each configuration answered, per cell
    refs = {cell: {m: on_seeds(by["full"], r) for m, r in by.items()} for cell, by in cells.items()}
    header = ["task", "context", "prompts", "full [95%]"] + others
    measured = [e for e in engines if any(r["method"] == e and r.get("attn_rel_err") is not None for r in rows_in)]
    header += [f"{e}: read" for e in engines] + [f"{e}: attn err" for e in measured]
    rows, notes = [], []
    for (task, context), by in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        full, ref_of = by["full"], refs[(task, context)]
        lo, hi = full["accuracy_ci"]
        row = [
            task,
            context,
            full["n"],
            f"{100 * full['accuracy']:.1f} [{bound(lo, '.0f', 100)}, {bound(hi, '.0f', 100)}]",
        ]
        for m in others:
            r = by.get(m)
            if r is None:
                row.append("")
                continue
            ref = ref_of[m]
            part = "" if ref is full else f"; {r['n']} prompts"
            row.append(f"{100 * r['accuracy']:.1f} ({100 * (r['accuracy'] - ref['accuracy']):+.1f}{part})")
        ran = [e for e in engines if e in by]  # a cell may have run some configurations only
        row += [f"{100 * by[e]['kv_read_frac']:.1f}%" if e in by else "" for e in engines]
        row += [
            f"{by[e]['attn_rel_err']:.3f}" if e in by and by[e]["attn_rel_err"] is not None else "" for e in measured
        ]
        rows.append(row)
        for e in ran:
            acc, ref = by[e]["accuracy"], ref_of[e]
            if ref["accuracy"] >= 0.2 and ref["accuracy"] - acc > 0.02 + 1e-9:  # 0.96 - 0.94 is 0.02 and a hair
                notes.append(
                    f"{e}: {task} at {context} is {100 * (ref['accuracy'] - acc):.2f} points below full"
                )  # 2.04 is not 2.0
            if ref["accuracy_ci"][0] is not None and acc < ref["accuracy_ci"][0]:
                notes.append(f"{e}: {task} at {context} lies below full attention's 95% interval")
    n = sorted({r["n"] for r in rows_in})
    text = f"accuracy % (difference from full attention), n = {', '.join(map(str, n))} prompts per cell\n\n" + table(
        header, rows
    )
    text += "\n\n" + ("\n".join(f"- {x}" for x in notes) if notes else "- every cell within the targets")
    paired = paired_differences(cells, refs, others)
    peers = peer_differences(cells, [m for m in methods if "@" in m and not m.startswith("oracle")])
    return text + "".join("\n\n" + part for part in (paired, peers) if part)


def on_seeds(full: dict, row: dict) -> dict:
    """Full attention's pooled row over the prompts `row` answered: the whole cell, or where a
    configuration ran on part of it only, those prompts (so that both answer the same ones)."""
    if row["seeds"] == full["seeds"]:
        return full
    where = {s: i for i, s in enumerate(full["seeds"])}
    if "scores" not in full or any(s not in where for s in row["seeds"]):
        raise ValueError(f"{row['method']}: full attention has no scores for some of its prompts")
    scores = [full["scores"][where[s]] for s in row["seeds"]]
    acc = sum(scores) / len(scores)
    return dict(
        full,
        n=len(scores),
        seeds=row["seeds"],
        scores=scores,
        accuracy=acc,
        accuracy_ci=list(wilson_interval(acc, len(scores))),
    )


def paired_differences(cells: dict, refs: dict, methods: list[str]) -> str:
    """Each method's difference from full attention prompt by prompt (rows with per-prompt
    `scores`; refs: full attention's row over each method's prompts, see `on_seeds`): the mean
    with a 95% t interval, which is narrower than the two cells' intervals apart because both
    answer the same prompts; and of the prompts full attention scores on, how many the method
    scores as much on (full attention's answers kept)."""
    rows = []
    for (task, context), by in sorted(cells.items()):
        for m in methods:
            scores = by.get(m, {}).get("scores")
            full = refs[(task, context)].get(m, {}).get("scores")
            if scores is None or full is None:
                continue
            diff = [a - b for a, b in zip(scores, full)]
            mean, lo, hi = mean_interval(diff)
            better, worse = sum(d > 0 for d in diff), sum(d < 0 for d in diff)
            answered = [a >= b for a, b in zip(scores, full) if b > 0]
            kept = f"{sum(answered)} of {len(answered)}"
            rows.append(
                [task, context, m, f"{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]", better, worse, kept]
            )
    if not rows:
        return ""
    header = ["task", "context", "method", "minus full, points [95%]", "prompts better", "prompts worse"]
    header += ["full's answers kept"]
    return "paired with full attention, prompt by prompt\n\n" + table(header, rows)


def peer_differences(cells: dict, peers: list[str]) -> str:
    """Each engine configuration against the peers given its read share ("peer@configuration",
    bench.evals.peers), prompt by prompt: the configuration's accuracy minus the peer's, with a
    95% t interval, and whether it is ahead, level (the interval holds 0) or behind."""
    rows = []
    for (task, context), by in sorted(cells.items()):
        for m in peers:
            peer, name = m.split("@", 1)
            if "scores" not in by.get(m, {}) or "scores" not in by.get(name, {}) or by[m]["seeds"] != by[name]["seeds"]:
                continue
            diff = [a - b for a, b in zip(by[name]["scores"], by[m]["scores"])]
            mean, lo, hi = mean_interval(diff)
            verdict = "ahead" if lo > 0 else "behind" if hi < 0 else "level"
            read = f"{100 * by[m]['kv_read_frac']:.1f}%"
            cell = f"{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
            rows.append([task, context, name, peer, read, f"{100 * by[m]['accuracy']:.1f}", cell, verdict])
    if not rows:
        return ""
    header = ["task", "context", "configuration", "peer", "peer read", "peer %", "minus peer, points [95%]", ""]
    return "against published selection rules at the configuration's read share, prompt by prompt\n\n" + table(
        header, rows
    )


def ruler(results: list[dict]) -> str:
    """bench.evals.ruler's runs (a file per task or length, say) as the accuracy evaluation's
    tables: RULER's score for accuracy, its lengths for contexts, documents for prompts."""
    rows = []
    for r in (r for result in results for r in result["rows"]):
        row = {"task": r["task"], "context": int(r["metric"]) if r["metric"].isdigit() else r["metric"]}
        row |= {"method": r["method"], "n": r["n"], "accuracy": r["score"], "accuracy_ci": [r["low"], r["high"]]}
        row |= {"kv_read_frac": r.get("read_frac"), "rechecked_frac": r.get("rechecked_frac"), "attn_rel_err": None}
        rows.append(row | ({"scores": r["scores"]} if "scores" in r else {}))
    return accuracy({"rows": rows})


def bound(x: float | None, spec: str = ".3f", scale: float = 1.0) -> str:
    """An interval's bound as the tables show it: "n/a" where the JSON holds none (one prompt's interval)."""
    return "n/a" if x is None else format(scale * x, spec)


def fidelity(result: dict) -> str:
    """The fidelity report: mean over layers per configuration, then each layer."""
    summary = result["summary"]
    cfg = result["config"]
    head = ["configuration", "attention rel. error [95%]", "host KV read", "oracle, same read", "oracle + estimate"]
    rows = []
    for name, e in summary.items():
        m, lo, hi = e["err"]
        est = f"{e['oracle_est_err'][0]:.3f}" if "oracle_est_err" in e else ""
        rows.append(
            [
                name,
                f"{m:.3f} [{bound(lo)}, {bound(hi)}]",
                f"{100 * e['read'][0]:.2f}%",
                f"{e['oracle_err'][0]:.3f}",
                est,
            ]
        )
    names = list(summary)
    layer_rows = []
    for i in next(iter(summary.values()))["layers"]:
        row = [i]
        for n in names:
            d = summary[n]["layers"][i]
            est = f" / {d['oracle_est_err']:.3f}" if "oracle_est_err" in d else ""
            row.append(f"{d['err']:.3f} / {100 * d['read']:.1f}% / {d['oracle_err']:.3f}{est}")
        layer_rows.append(row)
    return (
        f"{cfg['prompts']} prompts of {cfg['context']} tokens, {cfg['steps']} decode steps each, every layer"
        + (f", the model in {cfg['dtype']}" if cfg.get("dtype", "float32") != "float32" else "")
        + "\n\n"
        + table(head, rows)
        + "\n\nper layer: error / read / oracle / oracle + estimate\n\n"
        + table(["layer"] + names, layer_rows)
    )


def fidelity_lengths(results: list[dict]) -> str:
    """Fidelity runs at several context lengths (one JSON file each) as one table, by length."""
    head = ["context", "RoPE", "prompts", "configuration", "attention rel. error [95%]", "host KV read"]
    head += ["oracle, same read", "oracle + estimate"]
    rows = []
    for result in sorted(results, key=lambda r: r["config"]["context"]):
        cfg = result["config"]
        stretch = f"YaRN x{cfg['rope_scale']:g}" if cfg.get("rope_scale") else "as trained"
        for name, e in result["summary"].items():
            m, lo, hi = e["err"]
            est = f"{e['oracle_est_err'][0]:.3f}" if "oracle_est_err" in e else ""
            read, oracle = f"{100 * e['read'][0]:.2f}%", f"{e['oracle_err'][0]:.3f}"
            rows.append(
                [
                    cfg["context"],
                    stretch,
                    cfg["prompts"],
                    name,
                    f"{m:.3f} [{bound(lo)}, {bound(hi)}]",
                    read,
                    oracle,
                    est,
                ]
            )
    return table(head, rows)


def generation(result: dict) -> str:
    cfg = result["config"]
    head = [
        "configuration",
        "free-running agreement",
        "first difference (token)",
        "teacher-forced agreement",
        "host KV read",
        "steps re-checked",
    ]
    rows = []
    for name, e in result["summary"].items():
        cell = [
            f"{v[0]:.3f} [{bound(v[1])}, {bound(v[2])}]" if v else "not run"
            for v in (e["free_agreement"], e.get("forced_agreement"))
        ]
        first, read = e["first_difference"], e.get("kv_read_frac")  # runs before the read share was kept: blank
        read = f"{100 * read[0]:.2f}%" if read else ""
        rechecked = e.get("rechecked_frac")  # runs before the near ties' re-check: blank
        rechecked = f"{100 * rechecked[0]:.2f}%" if rechecked else ""
        rows.append(
            [
                name,
                cell[0],
                f"{first[0]:.0f} [{bound(first[1], '.0f')}, {bound(first[2], '.0f')}]",
                cell[1],
                read,
                rechecked,
            ]
        )
    return f"{cfg['prompts']} prompts of {cfg['context']} tokens, {cfg['new']} greedy tokens\n\n" + table(head, rows)


def prefill(result: dict) -> str:
    head = ["context", "case", "prefill s", "build after s", "first token s", "ratio to sdpa"]
    rows = [
        [r["context"], r["case"], f"{r['prefill_s']:.1f}", f"{r['build_after_s']:.1f}", f"{r['first_token_s']:.1f}"]
        + [f"{r['ratio_to_sdpa']:.2f}x"]
        for r in result["rows"]
    ]
    cfg = result["config"]
    return f"{cfg['model']}, {cfg['threads']} threads, median of {cfg['repeats']} runs\n\n" + table(head, rows)


def served(result: dict) -> str:
    """bench.speed.prefix --server: each HTTP request's seconds to its whole answer, and the tokens of its
    prompt it found in the server's kept cache (a document, or the turn before's prompt)."""
    head = ["request", "prompt tokens", "found kept", "seconds to the whole answer", "first token", "answer"]
    head.append("host rows read per step")
    rows = []
    for r in result["server"]:
        source = f"{r['kept']}, from its file" if r.get("loaded") else r["kept"]
        found = f"{r['reused_tokens']:,} ({source})" if r["reused_tokens"] else "none"
        answer = json.dumps(r["answer"], ensure_ascii=False)
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.2f} s"  # (a row of the Python API's: no request)
        rows.append([r["request"], f"{r['prompt_tokens']:,}", found, seconds])
        rows[-1] += [f"{r['first_token_s']:.2f} s", answer, f"{100 * r['kv_read_frac']:.2f}%"]
    cfg = result["config"]
    note = f"{cfg['model']}, a document of {cfg['context']} tokens, {cfg['threads']} threads; first token: the"
    return note + " prefill into the kept cache and the prompt's own, and the index builds\n\n" + table(head, rows)


def clients(result: dict) -> str:
    """bench.speed.serve: requests sent to the server, one at a time, in batches formed at the start, and
    joining running batches (prefilled a chunk a step, or whole), each round."""
    cfg = result["config"]
    first = cfg.get("ways", ["one at a time"])[0]
    head = ["way", "round", "seconds to the last answer", "tokens/s", "prefill s", "tokens/s after it"]
    head += ["mean seconds to a first token", "mean seconds per request", "longest wait between pieces (mean, most)"]
    head += ["most decoded together", f"answers as {first}"]
    rows = []
    for r in result["runs"]:
        sizes = ", ".join(map(str, sorted(r["batches"])))
        rows.append([r["way"], r["round"], f"{r['wall_s']:.2f}", f"{r['tokens_per_s']:.1f}"])
        rows[-1] += [f"{r['prefill_s']:.1f}", f"{r['decode_tokens_per_s']:.1f}"]
        rows[-1] += [f"{r['mean_first_token_s']:.2f}", f"{r['mean_request_s']:.2f}"]
        gaps = f"{r['mean_longest_gap_s']:.2f}, {r['longest_gap_s']:.2f}" if "longest_gap_s" in r else "n/a"
        rows[-1] += [gaps, sizes, f"{r['same_answers']} of {len(r['answers'])}"]
    sent = f"one every {cfg['stagger']:g} s" if cfg.get("stagger") else "at once"
    note = f"{cfg['model']}, {cfg['clients']} clients sent {sent}, prompts of {cfg['context']} tokens, "
    note += f"{cfg['new_tokens']} greedy tokens each, {cfg['threads']} threads, max_batch {cfg['max_batch']}"
    note += f", prefill_chunk {cfg['prefill_chunk']}; " if "prefill_chunk" in cfg else "; "
    speed = [f"{way} {s['speed_up']}x" for way, s in result["summary"].items() if "speed_up" in s]
    waits = [
        f"{way} {s['mean_first_token_s']:.1f} s and {s['mean_request_s']:.1f} s" for way, s in result["summary"].items()
    ]
    if speed:  # other ways than the first: each one's speed against it
        note += f"against {first} (median seconds to the last answer): " + ", ".join(speed) + "; "
    note += "a request's mean seconds to its first token and to its answer (medians of the rounds): "
    note += ", ".join(waits)
    return note + "\n\n" + table(head, rows)


def soak(result: dict, every: int = 500) -> str:
    """The soak's checks at the first window and every `every` steps, and its verdicts."""
    head = ["step", "tokens", "host tokens", "invariants", "recall of added keys", "median step ms"]
    rows = []
    for c in result["checks"]:
        if c is result["checks"][0] or c["step"] % every == 0:
            held = all(c[k] for k in ("conservation", "device_bytes_constant", "host_growth_exact"))
            rows.append(
                [c["step"], c["seq_len"], c["host_tokens"], "hold" if held else "FAIL"]
                + ["n/a" if c["recall_added"] is None else f"{c['recall_added']:.2f}", f"{c['median_step_ms']:.0f}"]
            )
    verdict = (
        f"every check held: {result['all_ok']}; step time last/first window {result['step_time_drift']:.2f}; "
        f"after an interrupted generation: threads left {len(result['interrupt']['threads_left'])}, "
        f"same text on the next call {result['interrupt']['same_text_after']}"
    )
    return table(head, rows) + "\n\n" + verdict


def throughput(result: dict) -> str:
    """Per (model, context): tokens/s of update + attention per layer (and of the whole model)
    against batch size, the engine beside full attention, and their ratio."""
    out = []
    for model, context in sorted({(c["model"], c["context"]) for c in result["cases"]}):
        cases = {
            (c["batch"], c["method"]): c for c in result["cases"] if (c["model"], c["context"]) == (model, context)
        }
        batches = sorted({b for b, _ in cases})
        head = [
            "batch",
            "engine attn tok/s",
            "full attn tok/s",
            "engine / full",
            "engine model tok/s",
            "full model tok/s",
        ]
        rows = []
        for b in batches:
            e, f = cases.get((b, "hybrid")), cases.get((b, "full-sdpa"))
            rows.append(
                [
                    b,
                    f"{e['attn_tokens_per_s']:.1f}" if e else "n/a",
                    f"{f['attn_tokens_per_s']:.2f}" if f else "n/a",
                    f"{e['attn_tokens_per_s'] / f['attn_tokens_per_s']:.1f}x" if e and f else "n/a",
                    f"{e['model_tokens_per_s']:.2f}" if e else "n/a",
                    f"{f['model_tokens_per_s']:.2f}" if f else "n/a",
                ]
            )
        one = cases.get((1, "hybrid"))
        scaling = ", ".join(
            f"batch {b}: {cases[(b, 'hybrid')]['attn_tokens_per_s'] / one['attn_tokens_per_s']:.2f}x"
            for b in batches
            if one and b > 1 and (b, "hybrid") in cases
        )
        out.append(
            f"**{model}**, {context} tokens per sequence\n\n"
            + table(head, rows)
            + (f"\n\nengine attention tokens/s against its batch 1: {scaling}" if scaling else "")
        )
    return "\n\n".join(out)


def margin_rows(per_prompt: list[dict], margins: list[float]) -> list[dict]:
    """recheck_margins.py's steps pooled over prompts, per margin: the share re-checked (gap
    below the margin), the differing picks inside it out of all, and the implied reads per
    step (the selection's share + one read of every host token per re-check); first (margin
    None) the same for re-checking the differing steps alone, what no margin can beat. Where
    the steps ran wider first at near ties ("widened", per step), only those may re-check,
    their gaps are the wider run's and the reads start from the step's with the wider runs."""
    gaps = [g for p in per_prompt for g in p["gaps"]]
    differs = [d for p in per_prompt for d in p["differs"]]
    eligible = [w for p in per_prompt for w in p.get("widened", [True] * len(p["gaps"]))]
    n = max(len(gaps), 1)
    base = "read_frac" if all("read_frac" in p for p in per_prompt) else "selected_frac"
    selected = sum(p[base] * len(p["gaps"]) for p in per_prompt) / n

    def row(margin, rechecked: int, caught: int) -> dict:
        share = rechecked / n
        return {
            "margin": margin,
            "rechecked": share,
            "caught": caught,
            "differs": sum(differs),
            "read": selected + share,
        }

    rows = [row(None, sum(differs), sum(differs))]
    for m in margins:
        under = [w and g < m for g, w in zip(gaps, eligible)]
        rows.append(row(m, sum(under), sum(d and u for u, d in zip(under, differs))))
    return rows


def margins(result: dict) -> str:
    c, rows = result["config"], result["margins"]
    steps = sum(len(p["gaps"]) for p in result["per_prompt"])
    selected = rows[0]["read"] - rows[0]["rechecked"]
    source = f"prose from token {c['offset']:,}" if c["source"] == "prose" else c["source"]
    head = f"{source}, {c['context']} tokens, {c['prompts']} prompts, {steps} steps teacher-forced, "
    widen = c.get("widen")
    if widen and widen > 1:
        alone = sum(p["selected_frac"] * len(p["gaps"]) for p in result["per_prompt"]) / max(steps, 1)
        head += f"read {selected:.1%} per step with a wider run (x{widen:g}) at each gap under "
        head += f"{c['first_margin']:g} (selection alone {alone:.1%}); margins on the wider run's gap\n\n"
    else:
        head += f"selection read {selected:.1%} per step\n\n"
    body = [
        [
            "differing steps alone" if r["margin"] is None else f"{r['margin']:g}",
            f"{r['rechecked']:.2%}",
            f"{r['caught']} of {r['differs']}",
            f"{r['read']:.1%}",
        ]
        for r in rows
    ]
    return head + table(["re-checked", "steps re-checked", "differing picks caught", "host KV read per step"], body)


def let_go(result: dict) -> str:
    """bench.speed.leave: how soon the server lets go of a request whose client left, or when it stops."""
    cfg, summary = result["config"], result["summary"]
    cases = [case for case in summary if not case.startswith(("next request", "prompt "))]
    head = ["case", "seconds (median)", "each round"]
    rows = [
        [case, f"{summary[case]:.2f}", ", ".join(f"{r['seconds']:.2f}" for r in result["runs"] if r["case"] == case)]
        for case in cases
    ]
    tokens, first = summary.get("prompt tokens", cfg["context"]), summary["prompt first token"]
    note = f"{cfg['model']}, a prompt of {tokens} tokens (first token at {first:.2f} s"
    note += f" alone), up to {cfg['new_tokens']} new tokens, prefill_chunk {cfg['prefill_chunk']}, {cfg['threads']}"
    note += " threads; a client that leaves: the seconds until the next request is answered (alone: "
    note += f"{summary['next request alone']:.2f} s); a stop: the seconds the server takes to close"
    return note + "\n\n" + table(head, rows)


RENDERERS = {
    "kernel": kernel,
    "decode": decode,
    "fidelity": fidelity,
    "generation": generation,
    "prefill": prefill,
    "soak": soak,
    "throughput": throughput,
    "margins": margins,
    "served": served,
    "clients": clients,
    "let_go": let_go,
}
# renderers of several JSON files: the accuracy rows pooled, fidelity runs side by side, RULER's tasks together
MANY_FILES = {
    "eval": lambda results: accuracy({"rows": [r for result in results for r in result["rows"]]}),
    "fidelity_lengths": fidelity_lengths,
    "ruler": ruler,
}
