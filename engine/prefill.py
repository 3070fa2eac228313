"""A prompt's prefill: its positions fed through the model into a HybridCache, chunk by chunk (or layer by
layer, engine.layer_prefill), its host indexes built after (`prefill_prompt`), or a chunk at a time between the
decode steps of a batch it is to join (`SteppedPrefill`). A prefill may be given up as it runs, where its prompt
leaves (`PrefillLeft`). What follows the prefill, the decode loop, is engine.generation's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from engine.cache import HybridCache
from engine.config import OffloadConfig
from engine.layer_prefill import prefill_by_layer


def chunk_bounds(length: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) of the prefill chunks of `length` positions: `chunk` each (at least 2), a last
    single position joined to the chunk before it. The cache takes a one-position input for a
    decode step, which reads part of the host store, where a prefill chunk attends to all of it."""
    chunk = max(2, chunk)
    bounds = [(s, min(length, s + chunk)) for s in range(0, length, chunk)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], length)]
    return bounds


class PrefillLeft(Exception):
    """A prefill given up before its end because its prompt left (its `leave` said so: its client gone, say)."""


def prefill(
    model,
    ids: torch.Tensor,
    cache,
    chunk: int,
    *,
    progress: bool = True,
    order: str = "chunks",
    leave: Callable[[], bool] | None = None,
):
    """Feed the prompt ids [1, T] through the model in chunks of `chunk` tokens (bounded
    activation memory; see `chunk_bounds`), each through every layer, or with `order="layers"`
    the whole prompt through one layer after another (engine.layer_prefill: an empty
    HybridCache); returns the last position's logits [vocab]. `leave()`, asked before each decoder layer
    of each chunk, gives the prefill up where true: PrefillLeft, the cache half filled."""
    check_prompt_ids(ids)
    bounds = chunk_bounds(ids.shape[1], chunk)
    if order not in ("chunks", "layers"):
        raise ValueError(f"a prefill's order is 'chunks' or 'layers', got {order!r}")
    with asked_each_layer(model, leave):
        if order == "layers":
            return prefill_by_layer(model, ids, cache, bounds, progress=progress)
        bars = dict(desc="prefill", unit="chunk", disable=not progress or len(bounds) < 2, leave=False)
        for start, end in tqdm(bounds, **bars):
            logits = prefill_chunk(model, ids[:, start:end], cache)
    return logits


def check_prompt_ids(ids: torch.Tensor) -> None:
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"a prefill takes the ids of one prompt [1, T], got {tuple(ids.shape)}")


def _asking(leave: Callable[[], bool] | None) -> Callable[[], None]:
    """A check that raises PrefillLeft where `leave()` is true (none: never)."""

    def ask(*_) -> None:
        if leave is not None and leave():
            raise PrefillLeft("the prompt left during its prefill")

    return ask


