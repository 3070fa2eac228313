"""Recall@k against the share of keys scanned, on real queries and keys of the bundled model.

For each captured layer and KV head: every index is built on the keys of the
first N positions, with the queries of those positions (all query heads of the
group) as build queries, then searched once per decode position with the G
query vectors of the next T positions (never seen at build). Recall is
against the exact top-k of q · k per query head; `scanned_frac` counts every
vector scored per query head (keys, centroids, landmarks, build queries) over
N, and `keys_frac` the keys alone. Search-time settings (ef, nprobe, probes,
block share) are swept on one build, so each index gives a curve.

The queries and keys are a capture of bench.evals.capture_qk, cached: a first run
prefills the model over the capture's tokens (34K for a full run) to make it.

    python -m bench.evals.ann_recall [--quick] [--json PATH] [--plot PATH] [--capture NPZ] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from ann.registry import make_index
from ann.selector import search_group
from bench.common.options import (
    OneLineParser,
    add_model_args,
    add_output_args,
    add_threads_arg,
    pin_threads,
    positive_int,
    prog,
)
from bench.common.output import pyplot, save_figure, write_json
from bench.evals.capture_qk import capture_path, load_or_capture
from engine.cli import run_script

FULL = {"tokens": 34000, "layers": [5, 11, 17], "n_keys": [8192, 16384, 32768], "decode": 64}
QUICK = {"tokens": 8400, "layers": [5, 17], "n_keys": [8192], "decode": 32}


def sweeps(n: int, quick: bool) -> list[tuple[str, dict, str, list]]:
    """(label, build params, swept attribute path, values) per index; ordered cheap to dear."""
    nlist = int(min(1024, max(16, 1.5 * np.sqrt(n))))
    cases = [
        ("ivf", {"nlist": nlist}, "nprobe", [1, 2, 4, 8, 16] if quick else [1, 2, 4, 6, 8, 12, 16, 24, 32]),
        (
            "hnsw",
            {"M": 32, "ef_construction": 128},
            "ef",
            [100, 200, 400] if quick else [100, 150, 200, 300, 400, 600, 800],
        ),
        ("graph", {}, "ef", [100, 160, 256] if quick else [100, 128, 160, 200, 224, 256, 320, 400]),
        ("qq", {}, "n_neighbors", [8, 16, 32] if quick else [4, 8, 16, 24, 32, 48, 64]),
        (
            "block",
            {"landmark": "mean"},
            "frac",
            [0.01, 0.025, 0.05] if quick else [0.01, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075],
        ),
        ("block", {"landmark": "minmax"}, "frac", [0.025, 0.05] if quick else [0.01, 0.025, 0.05, 0.075]),
        (
            "hybrid",
            {"qq": {"n_neighbors": 16}},
            "block.frac",
            [0.01, 0.025] if quick else [0.005, 0.01, 0.015, 0.02, 0.025],
        ),
    ]
    if not quick:
        cases += [
            ("hybrid", {"qq": {"n_neighbors": 32}}, "block.frac", [0.005, 0.01, 0.015, 0.02, 0.025]),
            ("union", {"selectors": [("block", {"frac": 0.01}), ("graph", {})]}, "graph.ef", [100, 128, 160, 200, 256]),
        ]
    return cases


def _set(index, path: str, value) -> dict:
    """Set a search-time parameter (`block.frac` reaches into a union's block selector)."""
    if "." in path:
        kind, attr = path.split(".")
        for s in index.selectors:
            if type(s).__name__.lower().startswith(kind):
                setattr(s, attr, value)
    else:
        setattr(index, path, value)
    return {path: value}


def run_case(label, params, attr, values, keys, bq, dq, truth, k, meta):
    """Build one index, sweep one search parameter; one JSON row per value."""
    dim = keys.shape[1]
    idx = make_index(label, dim, **params)
    t0 = time.perf_counter()
    idx.build(keys, bq)
    build_s = time.perf_counter() - t0
    rows = []
    for v in values:
        _set(idx, attr, v)
        search_group(idx, dq[0], k)  # warm-up (and numba compile on a first run)
        rec, scanned, keys_scored, times = [], 0, 0, []
        for t in range(len(dq)):  # one decode step: the G query heads of this KV head
            t1 = time.perf_counter()
            res = search_group(idx, dq[t], k)
            times.append(time.perf_counter() - t1)
            scanned += res.scanned
            keys_scored += res.keys_scored
            for g in range(len(dq[t])):
                got = res.ids[g][res.ids[g] >= 0]
                rec.append(len(np.intersect1d(got, truth[t, g])) / k)
        n_q = dq.shape[0] * dq.shape[1]
        name = label + ("-" + params["landmark"] if "landmark" in params else "")
        name += "-qq" + str(params["qq"]["n_neighbors"]) if "qq" in params else ""
        name += "-" + "+".join(s for s, _ in params["selectors"]) if "selectors" in params else ""
        rows.append(
            dict(
                meta,
                index=name,
                k=k,
                recall=float(np.mean(rec)),
                recall_min_head=float(np.min(np.mean(np.reshape(rec, (len(dq), -1)), 0))),
                scanned_frac=scanned / (n_q * len(keys)),
                keys_frac=keys_scored / (n_q * len(keys)),
                build_s=build_s,
                search_ms=1e3 * float(np.median(times)),
                params={**{a: b for a, b in params.items()}, attr: v},
            )
        )
    return rows


def exact_truth(keys: np.ndarray, dq: np.ndarray, k: int) -> np.ndarray:
    """dq [T, G, D] -> exact top-k ids [T, G, k]."""
    s = dq.reshape(-1, dq.shape[-1]) @ keys.T
    ids = np.argpartition(-s, k - 1, axis=1)[:, :k]
    return ids.reshape(dq.shape[0], dq.shape[1], k)


def at_budget(pts: list[tuple], budget: float, col: int = 0) -> str:
    """Best mean recall among settings whose mean cost (column col) is within budget."""
    ok = [p for p in pts if p[col] <= budget]
    if not ok:
        return "   -  "
    best = max(ok, key=lambda p: p[2])
    return f"{best[2]:.3f} (min head {best[3]:.3f})"


def to_reach(pts: list[tuple], target: float, col: int = 0) -> str:
    ok = [p for p in pts if p[2] >= target]
    return (
        f"{100 * min(p[col] for p in ok):.2f}%" if ok else f"not reached (best {max(p[2] for p in pts):.4f})"
    )  # 0.9496 is not 0.950


def summarize(rows: list[dict]) -> list[str]:
    """Per index and setting, means over (layer, KV head) at the largest N; then the target figures."""
    out = []
    by = {}
    for r in rows:
        if r["n_keys"] == max(x["n_keys"] for x in rows):
            by.setdefault((r["index"], json.dumps(r["params"], sort_keys=True)), []).append(r)
    curves = {}
    for (name, p), rs in by.items():
        curves.setdefault(name, []).append(
            (
                np.mean([r["scanned_frac"] for r in rs]),
                np.mean([r["keys_frac"] for r in rs]),
                np.mean([r["recall"] for r in rs]),
                min(r["recall"] for r in rs),
                p,
                np.mean([r["build_s"] for r in rs]),
                np.mean([r["search_ms"] for r in rs]),
            )
        )
    n = max(r["n_keys"] for r in rows)
    out.append(
        f"N = {n}, k = {rows[0]['k']}, means over {len({(r['layer'], r['kv_head']) for r in rows})} (layer, KV head); "
        "scanned = every vector scored per query head / N (keys, centroids, landmarks, build queries); "
        "keys = keys alone; min = worst (layer, head)"
    )
    out.append(
        f"{'index':22s} {'scanned':>8s} {'keys':>7s} {'recall':>7s} {'min':>6s} "
        f"{'build_s':>8s} {'search_ms':>9s}  params"
    )
    for name, pts in curves.items():
        for sf, kf, rc, mn, p, b, ms in sorted(pts):
            out.append(f"{name:22s} {sf:8.4f} {kf:7.4f} {rc:7.4f} {mn:6.3f} {b:8.2f} {ms:9.2f}  {p}")
    out.append("")
    out.append(
        f"{'index':22s} {'recall, scanned<=4%':>26s} {'recall, scanned<=5%':>26s} {'recall, keys<=4%':>26s}  "
        "scanned for 0.95 / keys for 0.95"
    )
    for name, pts in curves.items():
        if name == "flat":
            continue
        out.append(
            f"{name:22s} {at_budget(pts, 0.04):>26s} {at_budget(pts, 0.05):>26s} {at_budget(pts, 0.04, 1):>26s}  "
            f"{to_reach(pts, 0.95)} / {to_reach(pts, 0.95, 1)}"
        )
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Recall vs cost at the largest N: all vectors scored (left) and keys alone (right)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plt = pyplot()

    n = max(r["n_keys"] for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    names = sorted({r["index"] for r in rows if r["index"] != "flat"})
    for ax, col, label in ((axes[0], "scanned_frac", "all vectors scored"), (axes[1], "keys_frac", "keys scored")):
        for name in names:
            pts = {}
            for r in rows:
                if r["index"] == name and r["n_keys"] == n:
                    pts.setdefault(json.dumps(r["params"], sort_keys=True), []).append((r[col], r["recall"]))
            xy = sorted((np.mean([a for a, _ in v]), np.mean([b for _, b in v])) for v in pts.values())
            ax.plot([100 * x for x, _ in xy], [y for _, y in xy], marker="o", ms=3, label=name)
        ax.axhline(0.95, color="gray", ls=":")
        ax.set_xscale("log")
        lim = ax.get_xlim()
        ax.set_xticks([0.5, 1, 2, 3, 5, 10, 20, 50, 100])
        ax.set_xlim(lim)  # the ticks must not widen the axis
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{label} per query head (% of N)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"recall@{rows[0]['k']}")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"N = {n} keys, mean over captured layers and KV heads")
    save_figure(fig, path, dpi=110)


