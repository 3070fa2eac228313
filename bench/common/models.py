"""Models for benchmarks and tests: random-weight Llamas of given shapes (nothing downloaded),
or any model `engine.models.load_model` knows."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.models import load_model
from engine.plan import MODEL_PRESETS

# Random-weight shapes by name: the 8B shape of the targets; Gemma-2B's attention (8 query heads
# on one KV head of 256 dims; a smaller vocabulary), where a step has fewer KV heads than threads;
# and a tiny one that lets the test suite run the speed benchmarks in seconds.
SHAPES = {
    "llama-3-8b-shape": MODEL_PRESETS["llama-3-8b"],
    "gemma-2b-shape": dict(
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        hidden_size=2048,
        intermediate_size=16384,
        vocab_size=32000,
    ),
    "tiny-llama": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=64, intermediate_size=128, vocab_size=256
    ),
}
LONG_CONTEXT = dict(max_position_embeddings=262144, rope_theta=500000.0)  # positions past 128K, as Llama 3's


def random_llama(
    shape: dict,
    *,
    layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "hybrid",
    seed: int = 0,
    qk_scale: float = 1.0,
    **config,
) -> LlamaForCausalLM:
    """A Llama of `shape` (LlamaConfig fields; `layers` decoder layers when given, `config`
    more fields) with weights drawn from `seed`, built in `dtype` on `device` (an 8B shape
    built in fp32 first would not fit a GPU's cap), in eval mode. `qk_scale` multiplies the
    query and key projections: larger attention logits make attention peaked, as in trained
    models, so that attending to the wrong tokens visibly changes the logits."""
    fields = {**shape, **config}
    if layers is not None:
        fields["num_hidden_layers"] = layers
    llama_config = LlamaConfig(**fields, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config).eval()
    finally:
        torch.set_default_dtype(default)
    if qk_scale != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(qk_scale)
                layer.self_attn.k_proj.weight.mul_(qk_scale)
    return model


def benchmark_model(name: str, *, layers: int, attn_implementation: str):
    """(model, tokenizer or None) by name: a random-weight shape of `SHAPES` in bf16 with
    `layers` decoder layers and Llama 3's long-context RoPE (no tokenizer), or a model
    `load_model` knows (the bundled one, a directory, a GGUF file, a hub id)."""
    if name in SHAPES:
        model = random_llama(
            SHAPES[name], layers=layers, dtype=torch.bfloat16, attn_implementation=attn_implementation, **LONG_CONTEXT
        )
        return model, None
    return load_model(name, attn_implementation=attn_implementation)
