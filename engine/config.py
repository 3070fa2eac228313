"""Offload configuration and its presets (a leaf: it imports no other module of the engine)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

RETRIEVAL_METHODS = ("flat", "ivf", "hnsw", "graph", "qq")
SELECTION_MODES = ("ann", "block", "hybrid")
BUDGETS = ("adaptive", "fixed")
LANDMARKS = ("mean", "minmax")
PREFILL_KEY_BLOCK = 2048  # keys per block of exact prefill attention (bounds its score buffer)
HOST_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class OffloadConfig:
    """How the KV cache is split between the device and host memory, and how
    each decode step picks the host tokens it attends to.

    Every decode step attends exactly to the `n_sink` first tokens and the
    `window` most recent ones (resident on the device), plus host tokens.
    Candidates come from the host key index (`mode="ann"`), the device block
    index (`"block"`: blocks of `block_size` tokens, a `block_frac` share of
    the host blocks, at most `n_blocks`, those whose `landmark` scores best:
    Quest's bound from per-channel min and max keys, or the mean key), or both
    (`"hybrid"`). With
    `budget="fixed"` every candidate is read: `top_k` per query head from the
    key index, plus the blocks. With `budget="adaptive"` the key index
    proposes `candidates` per query head (and, in `"hybrid"` mode, the block
    index its blocks), each one's attention probability is estimated from its
    key (`sketch_rank` 0) or a low-rank sketch of the keys (`sketch_rank`
    dimensions; no key read, less exact), and those whose estimate, averaged
    over the query group, reaches `min_prob` (and `min_ratio` times the uniform
    share 1 / tokens, which rules at short contexts) are read: layers and heads
    whose attention is spread over many host tokens read more, those that attend
    to the resident tokens read less; with `neighbours` r the tokens within r of
    each token read are rated too. (The rating comes with the key index: with
    `mode="block"` the chosen blocks are read whatever the budget.)
    With `estimate`, the host tokens a step does not read are estimated from
    their block's mean key and mean value (engine.decode.estimate).
    With `recheck_margin` m > 0, where a decode step's two highest logits lie
    less than m apart (a near tie, which a small error in attention can turn),
    the tokens decoded since the last exact run (the prompt or the last
    re-check; up to `window` of them) run again as an exact chunk, so that the
    step's token is full attention's
    (engine.decode.recheck; `HybridLLM`'s generation, not transformers' `generate`).
    """

    n_sink: int = 4
    window: int = 256
    block_size: int = 32
    n_blocks: int = 8  # at most this many blocks a step (a fixed budget reads them all; 64 in `fixed`)
    block_frac: float = 0.08  # so that 8 blocks are taken from about 3,500 tokens on (0.04 in `fixed`, `block`)
    top_k: int = 32
    method: str = "qq"
    mode: str = "hybrid"
    budget: str = "adaptive"
    candidates: int = 192  # adaptive: key-index proposals looked at per query head
    min_prob: float = 1.5e-4  # adaptive: estimated attention probability a token needs to be read
    min_ratio: float = 1.0  # adaptive: ... and this multiple of the uniform share 1 / tokens in the cache
    neighbours: int = 0  # adaptive: also rate the tokens this close to each token read (attention comes in runs)
    sketch_rank: int = 0  # adaptive: 0 scores candidates on their keys; else dimensions of a key sketch
    recent: int = 2048  # adaptive: host keys added after the index's build offered to the sketch (the newest)
    estimate: bool = True
    recheck_margin: float = 0.5  # logits: where a step's top two lie closer, its decoded tokens run again exactly
    landmark: str = "minmax"  # blocks by Quest's bound: a few heavy tokens in a block of filler lift it
    host_dtype: str = "auto"  # "auto": the model's dtype
    host_threads: int = 0  # 0: all cores
    build_workers: int = 1  # threads building host indexes during the prefill (0: after it, in the caller's)
    index_params: dict = field(default_factory=dict)
    max_build_queries: int = 1024  # prefill query positions kept per layer to build the host index
    prefill_chunk: int = 1024  # tokens per forward pass during prefill
    device: str = "auto"  # "auto": cuda when available, else cpu

    def __post_init__(self):
        ints = (
            *("n_sink", "window", "block_size", "n_blocks", "top_k"),
            *("candidates", "neighbours", "sketch_rank", "recent"),
        )
        for name in (*ints, "max_build_queries", "prefill_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"OffloadConfig.{name} must be a non-negative int, got {value!r}")
        for name in ("window", "block_size", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"OffloadConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_sink < 1:
            raise ValueError(f"OffloadConfig.n_sink must be at least 1 (attention sinks), got {self.n_sink}")
        _check_choice("method", self.method, RETRIEVAL_METHODS)
        _check_choice("mode", self.mode, SELECTION_MODES)
        _check_choice("budget", self.budget, BUDGETS)
        _check_choice("landmark", self.landmark, LANDMARKS)
        _check_choice("host_dtype", self.host_dtype, ("auto", *HOST_DTYPES))
        if self.mode in ("ann", "hybrid") and self.budget == "fixed" and self.top_k < 1:
            raise ValueError(f"mode {self.mode!r} retrieves top_k tokens per query head: top_k must be >= 1")
        if self.budget == "adaptive" and self.uses_key_index:
            if self.candidates < 1:
                raise ValueError("an adaptive budget ranks the key index's candidates: candidates must be >= 1")
            if isinstance(self.min_prob, bool) or not isinstance(self.min_prob, (int, float)):
                raise ValueError(f"OffloadConfig.min_prob must be a number, got {self.min_prob!r}")
            if not 0 <= self.min_prob <= 1:
                raise ValueError(f"OffloadConfig.min_prob must lie in [0, 1], got {self.min_prob!r}")
            if isinstance(self.min_ratio, bool) or not isinstance(self.min_ratio, (int, float)) or self.min_ratio < 0:
                raise ValueError(f"OffloadConfig.min_ratio must be a non-negative number, got {self.min_ratio!r}")
        margin = self.recheck_margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < math.inf:
            raise ValueError(f"OffloadConfig.recheck_margin must be a finite number >= 0 (0: never), got {margin!r}")
        if not isinstance(self.estimate, bool):
            raise ValueError(f"OffloadConfig.estimate must be True or False, got {self.estimate!r}")
        if self.mode in ("block", "hybrid") and self.n_blocks < 1:
            raise ValueError(f"mode {self.mode!r} selects candidate blocks: n_blocks must be >= 1")
        if not isinstance(self.block_frac, (int, float)) or not 0 < self.block_frac <= 1:
            raise ValueError(f"OffloadConfig.block_frac must lie in (0, 1], got {self.block_frac!r}")
        for name in ("host_threads", "build_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"OffloadConfig.{name} must be a non-negative int, got {value!r}")
        if not isinstance(self.index_params, dict):
            raise ValueError("OffloadConfig.index_params must be a dict of keyword arguments for the key index")
        try:
            torch.device(self.resolved_device())
        except RuntimeError as exc:
            raise ValueError(f"OffloadConfig.device {self.device!r} is not a torch device") from exc

    def blocks_per_step(self, host_blocks: int) -> int:
        """Candidate blocks a decode step takes from the block index over `host_blocks` blocks."""
        return min(self.n_blocks, max(1, math.ceil(self.block_frac * host_blocks)))

    @property
    def uses_blocks(self) -> bool:
        """Whether decode steps take candidate blocks from the device block index."""
        return self.mode in ("block", "hybrid")

    @property
    def uses_key_index(self) -> bool:
        """Whether decode steps take candidates from the host key index (built after prefill)."""
        return self.mode in ("ann", "hybrid")

    @property
    def resident_tokens(self) -> int:
        """Tokens kept on the device per layer and KV head (sinks + recent window)."""
        return self.n_sink + self.window

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_host_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.host_dtype == "auto" else HOST_DTYPES[self.host_dtype]

    def replace(self, **changes) -> OffloadConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> OffloadConfig:
        """A named configuration (see `PRESETS`), optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"OffloadConfig.{name} must be one of {', '.join(choices)}; got {value!r}")


PRESETS: dict[str, OffloadConfig] = {
    # Adaptive budget over the query->query lists' and the block index's candidates, each rated
    # on its key; unread tokens estimated.
    "default": OffloadConfig(),
    # About half the reads of the default.
    "tight": OffloadConfig(min_prob=4e-4),
    # More reads and a longer resident window, for accuracy-critical work.
    "wide": OffloadConfig(window=512, min_prob=5e-5, min_ratio=0.0, candidates=384),
    # A fixed budget per step: blocks of 16 tokens (4% of the host blocks, at most 64) and 32 tokens
    # per query head (the default before the adaptive budget, estimate aside; no re-check of near ties).
    "fixed": OffloadConfig(
        mode="hybrid",
        budget="fixed",
        window=128,
        block_size=16,
        n_blocks=64,
        block_frac=0.04,
        landmark="mean",
        recheck_margin=0.0,
    ),
    # Device block index alone: no host index to build (blocks by mean key, which the summary keeps anyway).
    "block": OffloadConfig(mode="block", budget="fixed", n_blocks=64, block_frac=0.04, landmark="mean"),
}
