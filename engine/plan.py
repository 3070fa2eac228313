"""The memory plan: bytes per component on the device and the host for a model, a
context length and an offload configuration, and whether that fits a GPU budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ann.qq import SCORE_BUFFER
from engine.config import PREFILL_KEY_BLOCK, OffloadConfig, offload_or_default
from engine.decode.estimate import GROUP as SUMMARY_GROUP
from engine.index.heads import check_index_params
from engine.models import check_model_type

# Shapes of well-known models, so that a plan needs no download (Llama 3.1 8B has Llama 3 8B's).
_SHAPE_FIELDS = (
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
    "attention_bias",
)
MODEL_PRESETS: dict[str, dict] = {
    name: dict(zip(_SHAPE_FIELDS, shape))
    for name, shape in {
        "llama-3-8b": (32, 32, 8, 128, 4096, 14336, 128256, False, False),
        "llama-3.1-8b": (32, 32, 8, 128, 4096, 14336, 128256, False, False),
        "qwen2.5-7b": (28, 28, 4, 128, 3584, 18944, 152064, False, True),
        "mistral-7b": (32, 32, 8, 128, 4096, 14336, 32768, False, False),
        "smollm2-135m": (30, 9, 3, 64, 576, 1536, 49152, True, False),
    }.items()
}

# The positions each preset was trained on (its config's max_position_embeddings): the plan says where
# a context runs past them, for the memory is the same whatever the model makes of those positions.
TRAINED_POSITIONS = {
    "llama-3-8b": 8192,
    "llama-3.1-8b": 131072,
    "qwen2.5-7b": 32768,
    "mistral-7b": 32768,
    "smollm2-135m": 8192,
}


def _field_getter(model_config):
    """get(name, default=None) over a config dict or a transformers config."""
    if isinstance(model_config, dict):
        return model_config.get
    return lambda name, default=None: getattr(model_config, name, default)


def trained_positions(model_config) -> int | None:
    """The positions a preset, a config dict or a transformers config was trained on (None: not said)."""
    if isinstance(model_config, str):
        return TRAINED_POSITIONS.get(model_config)
    positions = _field_getter(model_config)("max_position_embeddings")
    return positions if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0 else None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class ModelShape:
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    @classmethod
    def of(cls, model_config) -> ModelShape:
        """From a preset name, a dict, or a transformers config (of a model type the engine runs)."""
        if isinstance(model_config, str):
            if model_config not in MODEL_PRESETS:
                raise ValueError(f"unknown model preset {model_config!r}; presets: {', '.join(MODEL_PRESETS)}")
            return cls(**MODEL_PRESETS[model_config])
        get = _field_getter(model_config)
        if get("model_type") is not None:  # a model's config (a dict of a shape alone names no type)
            check_model_type(get("model_type"))
        required = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size")
        missing = [k for k in required if not _positive_int(get(k))]
        if get("head_dim") is not None and not _positive_int(get("head_dim")):
            missing.append("head_dim")
        if missing:
            raise ValueError(
                "the model must be a preset name, a dict or a transformers config with positive "
                f"{', '.join(missing)}; got {type(model_config).__name__}"
            )
        heads, hidden = get("num_attention_heads"), get("hidden_size")
        kv_heads = heads if get("num_key_value_heads") is None else get("num_key_value_heads")  # none: MHA; 0 refused
        if not _positive_int(kv_heads) or heads % kv_heads:
            raise ValueError(
                f"num_key_value_heads must be a positive divisor of num_attention_heads ({heads}), got {kv_heads!r}"
            )
        return cls(
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=get("head_dim") or hidden // heads,
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            vocab_size=get("vocab_size"),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=bool(get("attention_bias", False)),
        )

    def n_params(self) -> int:
        H, D, Hq, Hkv, I = (
            self.hidden_size,
            self.head_dim,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.intermediate_size,
        )
        attn = H * (Hq + 2 * Hkv) * D + Hq * D * H + ((Hq + 2 * Hkv) * D if self.attention_bias else 0)
        per_layer = attn + 3 * H * I + 2 * H
        embed = self.vocab_size * H * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embed + H


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per component on the device and on the host, for `batch` sequences."""

    device: dict[str, int]
    host: dict[str, int]
    gpu_budget_bytes: int | None
    host_budget_bytes: int | None = None
    batch: int = 1

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def device_beside_weights(self) -> int:
        return self.device_total - self.device["weights"]

    @property
    def fits(self) -> bool:
        """Within the GPU budget (and the host budget, when one is given)."""
        gpu = self.gpu_budget_bytes is None or self.device_total <= self.gpu_budget_bytes
        return gpu and (self.host_budget_bytes is None or self.host_total <= self.host_budget_bytes)

    def table(self) -> str:
        rows = [("device", k, v) for k, v in self.device.items()] + [("host", k, v) for k, v in self.host.items()]
        lines = [f"{'where':<7} {'component':<14} {'GiB':>9}"]
        lines += [f"{w:<7} {c:<14} {v / 2**30:>9.3f}" for w, c, v in rows]
        lines.append(f"{'device':<7} {'total':<14} {self.device_total / 2**30:>9.3f}")
        lines.append(f"{'host':<7} {'total':<14} {self.host_total / 2**30:>9.3f}")
        for where, budget, total in (
            ("GPU", self.gpu_budget_bytes, self.device_total),
            ("host", self.host_budget_bytes, self.host_total),
        ):
            if budget is not None:
                lines.append(
                    f"{where} budget {budget / 2**30:.2f} GiB: {'fits' if total <= budget else 'does NOT fit'}"
                )
        return "\n".join(lines)