@contextmanager
def asked_each_layer(model, leave: Callable[[], bool] | None):
    """Within, `leave()` is asked before each of the model's decoder layers runs (PrefillLeft where true): a
    prompt that leaves waits for one layer of its chunk, not for the chunk (seconds, deep into a long prompt)."""
    if leave is None:
        yield
        return
    ask = _asking(leave)
    hooks = [layer.register_forward_pre_hook(ask) for layer in model.model.layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def prefill_chunk(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """One chunk of a prefill, ids [1, n] after the positions the cache holds; its last position's logits [vocab]."""
    return model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]


def timed_prefill(model, ids: torch.Tensor, cache, chunk: int, **keywords):
    """`prefill` (its keywords), and the seconds it took until its last logits (the device's queue drained)."""
    t0 = time.perf_counter()
    logits = prefill(model, ids, cache, chunk, **keywords)
    sync(ids.device)
    return logits, time.perf_counter() - t0


@dataclass
class Prefilled:
    """A prompt prefilled alone into its own HybridCache, its host indexes built."""

    cache: HybridCache
    logits: torch.Tensor  # [vocab] at the prompt's last position
    prompt_tokens: int
    prefill_s: float
    index_build_s: float  # after the prefill: what its overlapped index builds left to wait for
    prefix_tokens: int = 0  # of prompt_tokens, those prefilled before (engine.prefix.Prefix)


RESERVED_NEW_TOKENS = 4096  # new positions sized for ahead (if asked for) where the model's context leaves fewer


def sized_for(model, prompt_tokens: int, max_new_tokens: int) -> int:
    """The positions a prompt's cache is sized for ahead: the prompt and its max_new_tokens, of which
    no more than reach the model's context (max_position_embeddings) or RESERVED_NEW_TOKENS, whichever
    is more. A bound given as "until the end of the text" (max_new_tokens=10**6) would otherwise
    reserve host memory the generation most likely never fills, or more than the machine has; the
    stores grow if it does fill what was reserved."""
    trained = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 0
    return prompt_tokens + min(max_new_tokens, max(trained - prompt_tokens, RESERVED_NEW_TOKENS))


def prompt_cache(model, T: int, cfg: OffloadConfig, max_new_tokens: int, *, progress: bool, stores) -> HybridCache:
    """A new HybridCache for a prompt of T tokens: sized for the positions it will likely hold (`sized_for`),
    its index builds handed to the worker as each layer sees the prompt's last token, its host stores from
    the StorePool `stores`, if given."""
    length = sized_for(model, T, max_new_tokens)
    return HybridCache(model, cfg, max_length=length, prompt_length=T, progress=progress, stores=stores)


def prefill_prompt(
    model,
    ids: torch.Tensor,
    cfg: OffloadConfig,
    max_new_tokens: int,
    *,
    progress: bool = True,
    stores=None,
    leave: Callable[[], bool] | None = None,
) -> Prefilled:
    """Prefill ids [1, T] into a new `prompt_cache` (its index builds overlapped with the prefill), then
    wait for the builds; timed apart. `leave()`, asked before each decoder layer of each chunk and each
    layer's index build, gives it up where true (PrefillLeft; the builds not started dropped, the host
    stores back to their pool)."""
    check_prompt_ids(ids)
    T = ids.shape[1]
    cache = prompt_cache(model, T, cfg, max_new_tokens, progress=progress, stores=stores)
    try:
        keywords = dict(progress=progress, order=cfg.prefill_order, leave=leave)
        logits, seconds = timed_prefill(model, ids, cache, cfg.prefill_chunk, **keywords)
        t1 = time.perf_counter()
        cache.build_indexes(_asking(leave))  # what the builds overlapped with the prefill left to do
        return Prefilled(cache, logits, T, seconds, time.perf_counter() - t1)
    except BaseException:  # given up or failed: no build thread outlives it, its stores go back to the pool
        with suppress(Exception):  # the prefill's own error is the one to tell
            cache.release()
        raise


class SteppedPrefill:
    """A prompt prefilled into its own HybridCache a chunk at a time, between the decode steps of a running batch
    it is to join (continuous batching): each `step` runs its next chunk (`OffloadConfig.prefill_chunk`
    tokens; a prefill by layers, all at once), so that the batch's steps wait for one chunk at most rather
    than a whole prompt; its index builds start after its last chunk (not beside it, which the batch's step
    would wait for too) and run on their worker thread while the batch decodes. Its times are its own
    work's, not the batch's steps between: its chunks', and the wait for its index builds."""

    def __init__(
        self,
        model,
        ids: torch.Tensor,
        cfg: OffloadConfig,
        max_new_tokens: int,
        *,
        stores=None,
        leave: Callable[[], bool] | None = None,
    ):
        check_prompt_ids(ids)
        self.model, self.ids, self.leave = model, ids, leave
        self.cache = prompt_cache(model, ids.shape[1], cfg, max_new_tokens, progress=False, stores=stores)
        self.chunks = chunk_bounds(ids.shape[1], cfg.prefill_chunk) if cfg.prefill_order == "chunks" else []
        self.logits: torch.Tensor | None = None
        self.prefill_s = 0.0

    def step(self, *, whole: bool = False) -> Prefilled | None:
        """Run its next chunk, or with `whole` every chunk left, then wait for its index builds; the Prefilled
        once its last chunk has run and its builds are done (without `whole`, a step with no chunk left only
        looks), else None; PrefillLeft where its `leave()`, asked before each decoder layer of each chunk and
        each layer's index build it waits for, is true. Whoever started it closes it where it does not join
        (`close`)."""
        if self.logits is None:
            t0 = time.perf_counter()
            try:
                self._run(whole)
                sync(self.ids.device)
            finally:  # its time also where it left
                self.prefill_s += time.perf_counter() - t0
            if self.logits is None:
                return None
        if not whole and not self.cache.builds_done():
            return None
        t1 = time.perf_counter()
        self.cache.build_indexes(_asking(self.leave))  # those without a worker thread, and any left
        return Prefilled(self.cache, self.logits, self.ids.shape[1], self.prefill_s, time.perf_counter() - t1)

    def _run(self, whole: bool) -> None:
        cfg = self.cache.offload_config
        if not self.chunks:  # by layers: the whole prompt through one layer after another
            self.logits = prefill(
                self.model, self.ids, self.cache, cfg.prefill_chunk, progress=False, order="layers", leave=self.leave
            )
            return
        while self.chunks:
            start, end = self.chunks.pop(0)
            # (its index builds not beside its last chunk: the batch's steps would wait for them)
            with self.cache.builds_after(), asked_each_layer(self.model, self.leave):
                logits = prefill_chunk(self.model, self.ids[:, start:end], self.cache)
            if not self.chunks:
                self.logits = logits
            if not whole:
                return

    def close(self) -> None:
        """Give up its cache: no build thread left, the host stores back to their pool."""
        self.cache.release()  # (which closes it first)


def sync(device: torch.device) -> None:
    """Wait for the device's queue (a GPU's) to drain, so that a time taken after it counts the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
