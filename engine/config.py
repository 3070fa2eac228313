"""Offload configuration and its presets (a leaf: it imports no other module of the engine).

Each field of `OffloadConfig` is described once, in its metadata: the command line's
options and the README's configuration table are generated from it (`OffloadConfig.described`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import typing
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch

CandidateSource = Literal["keys", "blocks", "both"]
KeyIndexKind = Literal["flat", "ivf", "hnsw", "graph", "qq"]
Budget = Literal["adaptive", "fixed"]
Landmark = Literal["mean", "minmax"]
HostDtype = Literal["auto", "float32", "float16", "bfloat16"]
PrefillOrder = Literal["chunks", "layers"]

CANDIDATE_SOURCES: tuple[str, ...] = typing.get_args(CandidateSource)
KEY_INDEXES: tuple[str, ...] = typing.get_args(KeyIndexKind)
BUDGETS: tuple[str, ...] = typing.get_args(Budget)
LANDMARKS: tuple[str, ...] = typing.get_args(Landmark)
HOST_DTYPES = {name: getattr(torch, name) for name in typing.get_args(HostDtype) if name != "auto"}

# the widest run again of a near tie, in times the step's selection: it reads every token already, and its
# counts stay within int64 (a larger factor overflowed them)
MAX_WIDENING = 1e9
MAX_COUNT = 2**31 - 1  # any count field: a wider run's and a grown budget's products stay within int64, threads a C int
PREFILL_KEY_BLOCK = 2048  # keys per block of exact prefill attention (bounds its score buffer)

# The sections of OffloadConfig, in the order its fields are declared: name -> what it decides.
SECTIONS = {
    "resident": "what stays on the device",
    "sources": "where candidates come from",
    "reads": "how many are read",
    "correction": "correcting what is not read",
    "runtime": "where and how it runs",
}

# Old spellings, still accepted with a DeprecationWarning: field name -> new name, and the old
# values of candidates_from (which was `mode`) -> the new ones.
RENAMED_FIELDS = {"mode": "candidates_from", "method": "key_index"}
OLD_CANDIDATE_SOURCES = {"ann": "keys", "block": "blocks", "hybrid": "both"}


def _option(section: str, default, description: str, *, state: bool = False) -> dataclasses.Field:
    """A field with its section and its one description (the CLI's help, the README's table); `state`: the
    field shapes what a prefilled cache holds (`OffloadConfig.state_fields`)."""
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}; sections: {', '.join(SECTIONS)}")
    metadata = {"section": section, "help": description, "state": state}
    if isinstance(default, dict):  # mutable: each config gets its own copy
        return field(default_factory=functools.partial(dict, default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Described:
    """One field of OffloadConfig as the command line and the documentation show it."""

    name: str
    section: str
    type: type  # int, float, bool, str or dict
    choices: tuple[str, ...] | None  # the allowed values of a Literal field
    default: object
    help: str


@functools.cache
def _describe(cls) -> tuple[Described, ...]:
    """OffloadConfig.described, computed once (it runs in every config's validation)."""
    hints = typing.get_type_hints(cls)  # the annotations are strings (postponed evaluation)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        literal = typing.get_origin(hint) is Literal
        out.append(
            Described(
                name=f.name,
                section=f.metadata.get("section"),
                type=str if literal else hint,
                choices=typing.get_args(hint) if literal else None,
                default=f.default_factory() if f.default is dataclasses.MISSING else f.default,
                help=f.metadata.get("help"),
            )
        )
    return tuple(out)


def new_spelling(old_name: str, value) -> tuple[str, object]:
    """The field name, and value, that replace the old field name `old_name` given `value`."""
    new_name = RENAMED_FIELDS[old_name]
    if new_name == "candidates_from":
        value = OLD_CANDIDATE_SOURCES.get(value, value)
    return new_name, value


def _in_new_names(changes: dict) -> dict:
    """Keyword arguments of OffloadConfig with the old field names replaced, a DeprecationWarning
    for each (pointing at the caller of the function that calls this one)."""
    out = dict(changes)
    for old in [name for name in changes if name in RENAMED_FIELDS]:
        new, value = new_spelling(old, out.pop(old))
        if new in changes:
            raise TypeError(f"OffloadConfig: {old} is the old name of {new}; give one of them, not both")
        warnings.warn(
            f"OffloadConfig's {old}={changes[old]!r} is deprecated: write {new}={value!r}",
            DeprecationWarning,
            stacklevel=3,
        )
        out[new] = value
    return out


def _accepting_old_names(cls):
    """Lets the dataclass's __init__ take the old field names (RENAMED_FIELDS)."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **_in_new_names(kwargs))

    cls.__init__ = __init__
    return cls


@_accepting_old_names
@dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """How the KV cache is split between the device and host memory, and how each decode step
    picks the host tokens it attends to.

    A step attends exactly to the resident tokens (first section), takes candidate host tokens
    from the host key index and/or the device block index (second), reads all of them or those
    whose estimated attention probability is high enough (third), and accounts for the host
    tokens it did not read by an estimate, re-running a step's tokens exactly where the result is
    a near tie (fourth). The last section says where and how it runs and changes no result.
    Every field is a keyword argument: `OffloadConfig(window=512)`; `preset(name, ...)` starts
    from a named configuration.
    """

    # What stays on the device: attended exactly at every step.
    n_sink: int = _option(
        "resident", 4, "first tokens of the sequence kept on the device (attention sinks)", state=True
    )
    window: int = _option(
        "resident", 256, "most recent tokens kept on the device (one that holds the context offloads none)", state=True
    )

    # Where candidates come from: which host tokens a step considers reading.
    candidates_from: CandidateSource = _option(
        "sources",
        "both",
        "where a step's candidate host tokens come from: `keys` (the host key index), `blocks` (the device "
        "block index: the blocks whose landmark scores best) or `both`",
        state=True,
    )
    key_index: KeyIndexKind = _option(
        "sources",
        "qq",
        "host key index, one per layer and KV head: `qq` (query→query lists), `graph` (attention-aware key "
        "graph), `flat`, `ivf`, `hnsw` (faiss)",
        state=True,
    )
    index_params: dict = _option(
        "sources",
        {},
        "keyword arguments for the key index (e.g. `qq`: `m_keys`, `n_neighbors`, `max_queries`; see `ann/`)",
        state=True,
    )
    max_build_queries: int = _option(
        "sources", 1024, "prefill query positions kept per layer to build the key index", state=True
    )
    block_size: int = _option(
        "sources", 32, "tokens per block (of the block index and of the estimate's summaries)", state=True
    )
    n_blocks: int = _option("sources", 8, "block index: at most this many blocks per step")
    block_frac: float = _option("sources", 0.08, "block index: this share of the host blocks per step, in (0, 1]")
    landmark: Landmark = _option(
        "sources",
        "minmax",
        "what the block index scores a block by: `minmax`, its per-channel min and max keys (Quest's bound on "
        "the block's best logit), or `mean`, its mean key",
        state=True,
    )
    recent: int = _option(
        "sources",
        2048,
        "adaptive budget: the newest host keys added since the key index's build, at most this many, are "
        "candidates at every step (the index takes few of them in)",
    )

    # How many are read: all candidates (fixed) or those likely to matter (adaptive).
    budget: Budget = _option(
        "reads",
        "adaptive",
        "`adaptive`: read the candidates (the key index's and the chosen blocks' tokens) whose estimated "
        "attention probability reaches `min_prob` (and `min_ratio` / tokens), except with `candidates_from` "
        "`blocks`, which builds no key index and rates nothing: the chosen blocks are read in full; `fixed`: read "
        "`top_k` per query head from the key index, and the chosen blocks in full",
        state=True,
    )
    top_k: int = _option("reads", 32, "fixed budget: key-index tokens read per query head")
    candidates: int = _option("reads", 192, "adaptive budget: key-index proposals rated per query head")
    min_prob: float = _option(
        "reads",
        1.5e-4,
        "adaptive budget: estimated attention probability (averaged over the query group) a token needs to be read",
    )
    min_ratio: float = _option(
        "reads",
        1.0,
        "adaptive budget: a token read also needs this multiple of the uniform share 1 / (tokens in the cache)",
    )
    grow_from: int = _option(
        "reads",
        4096,
        "adaptive budget: past this many tokens, `candidates` and `n_blocks` grow and `min_prob` falls in "
        "proportion to the tokens, so that the share of host tokens read, and the mass left unread, stay level "
        "as the context grows (0: the same counts at every length)",
    )
    neighbours: int = _option(
        "reads", 0, "adaptive budget: also rate the tokens this close to each token read (attention comes in runs)"
    )
    sketch_rank: int = _option(
        "reads",
        0,
        "adaptive budget: 0 rates candidates on their keys; r > 0 on a rank-r sketch of the keys instead "
        "(no key read, less exact)",
        state=True,
    )

    # Correction: what the reads miss.
    estimate: bool = _option(
        "correction",
        True,
        "estimate the host tokens a step does not read from their block's mean key and mean value",
        state=True,
    )
    recheck_margin: float = _option(
        "correction",
        0.5,
        "where a step's two highest logits lie less than this apart, the tokens decoded since the last exact run "
        "(as many as `recheck_work` allows) run again exactly (0: never; HybridLLM's generation only)",
    )
    recheck_work: int = _option(
        "correction",
        16 * 131_072,
        "an exact run runs again the newest positions decoded since the last one, each attending to every host "
        "token, as many as keep positions x host tokens within this (at least one, at most `window`: 16 at "
        "131,072 host tokens, a window's worth below 8,192); older ones keep their approximate K/V (0: no bound)",
    )
    recheck_share: float = _option(
        "correction",
        0.02,
        "at most this share of a sequence's decode steps run again exactly at near ties (its first near tie "
        "always may); past it a near tie keeps the run before (1: no bound)",
    )
    recheck_read_limit: float = _option(
        "correction",
        3.0,
        "a near tie's step runs again only while the generation's host reads stay within this multiple of its "
        "selection's: an exact run (every host token) within the reads so far, a wider run (foreseen as its "
        "factor times the step's selection) within the selection's reads foreseen up to "
        "`recheck_credit_steps` (0: no limit)",
    )
    recheck_credit_steps: int = _option(
        "correction",
        1,
        "with `recheck_read_limit`: a wider run may spend ahead what the selection will read up to this "
        "decode step; past it, every run stays within the limit of the reads so far, so a generation at "
        "least this long ends within the limit, its wider runs counted as foreseen (one may read somewhat more: "
        "counts rounded up, thresholds lowered) (1: nothing spent ahead, every answer within it; 0: up to the "
        "`max_new_tokens` asked for)",
    )
    recheck_widen: float = _option(
        "correction",
        3.0,
        "a near tie's step first runs again reading wider: this many times the candidates and blocks, its "
        "thresholds lowered as much; the exact run follows only where the wider runs' two highest logits still "
        "lie less than `recheck_wide_margin` apart (1: straight to the exact run)",
    )
    recheck_wider_runs: int = _option(
        "correction",
        2,
        "with `recheck_widen` > 1: how many wider runs a near tie may take before its exact run, each "
        "`recheck_widen` times wider than the one before, while the tie survives",
    )
    recheck_fit_wider: bool = _option(
        "correction",
        True,
        "with `recheck_read_limit`: a wider run the limit does not afford runs as wide as it affords instead, "
        "when that is still at least twice the step's selection and wider than the run before",
    )
    recheck_wide_margin: float = _option(
        "correction",
        0.2,
        "with `recheck_widen` > 1: the gap between a wider run's two highest logits under which the step "
        "runs again wider still, or exactly after the last wider run (0: the first wider run's logits stand)",
    )

    # Runtime: where and how it runs (no effect on the result, but a host dtype narrower than the model's)
    host_dtype: HostDtype = _option(
        "runtime",
        "auto",
        "dtype of the host KV store (`auto`: the model's; float32 for a float64 model); a narrower one than "
        "the model's rounds the host tokens' keys and values",
        state=True,
    )
    host_threads: int = _option("runtime", 0, "threads of the host kernel (0: all cores)")
    build_workers: int = _option(
        "runtime", 1, "threads building key indexes during the prefill (0: after it, in the caller's thread)"
    )
    prefill_chunk: int = _option(
        "runtime",
        1024,
        "tokens per forward pass during the prefill; a prompt that joins a running batch is prefilled a chunk "
        "before each of its decode steps",
    )
    prefill_order: PrefillOrder = _option(
        "runtime",
        "chunks",
        "`chunks`: each chunk through every layer; `layers`: the whole prompt through one layer after another, "
        "its earlier chunks' K/V kept on the device for the layer's later ones rather than read back from the host",
    )
    device: str = _option(
        "runtime", "auto", "torch device the model is loaded on (`auto`: cuda when available, else cpu)"
    )

    def __post_init__(self):
        for item in self.described():
            value = getattr(self, item.name)
            if item.type is int and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT
            ):
                raise ValueError(f"OffloadConfig.{item.name} must be a non-negative int below 2**31, got {value!r}")
            if item.choices is not None and value not in item.choices:
                raise ValueError(f"OffloadConfig.{item.name} must be one of {', '.join(item.choices)}; got {value!r}")
        for name in ("window", "block_size", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"OffloadConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_sink < 1:
            raise ValueError(f"OffloadConfig.n_sink must be at least 1 (attention sinks), got {self.n_sink}")
        if self.uses_key_index and self.budget == "fixed" and self.top_k < 1:
            raise ValueError(
                f"candidates_from {self.candidates_from!r} reads top_k tokens per query head: top_k must be >= 1"
            )
        if self.budget == "adaptive" and self.uses_key_index and self.candidates < 1:
            raise ValueError("an adaptive budget ranks the key index's candidates: candidates must be >= 1")
        if self.uses_key_index and self.key_index in ("qq", "graph") and self.max_build_queries < 1:
            raise ValueError(
                f"key_index {self.key_index!r} builds from prefill queries: max_build_queries must be >= 1"
            )
        # checked whatever the budget: a wider run divides them (widened)
        if isinstance(self.min_prob, bool) or not isinstance(self.min_prob, (int, float)):
            raise ValueError(f"OffloadConfig.min_prob must be a number, got {self.min_prob!r}")
        if not 0 <= self.min_prob <= 1:
            raise ValueError(f"OffloadConfig.min_prob must lie in [0, 1], got {self.min_prob!r}")
        ratio = self.min_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < math.inf:
            raise ValueError(f"OffloadConfig.min_ratio must be a finite number >= 0, got {ratio!r}")
        margin = self.recheck_margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < math.inf:
            raise ValueError(f"OffloadConfig.recheck_margin must be a finite number >= 0 (0: never), got {margin!r}")
        for name in ("recheck_widen", "recheck_wide_margin", "recheck_read_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"OffloadConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.recheck_widen < 1:
            raise ValueError(f"OffloadConfig.recheck_widen must be at least 1 (1: none), got {self.recheck_widen}")
        share = self.recheck_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise ValueError(f"OffloadConfig.recheck_share must lie in [0, 1], got {share!r}")
        for name in ("estimate", "recheck_fit_wider"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"OffloadConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.uses_blocks and self.n_blocks < 1:
            raise ValueError(f"candidates_from {self.candidates_from!r} selects blocks: n_blocks must be >= 1")
        frac = self.block_frac
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
            raise ValueError(f"OffloadConfig.block_frac must lie in (0, 1], got {self.block_frac!r}")
        if not isinstance(self.index_params, dict):
            raise ValueError("OffloadConfig.index_params must be a dict of keyword arguments for the key index")
        # its own copy: replace() and preset() handed on the one dict, whose change changed every preset after it
        object.__setattr__(self, "index_params", copy.deepcopy(self.index_params))
        if not isinstance(self.device, str):  # a torch.device: its users take the name (device.startswith)
            raise ValueError(
                f"OffloadConfig.device must be a device's name (auto, cpu, cuda, cuda:N), got {self.device!r}"
            )
        try:
            device = torch.device(self.resolved_device())
        except RuntimeError as exc:
            raise ValueError(f"OffloadConfig.device {self.device!r} is not a torch device") from exc
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"OffloadConfig.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @classmethod
    def described(cls) -> tuple[Described, ...]:
        """Every field with its section, type, choices, default and description, in section order."""
        return _describe(cls)

    @classmethod
    def markdown_table(cls) -> str:
        """The fields as a markdown table (section, field, default, description), in section order."""
        lines = ["| section | field | default | description |", "| --- | --- | --- | --- |"]
        for item in cls.described():
            default = repr(item.default) if item.type in (int, float) else f"`{item.default}`"
            text = item.help.replace("|", "\\|")
            lines.append(f"| {item.section} | `{item.name}` | {default} | {text} |")
        return "\n".join(lines) + "\n"

    def growth(self, n_tokens: int) -> float:
        """How much an adaptive budget's counts grow (and min_prob falls) at n_tokens in the cache:
        n_tokens / grow_from past grow_from, else 1."""
        if self.budget != "adaptive" or not self.grow_from:
            return 1.0
        return max(1.0, n_tokens / self.grow_from)

    def blocks_per_step(self, host_blocks: int, n_tokens: int = 0) -> int:
        """Candidate blocks a decode step takes from the block index over `host_blocks` blocks,
        with n_tokens in the cache (`growth`)."""
        cap = int(self.n_blocks * self.growth(n_tokens))
        return min(cap, max(1, math.ceil(self.block_frac * host_blocks)))

    def exact_span(self, host_tokens: int) -> int:
        """The most positions a near tie's exact run runs again with `host_tokens` on the host: as
        many as `recheck_work` allows, at least one, within the window."""
        if not self.recheck_work:
            return self.window
        return max(1, min(self.window, self.recheck_work // max(1, host_tokens)))

    @property
    def wider_factors(self) -> list[float]:
        """How many times wider than the step's selection each run again of a near tie reads, in
        turn (engine.decode.recheck): none unless `recheck_widen` > 1; at most MAX_WIDENING."""
        factors, factor = [], 1.0
        for _ in range(self.recheck_wider_runs if self.recheck_widen > 1 else 0):
            factor = min(MAX_WIDENING, factor * self.recheck_widen)
            if factors and factor == factors[-1]:  # as wide as the run before: it would read the same
                break
            factors.append(factor)
        return factors

    def widened(self, factor: float) -> OffloadConfig:
        """The configuration a near tie's wider run reads with (`recheck_widen`): `factor` times the
        candidates, top_k and blocks, and the read thresholds divided by it."""
        return dataclasses.replace(
            self,
            candidates=min(MAX_COUNT, math.ceil(self.candidates * factor)),
            top_k=min(MAX_COUNT, math.ceil(self.top_k * factor)),
            n_blocks=min(MAX_COUNT, math.ceil(self.n_blocks * factor)),
            block_frac=min(1.0, self.block_frac * factor),
            min_prob=self.min_prob / factor,
            min_ratio=self.min_ratio / factor,
        )

    @property
    def uses_blocks(self) -> bool:
        """Whether decode steps take candidate blocks from the device block index."""
        return self.candidates_from in ("blocks", "both")

    @property
    def uses_key_index(self) -> bool:
        """Whether decode steps take candidates from the host key index (built after prefill)."""
        return self.candidates_from in ("keys", "both")

    @property
    def resident_tokens(self) -> int:
        """Tokens kept on the device per layer and KV head (sinks + recent window)."""
        return self.n_sink + self.window

    @property
    def mode(self) -> str:
        """Deprecated: `candidates_from`, in its old values ("ann", "block", "hybrid")."""
        old = {new: old for old, new in OLD_CANDIDATE_SOURCES.items()}[self.candidates_from]
        warnings.warn(
            f"OffloadConfig.mode is deprecated: read candidates_from ({self.candidates_from!r}, formerly {old!r})",
            DeprecationWarning,
            stacklevel=2,
        )
        return old

    @property
    def method(self) -> str:
        """Deprecated: `key_index`."""
        warnings.warn("OffloadConfig.method is deprecated: read key_index", DeprecationWarning, stacklevel=2)
        return self.key_index

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    @classmethod
    def state_fields(cls) -> tuple[str, ...]:
        """The fields that shape what a prefilled cache holds (its resident set, host store and indexes);
        the others decide what a step reads and how it runs. A prefix saved to a file loads under any
        configuration equal to its own in these (engine.prefix_file)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["state"])

    def resolved_host_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The host store's dtype for a model of model_dtype: `host_dtype`, or with `auto` the model's
        where the host kernels read it, else float32 (a float64 model's keys and values)."""
        if self.host_dtype != "auto":
            return HOST_DTYPES[self.host_dtype]
        return model_dtype if model_dtype in HOST_DTYPES.values() else torch.float32

    def replace(self, **changes) -> OffloadConfig:
        return dataclasses.replace(self, **_in_new_names(changes))

    @classmethod
    def preset(cls, name: str, **overrides) -> OffloadConfig:
        """A named configuration (see `PRESETS`), optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **_in_new_names(overrides))


PRESETS: dict[str, OffloadConfig] = {
    # Adaptive budget over the query->query lists' and the block index's candidates, each rated
    # on its key; unread tokens estimated; near ties re-checked.
    "default": OffloadConfig(),
    # Fewer reads than the default: a higher probability to read a token.
    "tight": OffloadConfig(min_prob=4e-4),
    # More reads and a longer resident window, for accuracy-critical work.
    "wide": OffloadConfig(window=512, min_prob=5e-5, min_ratio=0.0, candidates=384),
    # A fixed budget per step: blocks of 16 tokens by mean key (4% of the host blocks, at most 64) and
    # 32 tokens per query head (the default before the adaptive budget, estimate aside; no re-check).
    "fixed": OffloadConfig(
        candidates_from="both",
        budget="fixed",
        window=128,
        block_size=16,
        n_blocks=64,
        block_frac=0.04,
        landmark="mean",
        recheck_margin=0.0,
    ),
    # Device block index alone: no host index to build (blocks by mean key, which the summary keeps anyway).
    "block": OffloadConfig(candidates_from="blocks", budget="fixed", n_blocks=64, block_frac=0.04, landmark="mean"),
}


def offload_or_default(value, name: str = "offload") -> OffloadConfig:
    """`value` where it is an OffloadConfig, the default configuration for None, else a
    TypeError naming the argument `name`."""
    if not isinstance(value, (OffloadConfig, type(None))):
        raise TypeError(f"{name} must be an OffloadConfig (see OffloadConfig.preset), got {type(value).__name__}")
    return value or OffloadConfig()