def plan_memory(
    model_config,
    context_len: int,
    cfg: OffloadConfig | None = None,
    gpu_budget_bytes: int | None = None,
    *,
    batch: int = 1,
    host_budget_bytes: int | None = None,
    weight_dtype: torch.dtype = torch.bfloat16,
) -> MemoryPlan:
    """Bytes the engine needs for `batch` sequences of `context_len` tokens with `cfg`.

    Device: weights, resident KV (sinks + window), block index (landmarks),
    block values (for the estimate of unread tokens), workspace (the largest
    transient buffers of a prefill chunk). Host: the KV store, the key indexes
    and the key sketch of an adaptive budget. Every part but the weights and the
    workspace (prefill runs sequence by sequence) is per sequence. `model_config`
    is a preset name (see `MODEL_PRESETS`), a dict or a transformers config.
    """
    cfg = offload_or_default(cfg, "cfg")
    _check_context(context_len)
    for name, budget in (("gpu_budget_bytes", gpu_budget_bytes), ("host_budget_bytes", host_budget_bytes)):
        _check_budget(name, budget)
    if not _positive_int(batch):
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    m = ModelShape.of(model_config)
    L, Hkv, Hq, D = m.num_hidden_layers, m.num_key_value_heads, m.num_attention_heads, m.head_dim
    wbytes = weight_bytes(weight_dtype)
    host_bytes = torch.finfo(cfg.resolved_host_dtype(weight_dtype)).bits // 8
    host_tokens = max(0, context_len - cfg.resident_tokens)  # a short context stays resident
    # A block index (ann.block.BlockIndex) per layer holds, per KV head, its vectors for
    # every full block and the keys of the block still filling.
    per_vector = L * Hkv * D * wbytes * (host_tokens // cfg.block_size)  # summaries in the model's dtype
    tail = L * Hkv * D * wbytes * cfg.block_size
    mean_keys = cfg.estimate or (cfg.uses_blocks and cfg.landmark == "mean")  # estimate and selection share it
    min_max = cfg.uses_blocks and cfg.landmark == "minmax"  # Quest's bounds
    # the estimate's superblocks (engine.decode.estimate): a mean key and value per GROUP blocks, and a filling tail
    superblocks = L * Hkv * D * wbytes * (host_tokens // (cfg.block_size * SUMMARY_GROUP) + SUMMARY_GROUP)
    per_summary = per_vector + tail + superblocks * cfg.estimate
    device = {
        "weights": m.n_params() * wbytes,
        "resident_kv": L * 2 * Hkv * min(cfg.resident_tokens, context_len) * D * wbytes,  # sized for the sequence
        "block_index": mean_keys * per_summary + min_max * (2 * per_vector + tail),
        "block_values": per_summary if cfg.estimate else 0,  # mean value per block, for the estimate
        "workspace": _prefill_workspace(cfg, m, context_len, host_tokens, wbytes, host_bytes),
    }
    index_device, index_host = _index_bytes(cfg, host_tokens, context_len, D, Hkv, Hq // Hkv, wbytes)
    device["query_index"] = L * index_device
    host = {"kv_store": L * 2 * Hkv * host_tokens * D * host_bytes, "key_index": L * index_host}
    if cfg.budget == "adaptive" and cfg.uses_key_index and 0 < cfg.sketch_rank < D:  # else the store's keys are rated
        host["key_sketch"] = L * Hkv * host_tokens * cfg.sketch_rank * host_bytes
    shared = ("weights", "workspace")
    device = {k: v if k in shared else batch * v for k, v in device.items()}
    host = {k: batch * v for k, v in host.items()}
    return MemoryPlan(device, host, gpu_budget_bytes, host_budget_bytes, batch)


def _prefill_workspace(cfg: OffloadConfig, m: ModelShape, T: int, host_tokens: int, wbytes: int, host_bytes: int):
    """The prefill's largest transient device bytes. A chunk: its hidden states and MLP activations,
    one block of attention scores (fp32) and one block of host K/V brought over for it. A layer's
    build of its query lists: their keys on the device, once more in fp32, and a buffer of scores;
    in chunks it runs after the last chunk has reached the layer, layer by layer
    (engine.layer_prefill) beside the next layer's chunks, which also hold the prompt's hidden
    states and rotary tables and the layer's host rows on the device."""
    Hkv, Hq, D, C = m.num_key_value_heads, m.num_attention_heads, m.head_dim, min(cfg.prefill_chunk, T)
    chunk = (
        C * (4 * m.hidden_size + 3 * m.intermediate_size) * wbytes
        + Hq * C * PREFILL_KEY_BLOCK * 4
        + 2 * Hkv * PREFILL_KEY_BLOCK * D * wbytes
    )
    build = 0
    if cfg.uses_key_index and cfg.key_index == "qq":
        build = Hkv * host_tokens * D * (wbytes + 4) + 4 * SCORE_BUFFER
    if cfg.prefill_order == "chunks":
        return max(chunk, build)
    prompt = T * (m.hidden_size + 2 * D) * wbytes + 2 * Hkv * host_tokens * D * host_bytes
    return chunk + prompt + build


def largest_batch(model_config, context_len: int, cfg: OffloadConfig | None, gpu_budget_bytes: int, **kwargs) -> int:
    """The most sequences of `context_len` tokens that fit the GPU budget (and a host budget
    given as `host_budget_bytes`), 0 if not one; the other keywords go to `plan_memory`."""
    one = plan_memory(model_config, context_len, cfg, gpu_budget_bytes, batch=1, **kwargs)
    two = plan_memory(model_config, context_len, cfg, gpu_budget_bytes, batch=2, **kwargs)
    limits = []  # bytes grow linearly with the batch: fixed part + batch * per-sequence part
    for total, budget in (("device_total", gpu_budget_bytes), ("host_total", one.host_budget_bytes)):
        if budget is None:
            continue
        per_seq = getattr(two, total) - getattr(one, total)
        fixed = getattr(one, total) - per_seq
        limits.append((budget - fixed) // per_seq if per_seq else (10**9 if fixed <= budget else 0))
    if not limits:
        raise ValueError("largest_batch needs a budget: gpu_budget_bytes, host_budget_bytes or both")
    return max(0, int(min(limits)))


def full_attention_batch(model_config, context_len: int, gpu_budget_bytes: int, *, weight_dtype=torch.bfloat16) -> int:
    """The most sequences whose whole KV cache fits on the GPU beside the weights (full attention)."""
    _check_context(context_len)
    if gpu_budget_bytes is None:
        raise ValueError("full_attention_batch needs gpu_budget_bytes")
    _check_budget("gpu_budget_bytes", gpu_budget_bytes)
    m = ModelShape.of(model_config)
    wbytes = weight_bytes(weight_dtype)
    per_seq = m.num_hidden_layers * 2 * m.num_key_value_heads * context_len * m.head_dim * wbytes
    return max(0, int((gpu_budget_bytes - m.n_params() * wbytes) // per_seq))


def weight_bytes(dtype) -> int:
    """Bytes of one weight of a floating-point torch dtype."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"weight_dtype must be a floating-point torch dtype (torch.bfloat16, say), got {dtype!r}")
    return torch.finfo(dtype).bits // 8


def _check_context(context_len) -> None:
    if not _positive_int(context_len):
        raise ValueError(f"context_len must be a positive int, got {context_len!r}")


def _check_budget(name: str, budget) -> None:
    number = isinstance(budget, (int, float)) and not isinstance(budget, bool)
    if budget is not None and not (number and 0 < budget < math.inf):  # inf: batches of NaN sequences
        raise ValueError(f"{name} must be a positive number of bytes (or None), got {budget!r}")


def _index_bytes(cfg: OffloadConfig, n_keys: int, context_len: int, dim: int, n_heads: int, group: int, wbytes: int):
    """(device bytes, host bytes) of one layer's key index of the n_keys host keys, as the ann package estimates
    them; its build queries are the prompt's, of every position (those of the resident ones too)."""
    if not cfg.uses_key_index:
        return 0, 0
    if cfg.index_params:  # as a cache would: no plan for parameters it refuses
        check_index_params(cfg.key_index, dim, cfg.index_params)
    n_queries = min(cfg.max_build_queries, context_len) * group  # build queries per KV head
    if cfg.key_index == "qq":  # build queries on the device, lists in host memory
        from ann.qq import QueryLists

        params = {k: v for k, v in cfg.index_params.items() if k in ("m_keys", "max_queries")}
        return QueryLists.estimate_bytes(n_heads, n_keys, dim, n_queries, query_bytes=wbytes, **params)
    from ann import estimate_index_bytes

    return 0, n_heads * estimate_index_bytes(cfg.key_index, n_keys, dim, n_queries, **cfg.index_params)
