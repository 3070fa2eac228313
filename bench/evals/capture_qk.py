"""Capture post-RoPE queries and keys of chosen layers of a model over a long text: the
real queries and keys bench.evals.ann_recall measures the key indexes on.

The model runs a chunked prefill through a capturing attention function
registered with `transformers.AttentionInterface` (exact sdpa output, q/k of the
chosen layers recorded on the side). Layers past the last captured one do not
change the captured ones, so they are dropped for the run, and the LM head is
never applied. Captures are cached as `.npz`:

    q_L  [Hq, T, D] float16   post-RoPE queries of layer L
    k_L  [Hkv, T, D] float16  post-RoPE keys of layer L
    layers, n_tokens, prefill_s_per_layer (mean seconds one decoder layer spent
    on the whole prefill), tokens_at / layer_s_at (the same after each chunk),
    threads, text_source

    python -m bench.evals.capture_qk [--model NAME] [--tokens 34000] [--layers 5 11 17] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.common.options import OneLineParser, add_model_args, non_negative_int, positive_int, prog
from bench.common.text import load_text
from engine.cli import run_script

ATTN_NAME = "capture_qk"


def default_out_dir() -> Path:
    base = (
        os.environ.get("HYBRIDATTN_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hybridattn"
    )
    return Path(base) / "captures"


class QKRecorder:
    """Attention function that returns exact sdpa attention and records q/k per layer."""

    def __init__(self, layers: list[int]):
        self.layers = set(layers)
        self.q: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        self.k: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = module.layer_idx
        if layer in self.layers:
            # query [1, Hq, q, D] holds this chunk; key [1, Hkv, T, D] is the whole cache so far.
            self.q[layer].append(query[0].to(torch.float16).clone())
            self.k[layer] = key[0]
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def arrays(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.cat(self.q[layer], dim=1)  # [Hq, T, D]
        k = self.k[layer].to(torch.float16)  # [Hkv, T, D]
        return q.numpy(), k.numpy()


def capture(model, input_ids: torch.Tensor, layers: list[int], chunk: int = 512, progress: bool = True) -> dict:
    """Run a chunked prefill of `input_ids` [1, T] and return the capture dict (see module doc)."""
    from tqdm import tqdm
    from transformers import AttentionInterface, DynamicCache
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    n_layers = model.config.num_hidden_layers
    if not layers or min(layers) < 0 or max(layers) >= n_layers:
        raise ValueError(f"layers must lie in [0, {n_layers}), got {layers}")
    recorder = QKRecorder(layers)
    AttentionInterface.register(ATTN_NAME, recorder)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)

    base = model.model  # the decoder stack without the LM head
    keep = max(layers) + 1
    all_layers = base.layers
    base.layers = all_layers[:keep]
    old_impl = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    layer_s = [0.0] * keep
    starts: dict[int, float] = {}
    hooks = []
    for i, layer in enumerate(base.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: starts.__setitem__(i, time.perf_counter())))
        hooks.append(
            layer.register_forward_hook(
                lambda m, a, o, i=i: layer_s.__setitem__(i, layer_s[i] + time.perf_counter() - starts[i])
            )
        )
    try:
        cache = DynamicCache(config=model.config)
        n = input_ids.shape[1]
        tokens_at, layer_s_at = [], []  # per chunk: tokens done, mean seconds per layer so far
        t0 = time.perf_counter()
        with torch.inference_mode(), tqdm(total=n, unit="tok", desc="prefill", disable=not progress) as bar:
            for s in range(0, n, chunk):
                ids = input_ids[:, s : s + chunk]
                base(input_ids=ids, cache=cache, use_cache=True)
                bar.update(ids.shape[1])
                tokens_at.append(s + ids.shape[1])
                layer_s_at.append(float(np.mean(layer_s)))
        total_s = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
        base.layers = all_layers
        model.set_attn_implementation(old_impl)
    out = {
        "layers": np.array(layers),
        "n_tokens": np.array(n),
        "prefill_s": np.array(total_s),
        "prefill_s_per_layer": np.array(float(np.mean(layer_s))),
        "threads": np.array(torch.get_num_threads()),
        "tokens_at": np.array(tokens_at),
        "layer_s_at": np.array(layer_s_at),
    }
    for layer in layers:
        out[f"q_{layer}"], out[f"k_{layer}"] = recorder.arrays(layer)
    return out


def capture_path(model_name: str, n_tokens: int, layers: list[int], out_dir: Path | None = None) -> Path:
    tag = f"{model_name.replace('/', '_')}_T{n_tokens}_L{'-'.join(map(str, layers))}.npz"
    return (out_dir or default_out_dir()) / tag


def load_or_capture(
    model_name: str,
    n_tokens: int,
    layers: list[int],
    *,
    out: Path | None = None,
    chunk: int = 512,
    progress: bool = True,
) -> tuple[dict, Path]:
    """Return a cached capture (loading the model and capturing only when missing) and its path."""
    path = out or capture_path(model_name, n_tokens, layers)
    if path.exists():
        with np.load(path) as z:
            return dict(z), path
    from engine.models import load_model

    model, tok = load_model(model_name, dtype=torch.float32)
    text, source = load_text(min_chars=n_tokens * 6)
    ids = tok(text, return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"text from {source} gives only {ids.shape[1]} tokens, {n_tokens} asked")
    data = capture(model, ids, layers, chunk=chunk, progress=progress)
    data["text_source"] = np.array(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **data)
    os.replace(tmp, path)
    return data, path


def main(argv=None) -> None:
    ap = OneLineParser(prog=prog(__spec__), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, chunk=512)
    ap.add_argument("--tokens", type=positive_int, default=34000)
    ap.add_argument("--layers", type=non_negative_int, nargs="+", default=[5, 11, 17])
    ap.add_argument(
        "--out", type=Path, default=None, help="the capture's .npz (default: cached by model/tokens/layers)"
    )
    args = ap.parse_args(argv)
    data, path = load_or_capture(args.model, args.tokens, args.layers, out=args.out, chunk=args.chunk)
    print(
        f"{path}: {int(data['n_tokens'])} tokens, layers {data['layers'].tolist()}, "
        f"prefill {float(data['prefill_s']):.1f} s, {float(data['prefill_s_per_layer']):.2f} s per layer "
        f"({int(data['threads'])} threads)"
    )


if __name__ == "__main__":
    run_script(main)
