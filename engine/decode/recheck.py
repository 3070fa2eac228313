"""One decode forward pass, with near ties re-checked (wider, then exactly).

Reading a part of the host tokens and estimating the rest moves a step's logits
a little. That changes the greedy token only where full attention's two highest
logits are about as close, and a continuation that parts from full attention's
seldom comes back to it. The error is not the step's alone: the K/V of every
token decoded before it came from approximate steps too. So where a sequence's
two highest logits lie less than `OffloadConfig.recheck_margin` apart, the
tokens it decoded since its last exact run are run again as an exact prefill
chunk (`HybridCache.rerun_exactly`): their K/V, and the step's logits, are then full
attention's. The last exact run is the prompt's prefill or the re-check before:
positions a re-check made exact stay so, since their K/V depend only on the
positions before them (`HybridCache.approximate_newest` counts those after).
Each position run again attends to every host token, so an exact run takes only
the newest of them that `OffloadConfig.recheck_work` allows (positions x host
tokens; `OffloadConfig.exact_span`); older ones keep their approximate K/V, and
the step's logits are full attention's given those.

An exact run reads every host token. With `OffloadConfig.recheck_widen` > 1 a near
tie first runs its step alone again, reading with a selection that many times
wider (`HybridCache.rerun_wider`), and again that many times wider still, up to
`recheck_wider_runs` runs: most near ties are the first run's error, and a wider
run settles them at a few times the step's read; only where the widest run's two
highest logits still lie less than `recheck_wide_margin` apart does the exact run
follow. `RecheckBudget` bounds them all: `recheck_share` the exact runs' share of
the steps, `recheck_read_limit` every run again by what the generation has read; with
`recheck_fit_wider` a wider run it does not afford runs as wide as it affords instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from engine.config import MAX_COUNT


class RowShare(NamedTuple):
    """One sequence's part of a step, as shares of its host tokens (0 while it has none)."""

    kv_read: float  # host tokens read by the step (every run when re-checked) / host tokens
    selected: float  # ... by its first run alone: the selection's share
    keys_scored: float  # keys scored by the host index (every run) / host tokens
    rated: float  # candidates rated on their keys or the key sketch (every run) / host tokens
    rechecked: bool  # whether its step ran again exactly
    changed: bool = False  # ... or wider, and that changed its greedy token (a re-check that mattered)
    wider_runs: int = 0  # how many times its step ran again wider first (OffloadConfig.recheck_widen)

    @property
    def widened(self) -> bool:
        """Whether its step ran again wider first."""
        return self.wider_runs > 0


@dataclass
class Step:
    logits: torch.Tensor  # [B, vocab] of the positions fed
    kv_read_frac: float  # host tokens read by the step (every run) / host tokens, over the batch
    selected_frac: float  # ... by its first run alone: the selection's share
    keys_scored_frac: float  # keys scored by the host index / host tokens
    rated_frac: float  # candidates rated on their keys or the key sketch / host tokens
    rechecked: int  # sequences whose step ran again exactly
    rows: list[RowShare]  # the same per sequence of the batch, in its order
    widened: int = 0  # sequences whose step ran again wider first


def near_ties(logits: torch.Tensor, margin: float) -> list[int]:
    """Rows of logits [B, vocab] whose two highest values lie less than `margin` apart."""
    if margin <= 0 or logits.shape[-1] < 2:
        return []
    top = logits.float().topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1] < margin).nonzero()[:, 0].tolist()


