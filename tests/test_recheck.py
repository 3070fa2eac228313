"""Near ties re-checked exactly (engine.decode.recheck): the tokens decoded since the last exact run
run again as an exact chunk, replace their positions' K/V and leave every other position
where it was."""

import pytest
import torch
from transformers import DynamicCache

from engine import HybridCache, OffloadConfig
from engine.decode.recheck import RecheckBudget, RowShare, forward_step, may_recheck, near_ties
from engine.generation import Decoding

# a small window and blocks: the tiny prompts leave most tokens on the host, read in part
# near ties straight to the exact run, unbounded by reads (the wider run and the limit: tests of their own)
APPROXIMATE = OffloadConfig(
    n_sink=4, window=16, block_size=8, recheck_margin=0.0, recheck_widen=1.0, recheck_read_limit=0.0
)
ALWAYS = APPROXIMATE.replace(recheck_margin=1e9)  # every step is a near tie
PROMPT, STEPS = 300, 12


def decode(model, ids, cfg):
    """Prefill ids[:, :PROMPT], then feed ids[PROMPT : PROMPT + STEPS] through forward_step."""
    cache = HybridCache(model, cfg)
    with torch.no_grad():
        model(ids[:, :PROMPT], cache=cache, use_cache=True)
        cache.build_indexes()
        steps = [
            forward_step(model, cache, ids[:, t : t + 1], fed=ids[:, PROMPT : t + 1].tolist())
            for t in range(PROMPT, PROMPT + STEPS)
        ]
    return cache, steps


def forced_generation(model, ids, cfg) -> Decoding:
    """A generation of STEPS + 1 tokens after ids[:, :PROMPT], fed the tokens of ids that follow."""
    cache = HybridCache(model, cfg)
    with torch.no_grad():
        logits = model(ids[:, :PROMPT], cache=cache, use_cache=True).logits[0, -1]
        cache.build_indexes()
        run = Decoding(model, cache, logits, STEPS + 1, forced=[ids[0, PROMPT:].tolist()])
        list(run)
    return run


def full_kv(model, ids):
    """Full attention's K/V of ids[:, :PROMPT + STEPS] per layer."""
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, : PROMPT + STEPS], cache=cache, use_cache=True)
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def test_near_ties_are_the_rows_whose_top_two_logits_lie_within_the_margin():
    logits = torch.tensor([[0.0, 3.0, 2.9], [5.0, 1.0, 0.0], [1.0, 1.0, -2.0]])
    assert near_ties(logits, 0.5) == [0, 2]
    assert near_ties(logits, 0.05) == [2]
    assert near_ties(logits, 0.0) == []


def test_steps_run_again_are_full_attention_logits_and_kv(tiny_model, tiny_ids, tiny_full_logits):
    cache, steps = decode(tiny_model, tiny_ids, ALWAYS)
    logits = torch.stack([s.logits[0] for s in steps])
    expected = tiny_full_logits[0, PROMPT : PROMPT + STEPS]
    assert (logits - expected).abs().max() <= 1e-4
    assert all(s.rechecked == 1 and s.kv_read_frac > 1 for s in steps)  # both runs' reads counted
    for layer, (k, v) in zip(cache.layers, full_kv(tiny_model, tiny_ids)):
        got_k, got_v = layer.ordered_kv()
        assert (got_k - k).abs().max() <= 1e-4 and (got_v - v).abs().max() <= 1e-4
    # every position in exactly one place, none added by the runs again
    where = cache.layers[1].positions()
    every = sorted(p for part in where.values() for p in part.tolist())
    assert every == list(range(PROMPT + STEPS))


def test_without_the_recheck_the_same_steps_are_approximate(tiny_model, tiny_ids, tiny_full_logits):
    cache, steps = decode(tiny_model, tiny_ids, APPROXIMATE)
    logits = torch.stack([s.logits[0] for s in steps])
    assert (logits - tiny_full_logits[0, PROMPT : PROMPT + STEPS]).abs().max() > 1e-3
    assert all(s.rechecked == 0 and s.kv_read_frac < 1 for s in steps)
    k, _ = full_kv(tiny_model, tiny_ids)[1]
    assert (cache.layers[1].ordered_kv()[0] - k).abs().max() > 1e-3  # later layers' K of decoded positions