def main(argv=None) -> None:
    ap = OneLineParser(prog=prog(__spec__), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_args(ap, quick="one N, fewer settings", plot="recall against the share scanned (PNG)")
    add_model_args(ap, chunk=None)
    ap.add_argument(
        "--capture", type=Path, help="a .npz from bench.evals.capture_qk (default: cached by model/tokens/layers)"
    )
    ap.add_argument("--n-keys", type=positive_int, nargs="+")
    labels = ["flat", *dict.fromkeys(label for label, *_ in sweeps(8192, quick=True))]
    ap.add_argument("--indexes", nargs="+", choices=labels, metavar="INDEX", help=f"only these: {', '.join(labels)}")
    ap.add_argument("--k", type=positive_int, default=100)
    add_threads_arg(ap, default=2)
    ap.add_argument("--from-json", type=Path, help="summarise and plot an earlier run's JSON instead of running")
    args = ap.parse_args(argv)
    if args.from_json:
        rows = json.loads(args.from_json.read_text()).get("rows")
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"--from-json: {args.from_json} holds no rows of this benchmark")
        print("\n".join(summarize(rows)))
        if args.plot:
            plot(rows, args.plot)
        return

    cfg = QUICK if args.quick else FULL
    pin_threads(args.threads)
    capture = args.capture
    full_path = capture_path(args.model, FULL["tokens"], FULL["layers"])
    if capture is None and args.quick and full_path.exists():
        capture = full_path  # causal prefill: the full capture's prefix is the quick one
    data, path = load_or_capture(args.model, cfg["tokens"], cfg["layers"], out=capture)
    if args.quick:
        data = {k: v for k, v in data.items() if k[:2] not in ("q_", "k_") or int(k[2:]) in cfg["layers"]}
        data["layers"] = np.array([x for x in data["layers"] if x in cfg["layers"]])
    layers = [int(x) for x in data["layers"]]
    print(
        f"capture {path.name}: {int(data['n_tokens'])} tokens, layers {layers}; threads {args.threads}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    rows = []
    for n in args.n_keys or cfg["n_keys"]:
        for layer in layers:
            q, kk = data[f"q_{layer}"], data[f"k_{layer}"]  # [Hq, T, D], [Hkv, T, D] float16
            hkv, g = kk.shape[0], q.shape[0] // kk.shape[0]
            if n + cfg["decode"] > kk.shape[1]:
                raise ValueError(
                    f"N = {n} plus {cfg['decode']} decode positions exceeds the capture's {kk.shape[1]} tokens"
                )
            for h in range(hkv):
                keys = kk[h, :n].astype(np.float32)  # [N, D]
                grp = q[h * g : (h + 1) * g].astype(np.float32)  # [G, T, D]
                bq = grp[:, :n].reshape(-1, grp.shape[-1])  # [G·N, D] build queries
                dq = np.ascontiguousarray(grp[:, n : n + cfg["decode"]].transpose(1, 0, 2))  # [T_dec, G, D]
                truth = exact_truth(keys, dq, args.k)
                meta = {"layer": layer, "kv_head": h, "n_keys": n}
                cases = [("flat", {}, "chunk", [65536])] + sweeps(n, args.quick)
                for label, params, attr, values in cases:
                    if args.indexes and label not in args.indexes:
                        continue
                    rs = run_case(label, params, attr, values, keys, bq, dq, truth, args.k, meta)
                    rows += rs
                    print(
                        f"N={n} L{layer} h{h} {rs[0]['index']:12s} build {rs[0]['build_s']:6.2f}s  "
                        + "  ".join(f"{r['recall']:.3f}@{100 * r['scanned_frac']:.2f}%" for r in rs),
                        flush=True,
                    )
    n_max = max(r["n_keys"] for r in rows)
    if "tokens_at" in data:  # per-layer prefill time of the first n_max tokens
        prefill_n = float(np.interp(n_max, data["tokens_at"], data["layer_s_at"]))
    else:
        prefill_n = float("nan")
    prefill = float(data["prefill_s_per_layer"])
    lines = summarize(rows)
    graph_build = [
        r["build_s"] for r in rows if r["index"] == "graph" and r["n_keys"] == max(x["n_keys"] for x in rows)
    ]
    if graph_build:
        lines.append(
            f"graph build per (layer, KV head) at N = {n_max}: {np.mean(graph_build):.2f} s "
            f"(max {np.max(graph_build):.2f}); model prefill per layer: {prefill_n:.2f} s for the first {n_max} "
            f"tokens, {prefill:.2f} s for all {int(data['n_tokens'])}"
        )
    print("\n".join(lines))
    if args.json:
        result = {
            "capture": path.name,
            "n_tokens": int(data["n_tokens"]),
            "prefill_s_per_layer": prefill,
            "prefill_s_per_layer_at_n": prefill_n,
            "threads": args.threads,
            "rows": rows,
            "summary": lines,
        }
        write_json(args.json, result)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    run_script(main)
