"""A batch's run, from its prompts' token ids to their last tokens (`run_batch`): each prompt prefilled into
its own HybridCache, the caches stacked and decoded together (engine.generation.Decoding), prompts joining the
running batch (prefilled a chunk a step) and leaving it (in their prefill or after a token), and the cache
released, or rewound to a prefix's document, at the end. Encoding prompts and checking them is the caller's
(engine.api.HybridLLM)."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator

import torch

from engine.cache import HybridCache
from engine.cache.store import StorePool
from engine.config import OffloadConfig
from engine.generation import (
    Decoding,
    Ending,
    GenerationReport,
    Joiner,
    eos_ids,
    fill_prefill_ended_report,
    fill_report,
)
from engine.prefill import Prefilled, PrefillLeft, SteppedPrefill, prefill_prompt
from engine.prefix import Prefix

log = logging.getLogger(__name__)


@torch.inference_mode()
def run_batch(
    model,
    offload: OffloadConfig,
    stores: StorePool,
    ids: list[torch.Tensor],
    max_new_tokens: int | list[int],
    reports: list[GenerationReport],
    *,
    pick,
    ends: Ending | list[Ending | None] | None = None,
    stop_at_eos: bool | list[bool] = True,
    prefix: Prefix | None = None,
    progress: bool = True,
    more: Callable[[], list[tuple]] | None = None,
    leave: Callable[[int], bool] | None = None,
    fail_alone: bool = False,
) -> Iterator[tuple[int, int | None, str]]:
    """(prompt's index, token, finish) as each token is picked, finish "" until the prompt's last (then why
    it ended; its report filled then): the prompts' token `ids` ([1, T] each) prefilled one by one, each into
    its own HybridCache, stacked into one when there are several, then decoded together (Decoding, which
    takes `max_new_tokens`, `pick`, `ends` and `stop_at_eos`'s end tokens for all prompts or per prompt).
    `more()`, asked before a step where no prompt is on its way in, gives prompts that join the batch, each
    as (ids [1, T], max_new_tokens >= 1, pick, ends, stop_at_eos), its report appended to `reports` by then;
    each is prefilled a chunk a step (`SteppedPrefill`) and joins once done. With a `prefix`, the first
    prompt continues it, and those that join take its cache into their batch until the end, when it goes
    back to the document's state. `leave(i)`, asked as prompt i is prefilled (its index: the prompts', then
    those from more() in order) and after each of its tokens that `ends` does not end, ends it where true:
    in its prefill, (i, None, "left") then, its report filled; after a token, with finish "left". The others
    go on. A prompt from more() whose prefill raises (its host store not allocated, say) fails alone: (i, None,
    "error"), its report's `error` the exception; the batch goes on. So does one of the prompts given
    whose prefill raises, with `fail_alone` (else the call raises). Fills the reports not filled yet at the
    end, also when the consumer stops. Warns where a prompt and its new tokens run past the model's trained
    positions (`warn_past_context`)."""
    before = prefix.tokens if prefix is not None else 0
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(ids)
    longest, new = max(((x.shape[1], n) for x, n in zip(ids, limits)), key=sum)
    warn_past_context(model, before + longest, new)
    done: list[Prefilled] = []  # the decoding's rows' prefills
    names: list[int] = []  # ... and their prompts' indices
    arriving: deque[tuple[SteppedPrefill, tuple, int]] = deque()  # prompts prefilled between steps to join
    joined = itertools.count(len(ids))  # the index of the next prompt from more()
    ended: deque[tuple[int, None, str]] = deque()  # (prompt, no token, why) of those from more() ended in their prefill
    run = None
    filled: set[int] = set()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    def asked(i: int) -> Callable[[], bool] | None:
        return None if leave is None else lambda: leave(i)

    def joining(whole: bool) -> list[Joiner]:
        """The next prompt on its way in, once its prefill, a chunk a step (`whole`: the rest at once), is
        done; they join in the order given, one prefilled at a time, and `more()` is asked when none is."""
        if not arriving and not whole:
            for x, limit, pick, ends, stop_at_eos in more():
                if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                    raise ValueError(
                        f"a prompt joins a running batch for a token or more, got max_new_tokens={limit!r}"
                    )
                i = next(joined)
                warn_past_context(model, x.shape[1], limit)
                settings = (limit, pick, end_tokens(model, stop_at_eos), _ending(ends, asked(i)))
                try:
                    arrival = SteppedPrefill(model, x, offload, limit, stores=stores, leave=asked(i))
                except Exception as error:  # its cache not allocated, say: it fails alone
                    ended_in_prefill(i, x.shape[1], 0.0, error)
                    continue
                arriving.append((arrival, settings, i))
        while arriving:
            arrival, settings, i = arriving[0]
            try:
                prompt = arrival.step(whole=whole)
            except Exception as error:  # it left, or its own prefill failed: the batch goes on without it
                arriving.popleft()
                arrival.close()
                ended_in_prefill(
                    i, arrival.ids.shape[1], arrival.prefill_s, None if isinstance(error, PrefillLeft) else error
                )
                continue
            if prompt is None:
                return []
            arriving.popleft()
            done.append(prompt)
            names.append(i)
            return [Joiner(prompt, *settings)]
        return []

    def ended_in_prefill(i: int, tokens: int, prefill_s: float, error: Exception | None) -> None:
        fill_prefill_ended_report(reports[i], tokens, 0, prefill_s, weights, error)
        ended.append((i, None, reports[i].finish_reason))

    def fill(row: int) -> None:
        report = reports[names[row]]
        fill_report(report, run, row, done[row], weights)
        if prefix is not None:  # its copies to go back to the document's state
            copies = prefix.nbytes()
            report.device_bytes.update(copies["device"])
            report.host_bytes.update(copies["host"])
        filled.add(row)

    try:
        for i, (x, limit) in enumerate(zip(ids, limits)):
            t0 = time.perf_counter()
            try:
                if prefix is not None:
                    done.append(prefix.continued(x, progress=progress, leave=asked(i)))
                else:
                    done.append(
                        prefill_prompt(model, x, offload, limit, progress=progress, stores=stores, leave=asked(i))
                    )
            except Exception as error:  # left (PrefillLeft), or failed: the others go on, where it may fail alone
                if not (isinstance(error, PrefillLeft) or fail_alone):
                    raise
                failed = None if isinstance(error, PrefillLeft) else error
                fill_prefill_ended_report(
                    reports[i], before + x.shape[1], before, time.perf_counter() - t0, weights, failed
                )
                yield i, None, reports[i].finish_reason
                continue
            names.append(i)
        if not done:
            return
        cache = done[0].cache if len(done) == 1 else HybridCache.stack([p.cache for p in done])
        run = Decoding(
            model,
            cache,
            torch.stack([p.logits for p in done]),
            _of_rows(max_new_tokens, names),
            pick=_of_rows(pick, names),
            eos=end_tokens(model, _of_rows(stop_at_eos, names)),
            ends=[_ending(ends[i] if isinstance(ends, list) else ends, asked(i)) for i in names],
            lengths=None if len(done) == 1 and more is None else [p.prompt_tokens for p in done],
            joining=None if more is None else joining,
        )
        for row, token in run:
            if run.finish[row]:
                fill(row)
            yield names[row], token, run.finish[row]
            while ended:
                yield ended.popleft()
        while ended:
            yield ended.popleft()
    finally:  # also when the consumer stops early or raises: no build thread outlives the call
        for arrival, _, _ in arriving:
            arrival.close()
        for p in done:
            p.cache.close()
        if run is not None:
            for row in set(range(len(done))) - filled:
                fill(row)
        if prefix is not None and done:
            prefix.rewind()  # the document's state again, for its next prompt (the rows that joined leave)
        else:
            if run is not None:
                run.cache.release()  # the host stores, for the next call
            for p in done:
                p.cache.release()


def warn_past_context(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """A warning where the prompt and its new tokens run past the positions the model was trained
    on: the engine attends there as asked, but the model's output may degrade."""
    trained = getattr(model.config, "max_position_embeddings", None)
    positions = prompt_tokens + max(0, max_new_tokens - 1)  # the last new token is not fed back
    if trained and positions > trained:
        log.warning(
            "hybridattn: a prompt of %d tokens and %d new tokens take the model to %d positions, past the %d "
            "it was trained on (max_position_embeddings); its output may degrade there. rope_scale "
            "(HybridLLM.from_pretrained, hybridattn generate --rope-scale) stretches its context.",
            prompt_tokens,
            max_new_tokens,
            positions,
            trained,
        )


def end_tokens(model, stop_at_eos: bool | list[bool]) -> set[int] | list[set[int]]:
    """The end-of-sequence tokens each row stops at: the model's where it stops at them, none where not."""
    eos = eos_ids(model)
    if isinstance(stop_at_eos, list):
        return [eos if stop else set() for stop in stop_at_eos]
    return eos if stop_at_eos else set()


def _of_rows(value, rows: list[int]):
    """A setting given once for all prompts, or as a list of one per prompt, for the `rows` (prompts' indices)."""
    return [value[i] for i in rows] if isinstance(value, list) else value


def _ending(end: Ending | None, leave: Callable[[], bool] | None) -> Ending | None:
    """A row's end check for Decoding (None: none): `end`'s reason where it gives one, else "left" where
    `leave()` is true, else ""."""
    if leave is None:
        return end

    def ending(tokens: list[int]) -> str:
        return (end(tokens) if end is not None else "") or ("left" if leave() else "")

    return ending