def test_a_run_again_makes_every_token_decoded_since_the_prompt_exact(tiny_model, tiny_ids, tiny_full_logits):
    """Approximate steps leave approximate K/V behind; running them again as one chunk gives
    full attention's K/V for all of them and full attention's logits for the last."""
    cache, _ = decode(tiny_model, tiny_ids, APPROXIMATE)
    host = cache.layers[1].host.n
    with torch.no_grad(), cache.rerun_exactly([0], STEPS):
        logits = tiny_model(tiny_ids[:, PROMPT : PROMPT + STEPS], cache=cache, use_cache=True).logits[0]
    assert (logits - tiny_full_logits[0, PROMPT : PROMPT + STEPS]).abs().max() <= 1e-4
    for layer, (k, v) in zip(cache.layers, full_kv(tiny_model, tiny_ids)):
        got_k, got_v = layer.ordered_kv()
        assert (got_k - k).abs().max() <= 1e-4 and (got_v - v).abs().max() <= 1e-4
    assert cache.get_seq_length() == PROMPT + STEPS and cache.layers[1].host.n == host


def test_positions_run_again_must_lie_in_the_window(tiny_model, tiny_ids):
    cache, _ = decode(tiny_model, tiny_ids, APPROXIMATE)
    n = APPROXIMATE.window + 1
    with pytest.raises(ValueError, match="in the window"), torch.no_grad(), cache.rerun_exactly([0], n):
        tiny_model(tiny_ids[:, PROMPT + STEPS - n : PROMPT + STEPS], cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="positions to run again must be an int >= 1"):
        with cache.rerun_exactly([0], 0):
            pass


@pytest.mark.parametrize("widen", [1.0, 3.0])
def test_a_batch_runs_again_only_its_near_ties_each_as_alone(tiny_model, tiny_ids, widen):
    lengths, margin = (150, 231, 197), 0.06  # a random model's margins are small
    cfg = APPROXIMATE.replace(recheck_margin=margin, recheck_widen=widen, recheck_wide_margin=margin / 4)
    prompts = [tiny_ids[0, 7 * i : 7 * i + n] for i, n in enumerate(lengths)]
    forced = torch.randint(0, 97, (len(prompts), STEPS), generator=torch.Generator().manual_seed(4))
    caches, alone = [], []
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            cache = HybridCache(tiny_model, cfg)
            tiny_model(prompt[None], cache=cache, use_cache=True)
            cache.build_indexes()
            caches.append(cache)
            mine = HybridCache(tiny_model, cfg)
            tiny_model(prompt[None], cache=mine, use_cache=True)
            mine.build_indexes()
            alone.append(
                [
                    forward_step(
                        tiny_model, mine, forced[b : b + 1, t : t + 1], fed=forced[b : b + 1, : t + 1].tolist()
                    )
                    for t in range(STEPS)
                ]
            )
        batch = HybridCache.stack(caches)
        positions = torch.tensor([[n] for n in lengths])
        together = [
            forward_step(tiny_model, batch, forced[:, t : t + 1], positions + t, fed=forced[:, : t + 1].tolist())
            for t in range(STEPS)
        ]
    rechecked = sum(s.rechecked for s in together)
    assert 0 < rechecked < len(prompts) * STEPS  # some rows, not all: the others must not run again
    assert rechecked == sum(s.rechecked for steps in alone for s in steps)
    widened = sum(s.widened for s in together)
    assert widened == sum(s.widened for steps in alone for s in steps)
    assert (widened > rechecked) if widen > 1 else widened == 0, (widened, rechecked)
    for b in range(len(prompts)):
        got = torch.stack([s.logits[b] for s in together])
        want = torch.stack([s.logits[0] for s in alone[b]])
        assert (got - want).abs().max() <= 1e-4, f"sequence {b}"
        # each row's share of its own host tokens, as alone
        assert [s.rows[b] for s in together] == [s.rows[0] for s in alone[b]], f"sequence {b}"
    for s in together:  # the batch's shares weigh the rows' by their host tokens
        assert min(r.kv_read for r in s.rows) <= s.kv_read_frac <= max(r.kv_read for r in s.rows)
        assert s.rechecked == sum(r.rechecked for r in s.rows)
    assert batch.get_seq_length() == max(lengths) + STEPS


