"""Timers: warm-up then the median of several runs, runs taken in turns, and a clock of
the seconds spent in each layer's attention (and cache update) during a forward pass."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from engine.attention import hybrid_attention_forward

T = TypeVar("T")


def warm_up(llm, prompt) -> None:
    """An untimed generation of one token from `prompt` (and the key index's kernels loaded): what a first
    long prompt pays once, its first call's allocations and compilations, left out of the timings after it."""
    from ann.precompile import precompile

    precompile()
    llm.generate(prompt, 1, progress=False)


def kept_prefill_s(report: dict) -> float:
    """The seconds a server request's prompt (or document) took to prefill into the server's kept cache, which
    its report ("hybridattn" of an answer) gives apart from its own prefill (0 where nothing was kept)."""
    return report.get("kept", {}).get("prefill_s", 0.0)


def median_ms(fn: Callable[[], object], reps: int, warmup_s: float = 0.05) -> float:
    """Median of `reps` timed calls, after running `fn` for `warmup_s` seconds (caches,
    page tables, and thread pools left spinning by the previous measurement settle)."""
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


# Shares of decode steps run again at a near tie with the default, free-running on the bundled model's
# prose at the longest context measured on six prompts or more, where they are highest (docs/results.md,
# "Credit steps": 16K stretched by YaRN x2, 6 prompts of 256 tokens, 2026-12-04): of 1,530 steps, 59 ran
# wider first (OffloadConfig.recheck_widen), 24 of those a second time, wider again (RowShare.wider_runs),
# and 13 also exactly. An exact run covers the positions decoded since the last one: at that rate about 118
# (at most OffloadConfig.exact_span: the benchmarks time min(RECHECK_SPAN, exact_span(host tokens))).
PROSE_WIDER_RATES = (0.0386, 0.0157)  # the first wider run's share of the steps, the second's
PROSE_EXACT_RATE = 0.0085
RECHECK_SPAN = round(1 / PROSE_EXACT_RATE)


def with_rechecks(step: float, wider: Sequence[float], exact: float) -> float:
    """The mean cost per token of a step that costs `step` alone, when a share PROSE_WIDER_RATES[i]
    of the steps also runs again wider an i-th time, at `wider[i]` each (a configuration with fewer
    wider runs gives fewer), and a share PROSE_EXACT_RATE of them exactly too, at `exact` each
    (min(RECHECK_SPAN, window) positions run again)."""
    if len(wider) > len(PROSE_WIDER_RATES):
        raise ValueError(f"{len(wider)} wider runs timed, rates known for {len(PROSE_WIDER_RATES)}")
    return step + sum(rate * ms for rate, ms in zip(PROSE_WIDER_RATES, wider)) + PROSE_EXACT_RATE * exact


def running_again(cache, exact: int = 0, wider: float = 0.0):
    """The context in which a forward pass runs the newest position(s) again as a near tie's do
    (engine.decode.recheck): the `exact` newest positions as an exact chunk, or the newest one
    read `wider` times wider; with neither, a plain step."""
    if exact:
        return cache.rerun_exactly([0], exact)
    return cache.rerun_wider([0], wider) if wider else contextlib.nullcontext()


def in_turns(runs: dict[str, Callable[[int], T]], steps: int, warmup: int = 2) -> dict[str, list[T]]:
    """Call every run `warmup + steps` times, the runs taking turns at each step, so that the
    machine's drift over the whole run falls on all of them alike; each call is given the
    step's index. Returns, per run, what its calls after the warm-up returned."""
    samples: dict[str, list[T]] = {name: [] for name in runs}
    for step in range(warmup + steps):
        for name, run in runs.items():
            result = run(step)
            if step >= warmup:
                samples[name].append(result)
    return samples


class Synced:
    """Seconds between a synchronised start and a synchronised end (CUDA work is asynchronous)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.start


class LayerClock:
    """An attention function, the engine's own ("hybrid"), that adds the seconds of every
    call to `seconds` (synchronised on a CUDA device); `timed(cache_class)` makes caches whose
    `update()` adds its seconds too. Register it with transformers' `AttentionInterface` under
    a name of its own, run the model with that implementation, and set `seconds` to 0 before
    a forward pass: the seconds per layer are then `seconds / n_layers`. The part of a decode
    step the engine replaces is timed apart from the rest of the model this way. `select`: the
    decode steps' selection rule when not the engine's (engine.decode.host.python_selection
    times the Python path beside the native call)."""

    def __init__(self, device: torch.device | str = "cpu", select=None):
        self.device, self.seconds = torch.device(device), 0.0
        self.select = select  # the decode steps' selection rule; None: the engine's
        self.running = True

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        rule = {} if self.select is None else {"select": self.select}
        if not self.running:
            return hybrid_attention_forward(module, query, key, value, attention_mask, **kwargs, **rule)
        with Synced(self.device) as t:
            out = hybrid_attention_forward(module, query, key, value, attention_mask, **kwargs, **rule)
        self.seconds += t.seconds
        return out

    @contextlib.contextmanager
    def paused(self, pause: bool = True):
        """Attention calls untimed while inside (with `pause`): on a GPU the clock synchronises before
        and after every layer's attention, so the host cannot queue one layer's kernels while the
        device runs the last ones'; a token's time is measured with the clock paused."""
        self.running = not pause
        try:
            yield
        finally:
            self.running = True

    def timed(self, cache_class: type) -> type:
        """A subclass of `cache_class` whose `update()` seconds this clock counts."""
        clock = self

        class Timed(cache_class):
            def update(self, *args, **kwargs):
                with Synced(clock.device) as t:
                    out = super().update(*args, **kwargs)
                clock.seconds += t.seconds
                return out

        Timed.__name__ = Timed.__qualname__ = f"Timed{cache_class.__name__}"
        return Timed
