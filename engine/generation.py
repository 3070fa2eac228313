"""Generation: the one decode loop that `HybridLLM.generate`, `stream` and `generate_batch` and the
evaluations (bench.evals.probes.greedy) share after a prompt's prefill (engine.prefill), and the report it
fills.

`Decoding` runs B >= 1 sequences from their prefills' last logits. Each step picks every
row's next token (greedy, or sampled with a torch Generator) and yields it at once; a row
that picked an EOS token or has its max_new_tokens leaves the batch (and the cache); the
others are fed their token (or a forced one: teacher forcing) in one forward pass:
`engine.decode.recheck.forward_step` with a HybridCache (near ties re-checked exactly), a
plain forward pass with any other cache, such as full attention's DynamicCache for the
evaluations' reference answers. Yielding each token as it is picked lets one loop serve
streaming, whole results and batches; what it counts on the way is what every
`GenerationReport` is made of, in one place (`fill_report`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from engine.cache import HybridCache
from engine.decode.recheck import RecheckBudget, RowShare, forward_step
from engine.prefill import Prefilled, sync

FP32_TINY = torch.finfo(torch.float32).tiny  # the least temperature a sample divides by


@dataclass
class GenerationReport:
    """Where one sequence's time and bytes went. In a batch (`HybridLLM.generate_batch`) each
    report is its own sequence's, decode steps and time included (until it left the batch);
    the bytes are the batch's: one cache holds every sequence, and the weights serve them all."""

    prompt_tokens: int = 0
    prefix_tokens: int = 0  # of the prompt's, those a Prefix held (engine.prefix): prefilled before, not here
    new_tokens: int = 0
    prefill_s: float = 0.0
    index_build_s: float = 0.0  # after the prefill: what its overlapped index builds left to wait for
    decode_s: float = 0.0
    decode_steps: int = 0  # forward passes after prefill (the first token comes from prefill)
    device_bytes: dict[str, int] = field(default_factory=dict)
    host_bytes: dict[str, int] = field(default_factory=dict)
    # mean over decode steps of the host tokens read (every run of a step re-checked: wider, exact) / host tokens
    kv_read_frac: float = 0.0
    # ... of the keys scored by the host index (a key once for each query head of its group that scores it: up
    # to G times the host tokens; every run) / host tokens
    keys_scored_frac: float = 0.0
    rated_frac: float = 0.0  # ... of candidates rated on their keys or the key sketch (every run) / host tokens
    rechecked_steps: int = 0  # steps run again exactly at a near tie (engine.decode.recheck)
    rechecks_changed: int = 0  # ... whose re-check (its wider runs and exact run) changed its first run's greedy token
    widened_steps: int = 0  # steps run again wider first at a near tie (OffloadConfig.recheck_widen)
    wider_runs: int = 0  # ... and their runs: up to OffloadConfig.recheck_wider_runs a step
    # "eos", "stop" (a stop string), "length" (max_new_tokens), "left" (its consumer let it go), "error" (its
    # prefill failed as it joined a running batch, which went on: `error`); "": not finished
    finish_reason: str = ""
    batch: int = 1  # the most sequences in a decode step it took part in (1: alone, or no step)
    error: Exception | None = field(default=None, repr=False, compare=False)  # why it failed (finish "error")

    @property
    def first_token_s(self) -> float:
        """The prompt's own work to its first token: its prefill and the index builds still running after it. In a
        batch, not the time it waited: for the prompts prefilled before it, or, joining a running batch, for the
        batch's steps between its prefill's chunks."""
        return self.prefill_s + self.index_build_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0

    def summary(self) -> str:
        mib = 2**20
        dev = ", ".join(f"{k} {v / mib:.1f}" for k, v in self.device_bytes.items())
        host = ", ".join(f"{k} {v / mib:.1f}" for k, v in self.host_bytes.items())
        prefilled = self.prompt_tokens - self.prefix_tokens
        after = f" after a prefix of {self.prefix_tokens}" if self.prefix_tokens else ""
        return (
            f"prompt {prefilled} tokens{after}: prefill {self.prefill_s:.2f} s "
            f"({prefilled / max(self.prefill_s, 1e-9):.0f} tok/s), "
            f"host index build {self.index_build_s:.2f} s after it (first token at {self.first_token_s:.2f} s)\n"
            f"decode {self.new_tokens} tokens in {self.decode_s:.2f} s ({self.decode_tokens_per_s:.2f} tok/s); "
            f"host KV rows read per step {100 * self.kv_read_frac:.2f}%, "
            f"candidates rated {100 * self.rated_frac:.2f}%, "
            f"keys scored by the host index {100 * self.keys_scored_frac:.2f}% (once for each query head), "
            f"{self.widened_steps} near ties run again wider ({self.wider_runs} runs), {self.rechecked_steps} exactly "
            f"({self.rechecks_changed} changed the token)\n"
            f"device MiB: {dev}\nhost MiB: {host}"
        )

    def as_dict(self) -> dict:
        """Its fields as JSON takes them (the error as its type and message)."""
        d = dict(self.__dict__)
        d["error"] = None if self.error is None else f"{type(self.error).__name__}: {self.error}"
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        d["first_token_s"] = self.first_token_s
        return d