def test_a_row_that_joined_lately_does_not_cut_short_another_row_s_exact_run(tiny_model, tiny_ids):
    """Row 0 decoded 5 approximate positions before its near tie; row 1 joined the batch at this step (it fed
    one token). Each row's exact run takes its own span: row 0's logits are what its step gives alone."""
    forced = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(5))
    second = tiny_ids[:, 100:160]

    def row_0():  # prefilled, then 5 tokens fed without re-checks
        cache = HybridCache(tiny_model, ALWAYS)
        tiny_model(tiny_ids[:, :PROMPT], cache=cache, use_cache=True)
        cache.build_indexes()
        for t in range(5):
            tiny_model(forced[:1, t : t + 1], cache=cache, use_cache=True)
        return cache

    def row_1():
        cache = HybridCache(tiny_model, ALWAYS)
        tiny_model(second, cache=cache, use_cache=True)
        cache.build_indexes()
        return cache

    fed = [forced[0].tolist(), forced[1, :1].tolist()]
    with torch.no_grad():
        alone = [forward_step(tiny_model, row_0(), forced[:1, 5:], fed=fed[:1])]
        alone.append(forward_step(tiny_model, row_1(), forced[1:, :1], fed=fed[1:]))
        batch = HybridCache.stack([row_0(), row_1()])
        tokens, positions = torch.stack([forced[0, 5:], forced[1, :1]]), torch.tensor([[PROMPT + 5], [60]])
        together = forward_step(tiny_model, batch, tokens, positions, fed=fed)
    assert together.rechecked == 2
    for b in range(2):
        assert (together.logits[b] - alone[b].logits[0]).abs().max() <= 1e-4, f"row {b}"
        assert together.rows[b] == alone[b].rows[0], f"row {b}"


def test_rows_to_run_again_must_index_the_batch(tiny_model, tiny_ids):
    cache, _ = decode(tiny_model, tiny_ids, APPROXIMATE)
    for rows in ([], [1], [0, 0], [-1]):
        with pytest.raises(ValueError, match="rows to run again"):
            with cache.rerun_exactly(rows):
                pass
    assert not any(layer.rerun for layer in cache.layers)


def test_a_step_that_read_every_token_is_not_run_again(tiny_model, tiny_ids, tiny_full_logits):
    """A prompt shorter than the resident set leaves the host store empty: nothing to re-check."""
    cfg = ALWAYS.replace(window=256)
    cache = HybridCache(tiny_model, cfg)
    with torch.no_grad():
        tiny_model(tiny_ids[:, :100], cache=cache, use_cache=True)
        step = forward_step(tiny_model, cache, tiny_ids[:, 100:101])
    assert step.rechecked == 0 and cache.layers[0].host.n == 0
    assert (step.logits[0] - tiny_full_logits[0, 100]).abs().max() <= 1e-4


def test_the_cache_counts_the_newest_positions_approximate_steps_wrote(tiny_model, tiny_ids):
    cache, _ = decode(tiny_model, tiny_ids, APPROXIMATE)
    assert cache.approximate_newest() == STEPS and all(layer.approximate == STEPS for layer in cache.layers)
    with torch.no_grad(), cache.rerun_exactly([0], 5):
        tiny_model(tiny_ids[:, PROMPT + STEPS - 5 : PROMPT + STEPS], cache=cache, use_cache=True)
    assert cache.approximate_newest() == 0  # the older seven stay approximate: only the newest run again
    with torch.no_grad():
        tiny_model(tiny_ids[:, PROMPT + STEPS : PROMPT + STEPS + 1], cache=cache, use_cache=True)
        assert cache.approximate_newest() == 1
        tiny_model(tiny_ids[:, PROMPT + STEPS + 1 : PROMPT + STEPS + 3], cache=cache, use_cache=True)
    assert cache.approximate_newest() == 0  # a chunk attends exactly


