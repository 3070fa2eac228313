"""Long-run soak: many decode steps after a long prompt, with the engine's invariants
checked every `--every` steps, against exact attention (the key index's recall) and
against the run's own first steps (step time).

The bundled model continues a prompt of natural text (the model's own greedy tokens,
EOS ignored). Every `--every` steps, on every layer:

    conservation   every position < seq_len is in exactly one of sinks, window, host
    device bytes   what the cache holds on the device does not change
    host bytes     the host K/V in use grew by exactly the tokens evicted since the last check
    added keys     of the 20 host tokens the current query weighs most (exactly), the share
                   the key index proposes, for those added during decode and for the prompt's
and over the run:
    step time      the median of the last `--every` steps within 1.2x of the first `--every`

Then an interrupted generation (an exception raised by the stream's consumer) must leave
no thread behind and the model's next generation equal to a fresh one. Exit status 1
when a check fails.

    python -m bench.evals.soak [--quick] [--json PATH] [--prompt-tokens 4096] [--steps 2000] [--every 100]
"""

from __future__ import annotations

import json
import statistics
import threading
import time

import numpy as np
import torch
from transformers import AttentionInterface

from bench.common import options
from bench.common.output import write_json
from bench.common.text import segments
from engine import HybridCache, OffloadConfig
from engine.api import HybridLLM, prefill
from engine.attention import hybrid_attention_forward
from engine.cache import HybridLayer
from engine.cli import run_script
from engine.decode.select import candidates

PROBE = "hybrid_soak"
DRIFT = 1.2


class QueryRecorder:
    """Attention function that keeps the last decode query of every layer ([Hkv, G, D] on the CPU)."""

    def __init__(self):
        self.last: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        if isinstance(key, HybridLayer) and query.shape[2] == 1:
            self.last[key.layer_idx] = query[0, :, 0].float().cpu().view(key.n_kv_heads, key.group, -1)
        return hybrid_attention_forward(module, query, key, value, attention_mask, **kwargs)


def used_host_bytes(cache: HybridCache) -> int:
    """Host K/V bytes in use (not capacity): the rows the stores hold."""
    return sum(2 * layer.host.keys.nbytes for layer in cache.layers)


def recall_by_age(layer: HybridLayer, q: torch.Tensor, split: int, k: int = 20) -> tuple:
    """Of the k host tokens that q [Hkv, G, D] weighs most (exactly, summed over the group),
    the share among the step's candidates (engine.decode.select.candidates): (for those added
    during decode, ids >= split; for the prompt's), each None when there are none. Tokens
    newer than the index, which every step reads, are left out."""
    n = layer.n_indexed
    if layer.key_index is None or n < k:
        return None, None
    keys = layer.host.keys[:, :n].float()  # [Hkv, n, D]
    weight = torch.softmax(torch.einsum("hgd,hnd->hgn", q, keys) * layer.head_dim**-0.5, dim=-1).sum(1)
    best = weight.topk(k, dim=1).indices  # [Hkv, k]
    found = candidates(layer, q.to(layer.device), q.reshape(-1, q.shape[-1]).numpy())
    hit = torch.stack([torch.from_numpy(np.isin(best[h].numpy(), found[h].numpy())) for h in range(len(best))])
    added = best >= split
    return _share(hit[added]), _share(hit[~added])


def _share(hits: torch.Tensor):
    return float(hits.float().mean()) if hits.numel() else None