class RecheckBudget:
    """What one sequence's generation has read and run again so far, and whether a step may run
    again: an exact run while the exact runs stay within `share` of its steps (its first near tie
    always may; OffloadConfig.recheck_share); with a `read_limit`, a run again only while the
    generation's host reads, with that run's, stay within `read_limit` times its selection's
    (OffloadConfig.recheck_read_limit; 0: no limit). A wider run's reads are foreseen over a
    `horizon` of decode steps (OffloadConfig.recheck_credit_steps, or the generation's length
    asked for where shorter): an answer's near ties come early, when its selection has read
    little, and its wider runs may spend what the steps to come will earn at the selection's
    mean share so far (a generation that stops before its horizon may end above the limit;
    past it, every run stays within the reads so far); an exact run, a whole pass, waits until
    they are read.
    Reads are shares of the host tokens, summed over the steps."""

    def __init__(self, share: float, read_limit: float = 0.0, horizon: int = 0):
        # held to a count a float holds: "until the end" may be asked as 10**400 (no generation runs 2**31 steps)
        self.share, self.read_limit, self.horizon = share, read_limit, min(horizon, MAX_COUNT)
        self.steps = self.rechecked = 0
        self.read = self.selected = 0.0  # sums over its steps of RowShare.kv_read and .selected

    def affords(self, selected: float, spent: float, extra: float, exact: bool = False) -> bool:
        """Whether this step, whose selection read `selected` and whose runs so far read `spent`
        (the selection's included), may run again reading `extra` more; exactly (`exact`: every
        host token) or wider."""
        if exact and not may_recheck(self.rechecked, self.steps + 1, self.share):
            return False
        if not self.read_limit:
            return True
        to_come, limit = self._foreseen(selected, exact)
        return self.read + spent + extra + to_come <= limit

    def room(self, selected: float, spent: float) -> float:
        """The most a wider run of this step may read (`affords`; inf without a read limit)."""
        if not self.read_limit:
            return float("inf")
        to_come, limit = self._foreseen(selected, False)
        return limit - (self.read + spent + to_come)

    def _foreseen(self, selected: float, exact: bool) -> tuple[float, float]:
        """The selection's reads foreseen after this step (an exact run waits until they are read),
        and the most the generation may read with them."""
        steps, chosen = self.steps + 1, self.selected + selected
        to_come = 0.0 if exact else chosen / steps * max(0, self.horizon - steps)
        return to_come, self.read_limit * (chosen + to_come)

    def record(self, row: RowShare) -> None:
        self.steps += 1
        self.rechecked += row.rechecked
        self.read += row.kv_read
        self.selected += row.selected


def may_recheck(rechecked: int, steps: int, share: float) -> bool:
    """Whether a sequence that re-checked `rechecked` of its first `steps` decode steps (this one
    included) may re-check this one: its first near tie may, later ones while its re-checks stay
    within `share` of its steps (OffloadConfig.recheck_share)."""
    return rechecked < max(1.0, share * steps)