def test_positions_made_exact_stay_so_and_are_not_run_again(tiny_model, tiny_ids, tiny_full_logits, monkeypatch):
    """Re-checks at some steps only: each runs again just the positions decoded since the one
    before, and still gives full attention's logits (the positions before are exact)."""
    _, plain = decode(tiny_model, tiny_ids, APPROXIMATE)
    top = torch.stack([s.logits[0] for s in plain]).topk(2).values
    margin = (top[:, 0] - top[:, 1]).median().item()  # about half the steps are near ties
    runs, rerun_exactly = [], HybridCache.rerun_exactly

    def counted(self, rows, positions=1):
        runs.append(positions)
        return rerun_exactly(self, rows, positions)

    monkeypatch.setattr(HybridCache, "rerun_exactly", counted)
    cache, steps = decode(tiny_model, tiny_ids, APPROXIMATE.replace(recheck_margin=margin))
    at = [t for t, s in enumerate(steps) if s.rechecked]
    assert 1 < len(at) < STEPS and len(runs) == len(at)
    assert runs == [b - a for a, b in zip([-1] + at, at)]  # the positions decoded since the last re-check
    for t in at:
        assert (steps[t].logits[0] - tiny_full_logits[0, PROMPT + t]).abs().max() <= 1e-4, f"step {t}"
    assert cache.approximate_newest() == STEPS - 1 - at[-1]


@pytest.mark.parametrize("span", [5, 0])
def test_an_exact_run_takes_the_newest_positions_its_work_allows(
    tiny_model, tiny_ids, tiny_full_logits, monkeypatch, span
):
    """Eleven approximate steps (their runs again held back), then a near tie that runs again
    exactly: the newest positions whose attention to every host token fits `recheck_work`,
    here 5 (0: up to the window, here all twelve); the older ones keep the K/V their
    approximate steps wrote."""
    host = PROMPT + STEPS - ALWAYS.n_sink - ALWAYS.window  # at the last step
    work = span * host + 50  # 5 positions for 252 to 302 host tokens
    runs, rerun_exactly = [], HybridCache.rerun_exactly

    def counted(self, rows, positions=1):
        runs.append(positions)
        return rerun_exactly(self, rows, positions)

    monkeypatch.setattr(HybridCache, "rerun_exactly", counted)
    held_back = RecheckBudget(1.0, read_limit=1e-9)  # no run again fits
    cache = HybridCache(tiny_model, ALWAYS.replace(recheck_work=work if span else 0))
    with torch.no_grad():
        tiny_model(tiny_ids[:, :PROMPT], cache=cache, use_cache=True)
        cache.build_indexes()
        for t in range(PROMPT, PROMPT + STEPS):
            last = t == PROMPT + STEPS - 1
            if last:
                before = cache.layers[1].ordered_kv()[0].clone()
            fed, budgets = tiny_ids[:, PROMPT : t + 1].tolist(), None if last else [held_back]
            step = forward_step(tiny_model, cache, tiny_ids[:, t : t + 1], fed=fed, budgets=budgets)
    assert runs == [span or STEPS] and step.rechecked == 1 and cache.approximate_newest() == 0
    after = cache.layers[1].ordered_kv()[0]
    kept = PROMPT + STEPS - (span or STEPS)  # positions before the exact run
    assert torch.equal(after[:, :kept], before[:, :kept])
    error = (step.logits[0] - tiny_full_logits[0, PROMPT + STEPS - 1]).abs().max()
    assert error <= 1e-4 if not span else error > 1e-4  # older approximate K/V move the logits


def test_a_recheck_says_whether_its_exact_run_changed_the_greedy_token(tiny_model, tiny_ids):
    """RowShare.changed (a re-check's precision is the share of them that changed the token)."""
    runs = []  # each model call's last logits: the step's first run, then its run again

    def model(**kwargs):
        out = tiny_model(**kwargs)
        runs.append(out.logits[:, -1])
        return out

    # a step that reads one block and estimates nothing: its first runs often pick another token
    coarse = ALWAYS.replace(candidates_from="blocks", budget="fixed", n_blocks=1, estimate=False)
    for cfg, rechecked in ((coarse, True), (coarse.replace(recheck_margin=0.0), False)):
        cache = HybridCache(tiny_model, cfg)
        changed = []
        with torch.no_grad():
            tiny_model(tiny_ids[:, :PROMPT], cache=cache, use_cache=True)
            cache.build_indexes()
            for t in range(PROMPT, PROMPT + STEPS):
                runs.clear()
                step = forward_step(model, cache, tiny_ids[:, t : t + 1], fed=tiny_ids[:, PROMPT : t + 1].tolist())
                assert len(runs) == 1 + rechecked and step.rows[0].rechecked == rechecked
                differs = bool(runs[0].argmax(-1) != runs[-1].argmax(-1))
                assert step.rows[0].changed == differs
                changed.append(differs)
        assert any(changed) == rechecked and not all(changed)