@torch.inference_mode()
def soak(llm: HybridLLM, ids: torch.Tensor, steps: int, every: int) -> dict:
    model, cfg = llm.model, llm.offload
    recorder = QueryRecorder()
    AttentionInterface.register(PROBE, recorder)
    cache = HybridCache(model, cfg, max_length=ids.shape[1] + steps + 1, progress=False)
    logits = prefill(model, ids, cache, cfg.prefill_chunk, progress=False)
    cache.build_indexes()
    prompt_host = [layer.host.n for layer in cache.layers]
    model.set_attn_implementation(PROBE)
    checks, times = [], []
    device_bytes = sum(cache.memory_report()["device"].values())
    host_used, seen = used_host_bytes(cache), cache.get_seq_length()
    row_bytes = sum(2 * layer.n_kv_heads * layer.head_dim * layer.host.k.element_size() for layer in cache.layers)
    try:
        for step in range(1, steps + 1):
            token = torch.tensor([[int(logits.argmax())]], device=llm.device)
            t0 = time.perf_counter()
            logits = model(input_ids=token, cache=cache, use_cache=True).logits[0, -1]
            times.append(time.perf_counter() - t0)
            if step % every:
                continue
            evicted = sum(layer.host.n for layer in cache.layers) // len(cache.layers)
            recall_new, recall_old = zip(
                *(recall_by_age(layer, recorder.last[i], prompt_host[i]) for i, layer in enumerate(cache.layers))
            )
            now_host = used_host_bytes(cache)
            check = {
                "step": step,
                "seq_len": cache.get_seq_length(),
                "conservation": all(_conserved(layer) for layer in cache.layers),
                "device_bytes_constant": sum(cache.memory_report()["device"].values()) == device_bytes,
                "host_growth_exact": now_host - host_used == row_bytes * (cache.get_seq_length() - seen),
                "host_tokens": evicted,
                "recall_added": _mean(recall_new),
                "recall_prompt": _mean(recall_old),
                "median_step_ms": 1e3 * statistics.median(times[-every:]),
            }
            host_used, seen = now_host, cache.get_seq_length()
            checks.append(check)
            print(json.dumps(check), flush=True)
    finally:
        model.set_attn_implementation("hybrid")
    drift = statistics.median(times[-every:]) / statistics.median(times[:every])
    recall_ok = all(c["recall_added"] is None or c["recall_added"] >= 0.8 * c["recall_prompt"] for c in checks)
    return {
        "checks": checks,
        "step_time_drift": drift,
        "all_ok": all(c["conservation"] and c["device_bytes_constant"] and c["host_growth_exact"] for c in checks)
        and drift <= DRIFT
        and recall_ok,
    }


def _conserved(layer: HybridLayer) -> bool:
    where = layer.positions()
    everything = np.concatenate([where["sinks"], where["window"], where["host"]])
    return np.array_equal(np.sort(everything), np.arange(layer.n_seen))


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def interrupted_generation_is_harmless(llm: HybridLLM, prompt: torch.Tensor, n: int) -> dict:
    """A stream whose consumer raises mid-way, then a full generation: no thread left, same text."""
    threads = {t.ident for t in threading.enumerate()}
    fresh = llm.generate(prompt, n, stop_at_eos=False, progress=False).text

    class Stop(Exception):
        pass

    try:
        for i, _ in enumerate(llm.stream(prompt, n, stop_at_eos=False, progress=False)):
            if i == 2:
                raise Stop
    except Stop:
        pass
    again = llm.generate(prompt, n, stop_at_eos=False, progress=False).text
    left = [t.name for t in threading.enumerate() if t.ident not in threads]
    return {"threads_left": left, "same_text_after": again == fresh, "ok": not left and again == fresh}


def main(argv=None) -> int:
    p = options.parser(__doc__, __spec__)
    options.add_output_args(p, quick="a 600-token prompt, 200 steps")
    options.add_model_args(p, chunk=None)  # the engine's own prefill chunk
    p.add_argument("--prompt-tokens", type=options.positive_int, help="default 4096 (--quick: 600)")
    p.add_argument("--steps", type=options.positive_int, help="decode steps, default 2000 (--quick: 200)")
    p.add_argument("--every", type=options.positive_int, help="steps between checks, default 100 (--quick: 50)")
    options.add_threads_arg(p)
    args = p.parse_args(argv)
    options.quick_defaults(args, prompt_tokens=(600, 4096), steps=(200, 2000), every=(50, 100))
    options.pin_threads(args.threads)
    llm = HybridLLM.from_pretrained(args.model, offload=OffloadConfig(device="cpu"))
    ids = segments(llm.tokenizer, 1, args.prompt_tokens, offset=800_000)[0]
    started = time.perf_counter()
    result = soak(llm, ids, args.steps, args.every)
    result["interrupt"] = interrupted_generation_is_harmless(llm, ids[:, :300], 24)
    result["ok"] = result["all_ok"] and result["interrupt"]["ok"]
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({k: v for k, v in result.items() if k != "checks"}))
    if args.json:
        write_json(args.json, {"config": vars(args) | {"json": str(args.json)}, **result})
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    run_script(main)
