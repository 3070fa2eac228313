"""Accuracy of the hybrid engine against full attention, on long-context tasks generated locally.

For each task (passkey, RULER-style needles, variable tracking), context length
and prompt, the prompt is prefilled once (the engine's prefill is exact), the
state is copied into a full-attention cache and into one hybrid cache per
engine configuration, and each answers greedily. Per (task, context, method):
accuracy (exact string match), agreement (the share of full attention's answer
tokens that the method reproduces at the same position), attn_rel_err (mean
relative error of the decode attention output against exact attention over
every position, on a sample of layers), kv_read_frac (host tokens read per
step / host tokens).

    python bench/eval_accuracy.py [--quick] [--json PATH] [--n N] [--contexts ...] [--tasks ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import HybridCache, OffloadConfig  # noqa: E402
from engine.api import eos_ids, prefill  # noqa: E402
from engine.attention import hybrid_attention_forward  # noqa: E402
from engine.cache import HybridLayer  # noqa: E402
from engine.merge import attend  # noqa: E402
from engine.models import load_model  # noqa: E402
from engine.tasks import TASKS, make_sample, score  # noqa: E402

CONFIGS = {"hybrid-default": OffloadConfig(), "hybrid-tight": OffloadConfig.preset("tight")}
MAX_NEW = {"passkey": 8, "niah_single": 12, "niah_multikey": 12, "niah_multivalue": 40, "variable_tracking": 30}
EVAL_ATTENTION = "hybrid_eval"


class AttentionError:
    """Relative error of the engine's decode attention output against exact
    attention over every position, accumulated on a sample of layers."""

    def __init__(self, layers: set[int]):
        self.layers, self.errors = layers, []

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        out, w = hybrid_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if isinstance(key, HybridLayer) and query.shape[2] == 1 and key.layer_idx in self.layers:
            k, v = key.ordered_kv()
            q = query[0].view(key.n_kv_heads, key.group, 1, -1)
            exact, _ = attend(q, k, v, scaling if scaling is not None else q.shape[-1] ** -0.5)
            exact = exact.reshape(1, -1, 1, q.shape[-1]).transpose(1, 2)  # [1, 1, Hq, D]
            self.errors.append(float((out.float() - exact).norm() / exact.norm()))
        return out, w


def copy_state(src: HybridCache, model, cfg: OffloadConfig | None) -> HybridCache | DynamicCache:
    """The same positions' K/V in a full-attention DynamicCache (cfg None), or in a hybrid
    cache with `cfg`, which must keep the source's sinks, window and method: its host
    indexes are then the source's, copied rather than built again."""
    if cfg is not None:
        src_cfg = src.offload_config
        if (cfg.n_sink, cfg.window, cfg.method) != (src_cfg.n_sink, src_cfg.window, src_cfg.method):
            raise ValueError("evaluated engine configurations must share sinks, window and method with the first one")
    dst = DynamicCache() if cfg is None else HybridCache(model, cfg, progress=False)
    with torch.no_grad():
        for i, layer in enumerate(src.layers):
            k, v = layer.ordered_kv()
            if cfg is None:
                dst.update(k[None], v[None], i)
            else:
                dst.layers[i].update(k[None], v[None])
                dst.layers[i].key_index = copy.deepcopy(layer.key_index)
                dst.layers[i].n_indexed = layer.n_indexed
    return dst


@torch.inference_mode()
def greedy(model, cache, logits, max_new: int, eos: set[int], stats: list | None = None) -> list[int]:
    tokens = []
    for step in range(max_new):
        token = int(logits.argmax())
        tokens.append(token)
        if token in eos or step == max_new - 1:
            break
        logits = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1]
        if stats is not None:
            stats.append(cache.step_stats()["kv_read_frac"])
    return tokens


def evaluate(model, tok, sample, max_new, chunk, probe: AttentionError) -> dict[str, dict]:
    ids = tok(sample.prompt, return_tensors="pt").input_ids
    eos = eos_ids(model)
    model.set_attn_implementation("hybrid")
    with torch.inference_mode():
        source = HybridCache(model, CONFIGS["hybrid-default"], progress=False)
        logits = prefill(model, ids, source, chunk, progress=False)
        source.build_indexes()
        caches = {name: copy_state(source, model, cfg) for name, cfg in CONFIGS.items()}
        full_cache = copy_state(source, model, None)
    del source
    model.set_attn_implementation("sdpa")
    full = greedy(model, full_cache, logits, max_new, eos)
    results = {"full": {"tokens": full, "kv_read_frac": 1.0, "attn_rel_err": 0.0}}
    model.set_attn_implementation(EVAL_ATTENTION)
    for name, cache in caches.items():
        probe.errors.clear()
        read = []
        tokens = greedy(model, cache, logits, max_new, eos, read)
        results[name] = {
            "tokens": tokens,
            "kv_read_frac": statistics.mean(read) if read else 0.0,
            "attn_rel_err": statistics.mean(probe.errors) if probe.errors else 0.0,
        }
    model.set_attn_implementation("hybrid")
    for r in results.values():
        r["text"] = tok.decode(r["tokens"], skip_special_tokens=True)
        r["accuracy"] = score(sample, r["text"])
        r["agreement"] = sum(a == b for a, b in zip(r["tokens"], full)) / len(full)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 prompts per cell, 2K tokens, two tasks")
    p.add_argument("--json", type=Path)
    p.add_argument("--n", type=int, help="prompts per (task, context); default 20 (--quick: 2)")
    p.add_argument("--contexts", type=int, nargs="+", help="default 2048 4096 8192 (--quick: 2048)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, help="default: all (--quick: passkey niah_single)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk")
    args = p.parse_args(argv)
    args.n = args.n or (2 if args.quick else 20)
    args.contexts = args.contexts or ([2048] if args.quick else [2048, 4096, 8192])
    args.tasks = args.tasks or (["passkey", "niah_single"] if args.quick else list(TASKS))
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.model, attn_implementation="hybrid")
    n_layers = model.config.num_hidden_layers
    probe = AttentionError({0, n_layers // 2, n_layers - 1})
    AttentionInterface.register(EVAL_ATTENTION, probe)

    # shortest contexts first: an interrupted run has covered every task at those
    cells = [(t, c) for c in sorted(args.contexts) for t in args.tasks]
    rows, started = [], time.perf_counter()
    bar = tqdm(total=len(cells) * args.n, desc="prompts", unit="prompt")
    for task, context in cells:
        per_method: dict[str, list[dict]] = {}
        for i in range(args.n):
            sample = make_sample(task, context, tok, seed=i, depth=(i + 0.5) / args.n)
            for name, r in evaluate(model, tok, sample, MAX_NEW[task], args.chunk, probe).items():
                per_method.setdefault(name, []).append(r)
            bar.update(1)
        for method, rs in per_method.items():
            row = {"task": task, "context": context, "method": method, "n": len(rs)}
            for key in ("accuracy", "agreement", "attn_rel_err", "kv_read_frac"):
                row[key] = round(statistics.mean(r[key] for r in rs), 4)
            rows.append(row)
            bar.write(json.dumps(row))
        if args.json:  # after every cell, so that an interrupted run keeps what it measured
            write_json(args, rows, time.perf_counter() - started)
    bar.close()


def write_json(args, rows: list[dict], seconds: float) -> None:
    config = {
        "model": args.model,
        "threads": args.threads,
        "n": args.n,
        "contexts": args.contexts,
        "tasks": args.tasks,
        "engine_configs": {k: v.__dict__ for k, v in CONFIGS.items()},
        "seconds": round(seconds, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": config, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