def test_a_sequence_may_recheck_its_first_near_tie_then_within_its_share_of_steps():
    assert may_recheck(0, 1, 0.05) and not may_recheck(1, 2, 0.05)
    assert not may_recheck(1, 20, 0.05) and may_recheck(1, 21, 0.05)
    assert all(may_recheck(k, k + 1, 1.0) for k in range(10))  # share 1: every step
    assert may_recheck(0, 5, 0.0) and not may_recheck(1, 500, 0.0)  # share 0: the first near tie alone


@pytest.mark.parametrize("share, expected", [(1.0, STEPS), (0.25, 3), (0.0, 1)])
def test_a_generation_rechecks_at_most_its_share_of_steps(tiny_model, tiny_ids, share, expected):
    """Every step is a near tie (ALWAYS): the bound alone decides how many run again."""
    run = forced_generation(tiny_model, tiny_ids, ALWAYS.replace(recheck_share=share, recheck_read_limit=0.0))
    rechecked = [share.rechecked for share, _ in run.row_steps(0)]
    assert len(rechecked) == STEPS and sum(rechecked) == expected == run.budgets[0].rechecked
    assert rechecked[0]  # the first near tie is re-checked


# a wider run that reads every host token of any weight: the exact step, within fp32
COVERING = 1e9


def test_a_wider_run_replaces_the_newest_position_and_reads_more(tiny_model, tiny_ids):
    cache, steps = decode(tiny_model, tiny_ids, APPROXIMATE)
    first = cache.step_stats(0)["gathered"]
    host, seen = cache.layers[1].host.n, cache.get_seq_length()
    newest = tiny_ids[:, PROMPT + STEPS - 1 : PROMPT + STEPS]
    with torch.no_grad():
        with cache.rerun_wider([0], COVERING):
            wide = tiny_model(newest, cache=cache, use_cache=True).logits[0, -1]
        assert cache.step_stats(0)["gathered"] > first
        # the wider run reads part of the host store still: its position stays approximate
        assert cache.approximate_newest() == STEPS and all(layer.cfg == APPROXIMATE for layer in cache.layers)
        assert cache.get_seq_length() == seen and cache.layers[1].host.n == host
        with cache.rerun_exactly([0], 1):
            exact = tiny_model(newest, cache=cache, use_cache=True).logits[0, -1]
    assert (wide - exact).abs().max() <= 1e-4
    assert (steps[-1].logits[0] - exact).abs().max() > 1e-3  # the first run was approximate
    with pytest.raises(ValueError, match="finite factor >= 1"):
        with cache.rerun_wider([0], 0.5):
            pass


def test_a_wider_run_before_the_key_index_is_built_samples_no_position_twice(tiny_model, tiny_ids):
    """With 4 tokens on the host, under a block, the key index waits for its build and the decode queries join
    its sample; the wider run of a step's position does not sample that position again."""
    cache = HybridCache(tiny_model, APPROXIMATE)
    with torch.no_grad():
        tiny_model(tiny_ids[:, :24], cache=cache, use_cache=True)
        for t in (24, 25):
            tiny_model(tiny_ids[:, t : t + 1], cache=cache, use_cache=True)
        with cache.rerun_wider([0], COVERING):
            tiny_model(tiny_ids[:, 25:26], cache=cache, use_cache=True)
        tiny_model(tiny_ids[:, 26:27], cache=cache, use_cache=True)
    for layer in cache.layers:
        assert layer.key_index is None and layer.host.n == 7
        assert torch.cat(layer.query_sample.pos).tolist()[-3:] == [24, 25, 26]


def test_a_run_again_of_the_prompt_s_last_position_submits_no_second_index_build(tiny_model, tiny_ids, monkeypatch):
    """The build is submitted at the prompt's last token; a run again of it while the build is pending would
    replace the build's future, and with several workers run two builds of one layer at once."""
    from engine.index.worker import IndexBuilder

    submitted = []
    monkeypatch.setattr(IndexBuilder, "submit", lambda self, layer: submitted.append(layer.layer_idx))
    cache = HybridCache(tiny_model, APPROXIMATE, prompt_length=PROMPT)
    with torch.no_grad():
        tiny_model(tiny_ids[:, :PROMPT], cache=cache, use_cache=True)
        with cache.rerun_exactly([0], 1):
            tiny_model(tiny_ids[:, PROMPT - 1 : PROMPT], cache=cache, use_cache=True)
    assert submitted == list(range(len(cache.layers)))