# ------------------------------------------------------------------- picks

Pick = Callable[[torch.Tensor], list[int]]  # logits [B, vocab] -> each row's token
Ending = Callable[[list[int]], str]  # a row's tokens so far -> why it ends after the last ("": it goes on)


def greedy_pick(logits: torch.Tensor) -> list[int]:
    return logits.argmax(dim=-1).tolist()


def sampler(temperature: float, generator: torch.Generator, top_k: int = 0, top_p: float = 1.0) -> Pick:
    """Greedy at temperature 0; otherwise each row drawn from softmax(logits / temperature)
    with `generator`, rows in order (a seed gives the same tokens again), among its `top_k` most
    likely tokens (0: all) and the fewest most likely whose probabilities reach `top_p` (1: all)."""
    if temperature <= 0:
        return greedy_pick

    def sample(logits: torch.Tensor) -> list[int]:
        logits = logits.float()
        # the highest at 0 before the division, and fp32's smallest normal at least below it: a tiny temperature
        # sends the others to -inf, where it gave inf - inf (and one fp32 cannot hold, 0 / 0)
        scaled = (logits - logits.max(dim=-1, keepdim=True).values) / max(temperature, FP32_TINY)
        if 0 < top_k < scaled.shape[-1]:
            kth = scaled.topk(top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if top_p < 1:
            probs, order = torch.softmax(scaled, dim=-1).sort(dim=-1, descending=True)
            reached = (probs.cumsum(dim=-1) - probs) >= top_p  # the tokens after the mass reached top_p
            scaled = scaled.masked_fill(reached.scatter(-1, order, reached), float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        return [int(torch.multinomial(p, 1, generator=generator)) for p in probs]

    return sample


def eos_ids(model) -> set[int]:
    """The model's end-of-sequence tokens (its generation config's)."""
    x = model.generation_config.eos_token_id
    if x is None:
        return set()
    return set(x) if isinstance(x, (list, tuple)) else {x}


# -------------------------------------------------------------------- loop


@dataclass
class StepRecord:
    """One forward pass with a HybridCache, per row (of the decode) that took part in it."""

    shares: dict[int, RowShare]  # what its step read (engine.decode.recheck.RowShare)
    gaps: dict[int, float]  # between the two highest logits its next token is picked from


@dataclass
class Joiner:
    """A prompt prefilled alone that joins a running `Decoding` between its steps, with its own settings."""

    prompt: Prefilled
    max_new_tokens: int
    pick: Pick = greedy_pick
    eos: set[int] | frozenset[int] = frozenset()
    ends: Ending | None = None


class Decoding:
    """Decode B >= 1 sequences from their prefills' last logits [B, vocab] ([vocab]: one), up to
    `max_new_tokens` each; iterating (once) yields (row, token) as each is picked.

    `cache` holds the prompts' positions: a HybridCache (one sequence, or several stacked by
    `HybridCache.stack`; then `lengths`, each prompt's tokens, place each row's positions), or
    any transformers cache for one sequence (e.g. full attention's DynamicCache: no step
    records, no bytes). `max_new_tokens`, `pick`, `eos` and `ends` are the batch's or, as lists,
    each row's own. A row ends after an `eos` token, after a token where `ends` (given the row's
    tokens so far) gives a reason (e.g. "stop": a stop string reached), or after its max_new_tokens-th
    (its `finish` is set before that token is yielded); with `forced` (per row, at least
    max_new_tokens - 1 tokens) row b is fed forced[b][i] after its i-th pick instead of the pick
    (teacher forcing; only the length ends it). Counted on the way, per row: `tokens`, `fed` (one
    per forward pass it took part in), `seconds` from the first pick until it left, `finish` (why
    it ended); per forward pass with a HybridCache a `StepRecord`; and the cache's `memory` report
    where the batch held the most bytes (as each row ends, and at the end).

    `joining`, for a batch (a HybridCache and `lengths`), is asked before each step for `Joiner`s, as
    `joining(False)`: each joins the batch as the next row (rows B, B+1, ...; its cache moved in by
    `HybridCache.join`), its first token picked from its prompt's logits in that step: continuous batching.
    Where every row has ended, it is asked `joining(True)`: the prompts it is still prefilling between steps
    (`SteppedPrefill`) are to join now, whole, and the decoding goes on with them (none: it ends).
    """

    def __init__(
        self,
        model,
        cache,
        logits: torch.Tensor,
        max_new_tokens: int | list[int],
        *,
        pick: Pick | list[Pick] = greedy_pick,
        eos=frozenset(),
        ends: Ending | list[Ending | None] | None = None,
        lengths: list[int] | None = None,
        forced: list[list[int]] | None = None,
        joining: Callable[[], list[Joiner]] | None = None,
    ):
        if logits.dim() not in (1, 2):
            raise ValueError(f"logits must be [vocab] or [B, vocab], got shape {list(logits.shape)}")
        self.logits = logits if logits.dim() == 2 else logits[None]  # [B, vocab]
        B = self.logits.shape[0]
        self.hybrid = isinstance(cache, HybridCache)
        if B > 1 and not (self.hybrid and lengths is not None):
            raise ValueError("a batch (B > 1) decodes from a stacked HybridCache (HybridCache.stack) with `lengths`")
        if lengths is not None and len(lengths) != B:
            raise ValueError(f"lengths must give each of the {B} rows its prompt length, got {len(lengths)}")
        self.limits = _per_row(max_new_tokens, B, "max_new_tokens", int)
        if any(n < 0 for n in self.limits):
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens!r}")
        self.picks = _per_row(pick, B, "pick", Callable)
        self.ends = _per_row(ends, B, "ends", (Callable, type(None)))
        if forced is not None and (len(forced) != B or any(len(f) < n - 1 for f, n in zip(forced, self.limits))):
            raise ValueError(f"forced must give each of the {B} rows at least max_new_tokens - 1 tokens")
        self.eos = _per_row(eos, B, "eos", (set, frozenset))
        if joining is not None and (lengths is None or forced is not None or not self.hybrid):
            raise ValueError("rows join a batch decoded from a HybridCache with `lengths`, without `forced`")
        self.model, self.cache, self.forced, self.joining = model, cache, forced, joining
        self.lengths = None if lengths is None else list(lengths)
        self.tokens: list[list[int]] = [[] for _ in range(B)]
        self.fed: list[list[int]] = [[] for _ in range(B)]
        self.seconds = [0.0] * B
        self.began = [0.0] * B  # per row, when its first pick came (its seconds count from there)
        self.finish = [""] * B  # per row, why it ended: "eos", `ends`' reason, "length" ("": consumer stopped first)
        self.budgets = [self._budget(limit) for limit in self.limits] if self.hybrid else []
        self.steps: list[StepRecord] = []
        self.memory: dict[str, dict[str, int]] = {"device": {}, "host": {}}
        self._started = False

    def _budget(self, limit: int) -> RecheckBudget:
        """A row's budget for its runs again: what they spent, and whether another may run."""
        cfg = self.cache.offload_config
        horizon = limit - 1  # its decode steps: the first token comes from the prompt's logits
        if cfg.recheck_credit_steps:
            horizon = min(horizon, cfg.recheck_credit_steps)
        return RecheckBudget(cfg.recheck_share, cfg.recheck_read_limit, horizon)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self._started:
            raise RuntimeError("a Decoding runs once")
        self._started = True
        return self._run()

    def _run(self) -> Iterator[tuple[int, int]]:
        logits, device = self.logits, self.logits.device
        rows = [row for row, limit in enumerate(self.limits) if limit]  # those still in the batch, in cache order
        ended = set()
        for row, limit in enumerate(self.limits):
            if not limit:
                self.finish[row] = "length"
        if rows and len(rows) < len(self.limits):  # rows with no token to pick leave first
            logits = logits[rows]
            self.cache.batch_select_indices(rows)
        self.began = [time.perf_counter()] * len(self.limits)
        try:
            while rows:
                if self.joining is not None:
                    logits = self._join(rows, logits, self.joining(False))
                for row, token in zip(rows, self._pick(rows, logits)):
                    self.tokens[row].append(token)
                    reason = self._ending(row, token)
                    if reason or len(self.tokens[row]) == self.limits[row]:
                        self.finish[row] = reason or "length"
                        self.seconds[row] = time.perf_counter() - self.began[row]
                        self._measure_memory()  # the batch's bytes while it was in it
                        ended.add(row)
                    yield row, token
                staying = [i for i, row in enumerate(rows) if row not in ended]
                if not staying and self.joining is not None:  # prompts on their way in go on alone
                    held = len(rows)
                    logits = self._join(rows, logits[:0], self.joining(True))
                    if len(rows) > held:
                        self.cache.batch_select_indices(list(range(held, len(rows))))  # the ended rows leave
                        rows = rows[held:]
                        continue
                if not staying:
                    break
                if len(staying) < len(rows):
                    self.cache.batch_select_indices(staying)
                    rows = [rows[i] for i in staying]
                for row in rows:
                    n = len(self.tokens[row])
                    self.fed[row].append(self.tokens[row][-1] if self.forced is None else self.forced[row][n - 1])
                latest = torch.tensor([self.fed[row][-1:] for row in rows], device=device)  # [B, 1]
                positions = None
                if self.lengths is not None:  # each row's next position after its own prompt
                    positions = torch.tensor([[self.lengths[r] + len(self.fed[r]) - 1] for r in rows], device=device)
                logits = self._forward(rows, latest, positions)
        finally:  # also when the consumer stops early or raises
            sync(device)
            for row in rows:
                if row not in ended:
                    self.seconds[row] = time.perf_counter() - self.began[row]
            self._measure_memory()

    def _join(self, rows: list[int], logits: torch.Tensor, joiners: list[Joiner]) -> torch.Tensor:
        """Take the `joiners` into the batch: each a new row, appended to `rows` (in place) and to the cache;
        returns the logits [len(rows), vocab] with theirs after."""
        for joiner in joiners:
            if not isinstance(joiner, Joiner) or joiner.max_new_tokens < 1:
                raise ValueError(f"a row joins a batch as a Joiner that asks for a token or more, got {joiner!r}")
            self.cache.join(joiner.prompt.cache)
            rows.append(len(self.limits))
            self.limits.append(joiner.max_new_tokens)
            self.picks.append(joiner.pick)
            self.eos.append(joiner.eos)
            self.ends.append(joiner.ends)
            self.lengths.append(joiner.prompt.prompt_tokens)
            self.budgets.append(self._budget(joiner.max_new_tokens))
            self.tokens.append([])
            self.fed.append([])
            self.seconds.append(0.0)
            self.finish.append("")
            self.began.append(time.perf_counter())
        if not joiners:
            return logits
        return torch.cat([logits, torch.stack([j.prompt.logits for j in joiners]).to(logits)])

    def _pick(self, rows: list[int], logits: torch.Tensor) -> list[int]:
        """The rows' next tokens from their logits [len(rows), vocab], each by its own pick."""
        if all(self.picks[row] is self.picks[rows[0]] for row in rows):  # one pick for all: one call
            return self.picks[rows[0]](logits)
        return [self.picks[row](logits[i : i + 1])[0] for i, row in enumerate(rows)]

    def _ending(self, row: int, token: int) -> str:
        """Why the row ends after `token`, its newest pick, whatever its length: "eos", the reason `ends` gives
        (e.g. "stop"), or "" (it goes on; never ends when forced)."""
        if self.forced is not None:
            return ""
        if token in self.eos[row]:
            return "eos"
        ends = self.ends[row]
        return "" if ends is None else ends(self.tokens[row])

    def _forward(self, rows: list[int], latest: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """The rows' next logits [B, vocab] after feeding them `latest` [B, 1]."""
        if not self.hybrid:
            out = self.model(input_ids=latest, position_ids=positions, cache=self.cache, use_cache=True)
            return out.logits[:, -1]
        # a near tie runs the newest positions not yet exact again, given the tokens each row fed
        budgets = [self.budgets[r] for r in rows]
        step = forward_step(self.model, self.cache, latest, positions, fed=[self.fed[r] for r in rows], budgets=budgets)
        for r, row_share in zip(rows, step.rows):
            self.budgets[r].record(row_share)
        gaps = [float("inf")] * len(rows)
        if step.logits.shape[-1] > 1:
            top = step.logits.float().topk(2, dim=-1).values
            gaps = (top[:, 0] - top[:, 1]).tolist()
        self.steps.append(StepRecord(dict(zip(rows, step.rows)), dict(zip(rows, gaps))))
        return step.logits

    def _measure_memory(self) -> None:
        if not self.hybrid:
            return
        memory = self.cache.memory_report()
        if _total(memory) >= _total(self.memory):
            self.memory = memory

    def row_steps(self, row: int) -> list[tuple[RowShare, float]]:
        """The row's (share, gap) at each forward pass with a HybridCache it took part in."""
        return [(s.shares[row], s.gaps[row]) for s in self.steps if row in s.shares]


def _per_row(value, rows: int, name: str, kind) -> list:
    """`value` for each of the rows: given once for all, or as a list of one per row; each of `kind` (a
    bool is no int: a limit of True)."""

    def of_kind(v) -> bool:
        return isinstance(v, kind) and not (kind is int and isinstance(v, bool))

    if not isinstance(value, list):
        if not of_kind(value):  # a limit of 2.5 was never reached: the row decoded on without end
            kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise TypeError(f"{name} must be {kinds}, or a list of one per row, got {value!r}")
        return [value] * rows
    if len(value) != rows or not all(of_kind(v) for v in value):
        raise ValueError(f"{name}, given as a list, must give each of the {rows} rows its own, got {value!r}")
    return list(value)


def fill_report(report: GenerationReport, run: Decoding, row: int, prompt: Prefilled, weights: int) -> None:
    """Every field of `report` for the run's sequence `row`, prefilled as `prompt`; `weights`: the model's
    bytes on the device. With `fill_prefill_ended_report`, the one place a GenerationReport is filled."""
    shares = [share for share, _ in run.row_steps(row)]
    report.prompt_tokens, report.prefix_tokens = prompt.prompt_tokens, prompt.prefix_tokens
    report.prefill_s, report.index_build_s = prompt.prefill_s, prompt.index_build_s
    report.new_tokens = len(run.tokens[row])
    report.finish_reason = run.finish[row]
    report.decode_s = run.seconds[row]
    report.decode_steps = len(run.fed[row])
    report.batch = max((len(step.shares) for step in run.steps if row in step.shares), default=1)
    report.kv_read_frac = _mean([s.kv_read for s in shares])
    report.keys_scored_frac = _mean([s.keys_scored for s in shares])
    report.rated_frac = _mean([s.rated for s in shares])
    report.rechecked_steps = sum(s.rechecked for s in shares)
    report.rechecks_changed = sum(s.changed for s in shares if s.rechecked)
    report.widened_steps = sum(s.widened for s in shares)
    report.wider_runs = sum(s.wider_runs for s in shares)
    report.device_bytes = {"weights": weights, **run.memory["device"]}
    report.host_bytes = dict(run.memory["host"])


def fill_prefill_ended_report(
    report: GenerationReport,
    prompt_tokens: int,
    prefix_tokens: int,
    prefill_s: float,
    weights: int,
    error: Exception | None = None,
):
    """`report` for a sequence that ended in its prefill, with no token: finish "left" where its prompt left
    (PrefillLeft), "error" where the prefill raised `error`."""
    report.prompt_tokens, report.prefix_tokens, report.prefill_s = prompt_tokens, prefix_tokens, prefill_s
    report.finish_reason = "left" if error is None else "error"
    report.error = error
    report.device_bytes = {"weights": weights}
    _drop_locals(error)


def _drop_locals(error: BaseException | None) -> None:
    """The locals of the frames `error`'s traceback (and those of its causes) holds, let go: an error kept with
    its report kept its frames' caches and activations (and, through the batch's, every other prompt's cache).
    The frames still running (the one that caught it and its callers) leave the traceback; the lines of the
    others stay."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            try:
                tb.tb_frame.clear()
            except RuntimeError:  # running: the traceback's first entries
                error.__traceback__ = tb.tb_next
            tb = tb.tb_next
        error = error.__cause__ or error.__context__


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _total(memory: dict[str, dict[str, int]]) -> int:
    return sum(n for parts in memory.values() for n in parts.values())
