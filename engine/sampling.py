"""`Sampling`: how one prompt is decoded, checked where a user gives it (`check_sampling`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.generation import Pick, sampler
from engine.stop import stop_list

SEEDS = range(-(2**63), 2**64)  # what a torch.Generator takes (a negative seed as its 64-bit two's complement)


@dataclass(frozen=True)
class Sampling:
    """How one prompt of a batch is decoded (`HybridLLM.stream_batch`): up to `max_new_tokens` tokens,
    greedy at temperature 0, else drawn with a generator of its own seeded with `seed` (so its tokens do
    not depend on the prompts beside it), among its `top_k` most likely tokens (0: all) and the fewest most
    likely whose probabilities reach `top_p` (1: all); it ends at an end-of-sequence token (unless not
    `stop_at_eos`) or where its text comes to contain one of the `stop` strings."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def __post_init__(self):
        check_sampling(self.max_new_tokens, self.temperature, self.seed, self.top_k, self.top_p, self.stop_at_eos)
        # checked here, not when a running batch takes it in (a bad one from `more()` ended the whole batch)
        object.__setattr__(self, "stop", tuple(stop_list(self.stop)))

    def pick(self, device: torch.device) -> Pick:
        return sampler(self.temperature, torch.Generator(device=device).manual_seed(self.seed), self.top_k, self.top_p)


def check_sampling(max_new_tokens, temperature, seed=0, top_k=0, top_p=1.0, stop_at_eos=True) -> None:
    """The generation arguments a user gives, each checked with an error that names it."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not _is_number(temperature) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if not _is_int(seed) or seed not in SEEDS:
        raise ValueError(f"seed must be an int in [-2**63, 2**64), got {seed!r}")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: every token), got {top_k!r}")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (1: every token), got {top_p!r}")
    if not isinstance(stop_at_eos, bool):  # a string was truthy, a list taken for one setting per prompt
        raise ValueError(f"stop_at_eos must be True or False, got {stop_at_eos!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