def test_near_ties_run_wider_first_and_exactly_only_where_the_tie_survives(tiny_model, tiny_ids, tiny_full_logits):
    full = tiny_full_logits[0, PROMPT : PROMPT + STEPS]
    # the wider runs stand: every step is full attention's, none ran exactly
    _, steps = decode(tiny_model, tiny_ids, ALWAYS.replace(recheck_widen=COVERING, recheck_wide_margin=0.0))
    assert (torch.stack([s.logits[0] for s in steps]) - full).abs().max() <= 1e-4
    assert all(s.widened == 1 and s.rechecked == 0 and s.rows[0].widened for s in steps)
    assert all(s.selected_frac < s.kv_read_frac <= 2 * s.selected_frac + 1 for s in steps)
    # every tie survives: each step runs wider, then exactly, and reads all three runs
    _, steps = decode(tiny_model, tiny_ids, ALWAYS.replace(recheck_widen=2.0, recheck_wide_margin=1e9))
    assert (torch.stack([s.logits[0] for s in steps]) - full).abs().max() <= 1e-4
    assert all(s.widened == s.rechecked == 1 and s.kv_read_frac > 1 + s.selected_frac for s in steps)


@pytest.mark.parametrize("key_index", ["qq", "ivf"])  # ivf: an index whose searches score keys
def test_the_work_a_re_checked_step_reports_is_every_run_s(tiny_model, tiny_ids, key_index):
    """The keys scored and the candidates rated, as the host tokens read: the first run's, the wider runs'."""
    cfg = APPROXIMATE.replace(key_index=key_index)
    _, alone = decode(tiny_model, tiny_ids, cfg)  # no near tie: the first runs alone
    _, steps = decode(tiny_model, tiny_ids, cfg.replace(recheck_margin=1e9, recheck_widen=2.0, recheck_wide_margin=1e9))
    first, checked = alone[0].rows[0], steps[0].rows[0]  # the first step's first runs are the same
    assert checked.wider_runs == 2 and checked.rated > first.rated > 0
    assert checked.keys_scored > first.keys_scored > 0 if key_index == "ivf" else checked.keys_scored == 0
    assert (steps[0].keys_scored_frac, steps[0].rated_frac) == (checked.keys_scored, checked.rated)


def test_the_share_bound_holds_back_the_exact_runs_not_the_wider_ones(tiny_model, tiny_ids):
    cfg = ALWAYS.replace(recheck_widen=2.0, recheck_wide_margin=1e9, recheck_share=0.0)
    run = forced_generation(tiny_model, tiny_ids, cfg)
    shares = [share for share, _ in run.row_steps(0)]
    assert all(s.widened for s in shares) and sum(s.rechecked for s in shares) == 1 == run.budgets[0].rechecked


def test_a_widened_configuration_reads_factor_times_as_much():
    cfg = OffloadConfig()
    wide = cfg.widened(4)
    assert (wide.candidates, wide.n_blocks, wide.top_k) == (4 * cfg.candidates, 4 * cfg.n_blocks, 4 * cfg.top_k)
    assert wide.block_frac == min(1.0, 4 * cfg.block_frac) and cfg.widened(100).block_frac == 1.0
    assert wide.min_prob == cfg.min_prob / 4 and wide.min_ratio == cfg.min_ratio / 4
    for bad in (0.5, -1, float("inf"), True):
        with pytest.raises(ValueError, match="recheck_widen"):
            OffloadConfig(recheck_widen=bad)
    with pytest.raises(ValueError, match="recheck_wide_margin"):
        OffloadConfig(recheck_wide_margin=-0.1)