def forward_step(
    model,
    cache,
    tokens: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    fed: list[list[int]] | None = None,
    budgets: list[RecheckBudget] | None = None,
) -> Step:
    """Feed tokens [B, 1] (at position_ids [B, 1], or after the cache's positions) through the
    model with a HybridCache. `fed` holds each row's tokens fed since the prompt, ending with
    its token in `tokens` (rows that joined a running batch have fed fewer; None: `tokens` alone);
    `budgets` say which rows may run again at this step, and how (None: all; `RecheckBudget`). At
    a near tie a row's step first runs again wider (`recheck_widen` > 1), up to `recheck_wider_runs` times, each wider
    than the one before, while its two highest logits still lie within `recheck_wide_margin`;
    where the widest run leaves a near tie too, the row's newest positions that approximate
    steps wrote since its last exact run (at most `OffloadConfig.exact_span` of them) run again exactly;
    the positions before them are exact already or left approximate, so each decoded position
    runs again exactly at most once however many near ties follow it."""
    cfg = cache.offload_config
    logits = model(input_ids=tokens, position_ids=position_ids, cache=cache, use_cache=True).logits[:, -1]
    first = logits
    # the first run's, per sequence: a run again reads more
    counts = [
        (st["host_tokens"], st["gathered"], st["keys_scored"], st["rated"])
        for st in map(cache.step_stats, range(len(tokens)))
    ]
    share = [gathered / host if host else 0.0 for host, gathered, *_ in counts]  # each row's selection
    wider = {}  # rows run again wider -> [host tokens gathered, keys scored, candidates rated] by those runs
    runs = {}  # ... -> how many wider runs
    widths = {}  # ... -> how many times its selection their last wider run read

    def spent(r: int) -> float:  # what row r's runs of this step read so far, a share of its host tokens
        return share[r] + (wider[r][0] / counts[r][0] if r in wider and counts[r][0] else 0.0)

    def affords(r: int, extra: float, exact: bool = False) -> bool:  # extra: a share of the host tokens
        return budgets is None or budgets[r].affords(share[r], spent(r), extra, exact)

    def width(r: int, factor: float) -> float:
        """How many times its selection row r's next wider run reads: `factor` where its budget
        affords that (its read foreseen), else with `recheck_fit_wider` as many as it affords where
        that is at least 2 and more than its run before; 0: it does not run."""
        if affords(r, min(1.0, factor * share[r])):
            return factor
        if not (cfg.recheck_fit_wider and share[r]):  # (without budgets every factor is afforded)
            return 0.0
        fit = budgets[r].room(share[r], spent(r)) / share[r]
        return fit if fit >= 2.0 - 1e-9 and fit > widths.get(r, 1.0) else 0.0  # 2 fits a first step exactly

    # a sequence without approximate positions read every host token for this step already
    pending = {r: cache.approximate_newest(r) for r in near_ties(logits, cfg.recheck_margin)}
    rows = [r for r, count in pending.items() if count]
    for factor in cfg.wider_factors:
        fits = {r: f for r in rows if (f := width(r, factor))}
        rows = list(fits)  # a tie left without its wider run runs no further
        if not rows:
            break
        tied = []
        for f in sorted(set(fits.values())):  # one run per width: a batch's rows may afford different ones
            group = [r for r in fits if fits[r] == f]
            positions = None if position_ids is None else position_ids[group]
            with cache.rerun_wider(group, f):
                out = model(input_ids=tokens[group], position_ids=positions, cache=cache, use_cache=True)
            wide = out.logits[:, -1]
            for r in group:
                stats, sums = cache.step_stats(r), wider.setdefault(r, [0, 0, 0])
                for i, name in enumerate(("gathered", "keys_scored", "rated")):
                    sums[i] += stats[name]
                runs[r], widths[r] = runs.get(r, 0) + 1, f
            logits = logits.clone() if logits is first else logits
            logits[group] = wide
            tied += [group[i] for i in near_ties(wide, cfg.recheck_wide_margin)]  # the ties the wider run left
        rows = sorted(tied)
    rows = [r for r in rows if affords(r, 1.0, exact=True)]
    # each row's exact span: its positions approximate since its last exact run, as many as it fed and its
    # host tokens allow (a row that joined the batch lately does not cut another's short)
    spans = {r: 1 if fed is None else min(len(fed[r]), cfg.exact_span(cache.host_tokens(r)), pending[r]) for r in rows}
    for n in sorted(set(spans.values())):  # one run per span: only here are the fed tokens made a tensor
        group = [r for r in rows if spans[r] == n]
        ids = tokens[group] if fed is None else torch.tensor([fed[r][-n:] for r in group], device=tokens.device)
        positions = None
        if position_ids is not None:
            positions = position_ids[group] + torch.arange(1 - n, 1, device=position_ids.device)
        with cache.rerun_exactly(group, n):
            exact = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits
        logits = logits.clone() if logits is first else logits
        logits[group] = exact[:, -1]
    again = set(rows)
    run_again = sorted(again | set(wider))
    changed = set()
    if run_again:
        same = (first[run_again].argmax(dim=-1) == logits[run_again].argmax(dim=-1)).tolist()
        changed = {r for r, kept in zip(run_again, same) if not kept}
    shares = []
    for r, (host, gathered, keys, rated) in enumerate(counts):
        more = wider.get(r, (0, 0, 0))  # the wider runs' work beside the first run's
        read = gathered + more[0] + host * (r in again)
        row = (read / host, share[r], (keys + more[1]) / host, (rated + more[2]) / host) if host else (0.0,) * 4
        shares.append(RowShare(*row, r in again, r in changed, runs.get(r, 0)))
    host, gathered, keys, rated = (sum(c[i] for c in counts) for i in range(4))
    more = [sum(w[i] for w in wider.values()) for i in range(3)]
    read = gathered + more[0] + sum(counts[r][0] for r in rows)
    keys, rated = keys + more[1], rated + more[2]
    return Step(
        logits,
        read / host if host else 0.0,
        gathered / host if host else 0.0,
        keys / host if host else 0.0,
        rated / host if host else 0.0,
        len(rows),
        shares,
        len(wider),
    )