def test_a_read_limit_holds_back_every_run_again_that_would_read_past_it():
    budget = RecheckBudget(share=1.0, read_limit=4.0)
    # a step that read 2% may run again wider reading 6% more, not exactly: 1.02 > 4 * 0.02
    assert budget.affords(0.02, 0.02, 0.06) and not budget.affords(0.02, 0.02, 0.061)
    assert not budget.affords(0.02, 0.02, 1.0, exact=True)
    budget.record(RowShare(kv_read=0.1, selected=0.02, keys_scored=0.0, rated=0.0, rechecked=False, wider_runs=1))
    seen = []
    for _ in range(40):  # k steps of 2% later: an exact run once 0.1 + 0.02 k + 0.02 + 1 <= 4 * 0.02 (k + 2), k >= 16
        seen.append(budget.affords(0.02, 0.02, 1.0, exact=True))
        budget.record(RowShare(kv_read=0.02, selected=0.02, keys_scored=0.0, rated=0.0, rechecked=False))
    assert seen == [False] * 16 + [True] * 24
    unlimited = RecheckBudget(share=1.0, read_limit=0.0)
    unlimited.record(RowShare(kv_read=1.02, selected=0.02, keys_scored=0.0, rated=0.0, rechecked=True))
    assert unlimited.affords(0.02, 0.5, 1.0, exact=True) and unlimited.affords(0.02, 0.5, 1.0)
    shared = RecheckBudget(share=0.0, read_limit=0.0)  # the share bound: the first exact run alone
    assert shared.affords(0.02, 0.02, 1.0, exact=True)
    shared.record(RowShare(kv_read=1.02, selected=0.02, keys_scored=0.0, rated=0.0, rechecked=True))
    assert not shared.affords(0.02, 0.02, 1.0, exact=True) and shared.affords(0.02, 0.02, 1.0)


def test_a_generation_asked_to_run_until_the_end_foresees_no_float_overflow():
    endless = RecheckBudget(share=1.0, read_limit=4.0, horizon=10**400)  # max_new_tokens "until the end"
    assert endless.affords(0.02, 0.02, 0.06) and endless.room(0.02, 0.02) > 0  # OverflowError before
    assert endless.room(0.02, 0.02) == RecheckBudget(1.0, 4.0, horizon=2**31 - 1).room(0.02, 0.02)


def test_wider_runs_may_spend_what_the_steps_to_come_will_earn_exact_runs_may_not():
    # the first of 40 steps, 2% each: 40 * 2% * (3 - 1) = 1.6 of the host tokens may be read again
    ahead = RecheckBudget(share=1.0, read_limit=3.0, horizon=40)
    assert ahead.affords(0.02, 0.02, 1.6) and not ahead.affords(0.02, 0.02, 1.61)
    assert not ahead.affords(0.02, 0.02, 1.0, exact=True)
    assert not RecheckBudget(share=1.0, read_limit=3.0).affords(0.02, 0.02, 0.05)  # no horizon: 2 * 2% alone
    # a step past the horizon foresees no more steps
    past = RecheckBudget(share=1.0, read_limit=3.0, horizon=1)
    past.record(RowShare(kv_read=0.02, selected=0.02, keys_scored=0.0, rated=0.0, rechecked=False))
    assert past.affords(0.02, 0.02, 0.08) and not past.affords(0.02, 0.02, 0.081)


def test_wider_runs_spend_ahead_up_to_the_credit_steps_at_most(tiny_model, tiny_ids):
    # STEPS + 1 tokens: STEPS decode steps foreseen, unless the credit ends earlier
    for credit, horizon in ((0, STEPS), (5, 5), (STEPS + 10, STEPS)):
        run = forced_generation(tiny_model, tiny_ids, ALWAYS.replace(recheck_credit_steps=credit))
        assert [b.horizon for b in run.budgets] == [horizon]
    with pytest.raises(ValueError, match="recheck_credit_steps"):
        OffloadConfig(recheck_credit_steps=-1)


def running_reads(shares):
    """Each step's RowShare with the generation's reads and its selection's reads summed up to it."""
    read = selected = 0.0
    for s in shares:
        read, selected = read + s.kv_read, selected + s.selected
        yield s, read, selected


def test_the_room_a_budget_leaves_is_what_it_affords():
    budget = RecheckBudget(share=1.0, read_limit=3.0)
    # the first step read 2%: 3 * 2% - 2% = 4% may be read again, by a wider run or none exactly
    assert budget.room(0.02, 0.02) == pytest.approx(0.04) and budget.affords(0.02, 0.02, 0.039)
    assert not budget.affords(0.02, 0.02, 0.041) and not budget.affords(0.02, 0.02, 1.0, exact=True)
    assert RecheckBudget(share=1.0, read_limit=0.0).room(0.02, 0.5) == float("inf")
    ahead = RecheckBudget(share=1.0, read_limit=3.0, horizon=4)  # and 3 steps to come: 3 * 8% - 2% - 6%
    assert ahead.room(0.02, 0.02) == pytest.approx(0.16) and ahead.affords(0.02, 0.02, 0.159)


@pytest.mark.parametrize("fit", [False, True])
def test_a_wider_run_past_the_limit_runs_as_wide_as_the_limit_affords(tiny_model, tiny_ids, fit):
    """No credit ahead (a horizon of one step), every step a near tie that survives: the first step
    cannot afford a 3x run (its own read and three times it, against three times its read); fitted, it
    runs as wide as the limit allows, twice its selection, and no prefix of the generation reads
    more than the limit either way."""
    cfg = ALWAYS.replace(
        budget="fixed",  # a few ids and a block a step: a selection of a few percent, which 3x does not cap at all
        top_k=2,
        n_blocks=1,
        block_frac=0.01,
        recheck_share=0.0,
        recheck_read_limit=3.0,
        recheck_credit_steps=1,
        recheck_widen=3.0,
        recheck_wide_margin=1e9,
        recheck_fit_wider=fit,
    )
    run = forced_generation(tiny_model, tiny_ids, cfg)
    shares = [share for share, _ in run.row_steps(0)]
    for s, read, selected in running_reads(shares):
        if not s.rechecked:
            assert read <= 3.0 * selected * (1 + 1e-3) + 1e-9  # a wider run's read is foreseen, not exact
    widened = [s.wider_runs for s in shares]
    assert widened[0] == fit  # the first step fits a 2x run exactly, and no 3x one
    assert (shares[0].kv_read > 2.0 * shares[0].selected) == fit
    assert sum(widened) > fit  # later steps, with the reads of the steps before, afford runs unfitted too
    with pytest.raises(ValueError, match="recheck_fit_wider"):
        OffloadConfig(recheck_fit_wider=1)


@pytest.mark.parametrize("limit", [0.0, 1.0, 2.0, 3.0])
def test_a_generation_keeps_its_exact_runs_within_the_limit(tiny_model, tiny_ids, limit):
    """Every step a near tie that survives its wider runs: an exact run only where the reads so
    far, with it, stay within the limit; with a limit of 1 nothing runs again."""
    cfg = ALWAYS.replace(recheck_share=1.0, recheck_read_limit=limit, recheck_widen=2.0, recheck_wide_margin=1e9)
    run = forced_generation(tiny_model, tiny_ids, cfg)
    shares = [share for share, _ in run.row_steps(0)]
    for s, read, selected in running_reads(shares):
        if limit and s.rechecked:
            assert read <= limit * selected + 1e-9
    exact, wide = sum(s.rechecked for s in shares), sum(s.widened for s in shares)
    if limit == 0.0:  # unbounded: every step runs wider, then exactly
        assert exact == wide == STEPS
    if limit == 1.0:  # nothing may be read beyond the selection
        assert exact == wide == 0 and read == selected
    if limit == 2.0:
        assert 0 < wide and exact < STEPS, (exact, wide)


def test_a_tie_that_survives_runs_wider_again_up_to_the_runs_allowed(tiny_model, tiny_ids):
    def reads(runs: int, wide_margin: float) -> list[float]:
        cfg = ALWAYS.replace(recheck_widen=2.0, recheck_wider_runs=runs, recheck_wide_margin=wide_margin)
        _, steps = decode(tiny_model, tiny_ids, cfg)
        # each step counts the wider runs it took: all allowed while the tie survives, else the first alone
        assert [s.rows[0].wider_runs for s in steps] == [runs if wide_margin else 1] * STEPS
        return [s.kv_read_frac for s in steps]

    one, three = reads(1, 1e9), reads(3, 1e9)
    # the tie survives every run: three wider runs read more than one, each step
    assert all(b > a for a, b in zip(one, three))
    # a wider run that settles the tie (margin 0) is the last: as many runs read as with one
    assert reads(3, 0.0) == reads(1, 0.0)
    with pytest.raises(ValueError, match="recheck_wider_runs"):
        OffloadConfig(recheck_wider_runs=-1)
