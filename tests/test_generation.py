"""The one decode loop (engine.generation): HybridLLM.generate, stream and generate_batch and the
evaluations' greedy decode through it; every GenerationReport field, for one sequence and for a
batch, against what the forward passes reported; a plain reference loop and full attention."""

import re

import pytest
import torch
from transformers import DynamicCache

import engine.generation
from bench.evals.probes import greedy
from engine import HybridCache, OffloadConfig
from engine.api import HybridLLM
from engine.decode.recheck import forward_step
from engine.generation import Decoding, eos_ids
from tests.conftest import tiny_llama
from tests.test_attention import COVER_ALL

# a small window and blocks: the prompts leave most tokens on the host, read in part; the flat
# key index scores every indexed key (for each query head of a KV head's group)
CFG = OffloadConfig(
    device="cpu",
    n_sink=4,
    window=16,
    block_size=8,
    key_index="flat",
    budget="fixed",
    top_k=8,
    host_dtype="float32",
    recheck_margin=0.0,
)
# a random model's margins are small: some steps are near ties (every one re-checked exactly, unbounded, as the
# reference loop below does)
RECHECKED = CFG.replace(recheck_margin=0.06, recheck_share=1.0, recheck_read_limit=0.0, recheck_widen=1.0)
LENGTHS = (300, 231, 150)
NEW = 10


@pytest.fixture(scope="module")
def prompts():
    ids = torch.randint(0, 5000, (400,), generator=torch.Generator().manual_seed(2))
    return [ids[7 * i : 7 * i + n] for i, n in enumerate(LENGTHS)]


def spy_steps(monkeypatch) -> list:
    """The Steps forward_step returns to the decode loop, in order."""
    steps = []

    def spied(*args, **kwargs):
        steps.append(forward_step(*args, **kwargs))
        return steps[-1]

    monkeypatch.setattr(engine.generation, "forward_step", spied)
    return steps


def reference_greedy(model, cfg, prompt, new) -> list[int]:
    """A plain greedy loop over forward_step, one sequence (what HybridLLM decoded before the shared loop)."""
    cache = HybridCache(model, cfg, progress=False)
    with torch.no_grad():
        logits = model(prompt[None], cache=cache, use_cache=True).logits[0, -1]
        cache.build_indexes()
        tokens = [int(logits.argmax())]
        while len(tokens) < new:
            step = forward_step(model, cache, torch.tensor([tokens[-1:]]), fed=[tokens])
            tokens.append(int(step.logits[0].argmax()))
    return tokens


def bytes_of_host_store(model, cfg, positions: int) -> int:
    """K and V of `positions` host tokens in every layer (fp32)."""
    c = model.config
    return c.num_hidden_layers * 2 * c.num_key_value_heads * positions * c.head_dim * 4


@pytest.mark.parametrize("cfg", [CFG, RECHECKED], ids=["approximate", "rechecked"])
def test_one_sequence_reports_every_field(model, bundled_tokenizer, prompts, cfg, monkeypatch):
    llm = HybridLLM(model, bundled_tokenizer, cfg)
    steps = spy_steps(monkeypatch)
    result = llm.generate(prompts[0], NEW, stop_at_eos=False, progress=False)
    r, T = result.report, LENGTHS[0]
    assert result.token_ids == reference_greedy(model, cfg, prompts[0], NEW)
    assert r.prompt_tokens == T and r.new_tokens == len(result.token_ids) == NEW
    assert r.decode_steps == len(steps) == NEW - 1  # the first token comes from the prefill
    assert r.prefill_s > 0 and r.index_build_s >= 0 and r.first_token_s == r.prefill_s + r.index_build_s
    assert r.decode_s > 0 and r.decode_tokens_per_s == r.decode_steps / r.decode_s
    shares = [s.rows[0] for s in steps]
    assert r.kv_read_frac == pytest.approx(sum(s.kv_read for s in shares) / len(shares))
    assert r.kv_read_frac == pytest.approx(sum(s.kv_read_frac for s in steps) / len(steps))  # one row: the batch's
    assert r.keys_scored_frac == pytest.approx(sum(s.keys_scored_frac for s in steps) / len(steps))
    assert r.rated_frac == sum(s.rated_frac for s in steps) == 0  # a fixed budget reads its top ids unrated
    assert r.rechecked_steps == sum(s.rechecked for s in steps)
    assert r.rechecks_changed == sum(s.rows[0].changed for s in steps if s.rechecked) <= r.rechecked_steps
    assert r.widened_steps == sum(s.widened for s in steps) == 0  # straight to the exact run in both
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    assert 0 < r.keys_scored_frac <= group  # the flat index scores each indexed key once per query head
    if cfg is CFG:
        assert r.rechecked_steps == 0 and 0 < r.kv_read_frac < 1  # a part of the host store per step
    else:  # a step run again reads every host token once more
        assert 0 < r.rechecked_steps < NEW - 1
        assert r.kv_read_frac == pytest.approx(sum(s.selected_frac + s.rechecked for s in steps) / len(steps))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    resident = cfg.n_sink + cfg.window
    assert r.device_bytes["weights"] == weights
    assert r.device_bytes["resident_kv"] == bytes_of_host_store(model, cfg, resident)
    assert r.host_bytes["kv_store"] == bytes_of_host_store(model, cfg, T + NEW - resident)  # sized for the decode
    assert r.host_bytes["key_index"] > 0


def test_each_report_of_a_batch_is_its_sequence_s_alone(model, bundled_tokenizer, prompts, monkeypatch):
    """Same tokens, steps, read shares, keys scored and re-checks as each prompt alone; the bytes
    are the batch's: every sequence's cache together."""
    llm = HybridLLM(model, bundled_tokenizer, RECHECKED)
    alone = [llm.generate(p, NEW, stop_at_eos=False, progress=False) for p in prompts]
    steps = spy_steps(monkeypatch)
    batch = llm.generate(prompts, NEW, stop_at_eos=False, progress=False)
    assert len(steps) == NEW - 1 and all(len(s.rows) == len(prompts) for s in steps)  # one pass for the batch
    assert sum(s.rechecked for s in steps) > 0
    for b, (got, want) in enumerate(zip(batch, alone)):
        g, w = got.report, want.report
        assert got.token_ids == want.token_ids, f"sequence {b}"
        assert (g.prompt_tokens, g.new_tokens, g.decode_steps) == (LENGTHS[b], NEW, NEW - 1)
        assert g.rechecked_steps == w.rechecked_steps == sum(s.rows[b].rechecked for s in steps)
        assert g.kv_read_frac == pytest.approx(w.kv_read_frac, rel=1e-3) and g.kv_read_frac > 0
        assert g.keys_scored_frac == pytest.approx(w.keys_scored_frac, rel=1e-3) and g.keys_scored_frac > 0
        assert g.prefill_s > 0 and g.index_build_s >= 0 and 0 < g.decode_s
    for part, n in batch[0].report.host_bytes.items():
        assert n == sum(a.report.host_bytes[part] for a in alone), part
    for part, n in batch[0].report.device_bytes.items():
        expected = [a.report.device_bytes[part] for a in alone]
        assert n == (expected[0] if part == "weights" else sum(expected)), part
    assert all(got.report.host_bytes == batch[0].report.host_bytes for got in batch)


@pytest.mark.parametrize(
    "cfg",
    [OffloadConfig(candidates_from="blocks", budget="fixed"), OffloadConfig.preset("block")],
    ids=["fixed", "block"],
)
def test_short_rows_of_a_stacked_batch_choose_blocks_as_alone(model, bundled_tokenizer, cfg, monkeypatch):
    """The device parts of a batch stacked (a GPU's default): a row that takes fewer blocks than another
    chooses the blocks it chooses alone, exact ties among the blocks' scores (each head's best scores 0)
    broken alike whatever count the batch asks for."""
    import engine.decode.step

    monkeypatch.setattr(engine.decode.step, "STACK", True)
    llm = HybridLLM(
        model, bundled_tokenizer, cfg.replace(device="cpu", n_sink=4, window=16, block_size=8, recheck_margin=0.0)
    )
    ids = torch.randint(0, 5000, (1000,), generator=torch.Generator().manual_seed(2))
    prompts = [ids[7 * i : 7 * i + n] for i, n in enumerate((40, 300, 60))]
    batch = llm.generate(prompts, NEW, stop_at_eos=False, progress=False)
    for prompt, got in zip(prompts, batch):
        assert got.token_ids == llm.generate(prompt, NEW, stop_at_eos=False, progress=False).token_ids


def test_top_indices_rank_equal_scores_by_index_whatever_their_number():
    from ann.block import top_indices

    scores = torch.randn(3, 5, 300, generator=torch.Generator().manual_seed(0))
    scores[..., [5, 17, 40, 41]] = 0.0
    scores[0, 0, 100:103] = torch.tensor([float("-inf"), 1e-45, -1e-45])
    for k in (1, 3, 10, 300):
        want = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
        assert torch.equal(top_indices(scores, k), want)


def test_a_sequence_that_ends_leaves_the_batch_and_the_others_go_on(model, prompts):
    """Row 1 stops at an EOS token the others never pick: it leaves after it, with its own
    steps and time; the others decode on as each alone, and the bytes are counted before it left."""
    lengths = list(LENGTHS)
    free = decoded(model, prompts, lengths)
    eos = next(t for t in free.tokens[1][1:] if t not in free.tokens[0] + free.tokens[2])
    stop = free.tokens[1].index(eos)
    run = decoded(model, prompts, lengths, eos={eos})
    assert run.tokens[1] == free.tokens[1][: stop + 1]
    assert run.tokens[0] == free.tokens[0] and run.tokens[2] == free.tokens[2]
    assert [len(f) for f in run.fed] == [NEW - 1, stop, NEW - 1]
    assert all(set(s.shares) == {0, 1, 2} for s in run.steps[:stop])
    assert all(set(s.shares) == {0, 2} for s in run.steps[stop:])  # without row 1 after its last pick
    assert run.seconds[1] < run.seconds[0] and run.seconds[1] < run.seconds[2]
    assert run.memory["host"]["kv_store"] == free.memory["host"]["kv_store"]  # taken with row 1 still in
    assert run.finish == ["length", "eos", "length"] and free.finish == ["length"] * 3


def decoded(model, prompts, lengths, eos=frozenset()) -> Decoding:
    caches, logits = [], []
    with torch.no_grad():
        for p in prompts:
            cache = HybridCache(model, CFG, max_length=len(p) + NEW, progress=False)
            logits.append(model(p[None], cache=cache, use_cache=True).logits[0, -1])
            cache.build_indexes()
            caches.append(cache)
        run = Decoding(model, HybridCache.stack(caches), torch.stack(logits), NEW, eos=eos, lengths=lengths)
        list(run)
    return run


def test_greedy_of_the_evaluations_is_the_loop_with_full_attention_or_the_engine(model, prompts):
    """With a DynamicCache the loop is full attention (transformers' generate gives the same
    tokens); with a hybrid cache that reads every host token, too; records come with the engine only."""
    model.set_attn_implementation("hybrid")
    prompt, eos = prompts[0][None], eos_ids(model)
    with torch.no_grad():
        want = model.generate(
            prompt,
            max_new_tokens=NEW,
            do_sample=False,
            cache=DynamicCache(),
            attention_mask=torch.ones_like(prompt),
            pad_token_id=0,
        )[0, prompt.shape[1] :].tolist()
    cover_all = OffloadConfig(**dict(COVER_ALL, candidates_from="blocks", recheck_margin=0.0))
    for cache in (DynamicCache(), HybridCache(model, cover_all, progress=False)):
        record = []
        with torch.no_grad():
            logits = model(prompt, cache=cache, use_cache=True).logits[0, -1]
        assert greedy(model, cache, logits, NEW, eos, record) == want
        if isinstance(cache, HybridCache):
            assert len(record) == NEW - 1 and all(r["kv_read_frac"] == r["selected_frac"] == 1.0 for r in record)
            assert all(r["gap"] >= 0 and r["rechecked"] == 0 for r in record)
        else:
            assert record == []


def test_teacher_forcing_feeds_the_forced_tokens_and_returns_the_model_s_picks(model, prompts):
    prompt, forced = prompts[0][None], prompts[1][: NEW - 1].tolist()
    with torch.no_grad():
        full = model(torch.cat([prompt, torch.tensor([forced])], dim=1)).logits[0]  # [T + NEW - 1, vocab]
        want = full[prompt.shape[1] - 1 :].argmax(-1).tolist()  # the pick after each forced prefix
        cache = DynamicCache()
        logits = model(prompt, cache=cache, use_cache=True).logits[0, -1]
        got = greedy(model, cache, logits, NEW, eos={want[0]}, forced=forced)  # an EOS does not stop it
    assert got == want and len(got) == NEW


def test_sampling_follows_the_seed(model, bundled_tokenizer, prompts):
    llm = HybridLLM(model, bundled_tokenizer, CFG)
    kwargs = dict(temperature=1.5, stop_at_eos=False, progress=False)
    first = llm.generate(prompts[2], NEW, seed=3, **kwargs).token_ids
    assert llm.generate(prompts[2], NEW, seed=3, **kwargs).token_ids == first
    assert llm.generate(prompts[2], NEW, seed=4, **kwargs).token_ids != first


def test_sampling_keeps_to_the_top_k_and_the_top_p_tokens():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]).log()  # temperature 1: these probabilities
    drawn = {}
    for name, kwargs in {
        "all": {},
        "top_k=2": {"top_k": 2},
        "top_p=0.5": {"top_p": 0.5},
        "both": {"top_k": 3, "top_p": 0.65},
    }.items():
        pick = engine.generation.sampler(1.0, torch.Generator().manual_seed(0), **kwargs)
        drawn[name] = [set(t) for t in zip(*(pick(logits) for _ in range(300)))]
    assert drawn["all"] == [{0, 1, 2, 3}, {0, 1, 2, 3}]
    assert drawn["top_k=2"] == [{0, 1}, {2, 3}]
    assert drawn["top_p=0.5"] == [{0, 1}, {2, 3}]  # 0.4 < 0.5: the next one too; 0.7 reaches it
    assert drawn["both"] == [{0, 1}, {2, 3}]  # 0.7 >= 0.65 before the third
    one = engine.generation.sampler(5.0, torch.Generator().manual_seed(0), top_p=1e-6)
    assert all(one(logits) == [0, 3] for _ in range(20))  # the most likely alone: greedy


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-300, 5e-324])
def test_a_tiny_temperature_picks_the_most_likely_token(temperature):
    """Dividing the logits by it overflowed them (inf - inf in the softmax; below fp32's range, 0 / 0)."""
    logits = torch.tensor([[3.0, 90.0, -2.0, 89.9], [-float("inf"), 1.0, 2.0, 0.5]])
    for kwargs in ({}, {"top_k": 2}, {"top_p": 0.9}):
        pick = engine.generation.sampler(temperature, torch.Generator().manual_seed(0), **kwargs)
        assert pick(logits) == [1, 2]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"top_k": -1}, "top_k must be an int >= 0"),
        ({"top_k": 2.5}, "top_k must be an int >= 0"),
        ({"top_p": 0.0}, "top_p must be a number in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be a number in (0, 1]"),
        ({"top_p": True}, "top_p must be a number in (0, 1]"),
    ],
)
def test_bad_sampling_arguments_are_named(model, bundled_tokenizer, prompts, kwargs, message):
    llm = HybridLLM(model, bundled_tokenizer, CFG)
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate(prompts[0], 2, temperature=1.0, progress=False, **kwargs)


def test_a_stream_stopped_early_still_fills_its_report(model, bundled_tokenizer, prompts):
    llm = HybridLLM(model, bundled_tokenizer, CFG)
    report = engine.generation.GenerationReport()
    pieces = llm.stream(prompts[0], NEW, report=report, stop_at_eos=False, progress=False)
    for i, _ in enumerate(pieces):
        if i == 2:
            break
    pieces.close()
    assert 3 <= report.new_tokens < NEW and report.decode_steps == report.new_tokens - 1
    assert report.prompt_tokens == LENGTHS[0] and report.decode_s > 0 and report.host_bytes["kv_store"] > 0


def test_no_new_tokens_gives_an_empty_result_and_report(model, bundled_tokenizer, prompts):
    result = HybridLLM(model, bundled_tokenizer, CFG).generate(prompts[0], 0, progress=False)
    r = result.report
    assert result.token_ids == [] and (r.new_tokens, r.decode_steps, r.rechecked_steps) == (0, 0, 0)
    assert r.prompt_tokens == LENGTHS[0] and r.kv_read_frac == r.keys_scored_frac == 0.0


def test_the_full_attention_reference_decodes_as_the_engine_whatever_the_generation_config(bundled_tokenizer):
    # transformers' generate applied the model's generation config (a repetition penalty) that the engine does not
    model = tiny_llama(vocab=len(bundled_tokenizer), n_heads=4, head_dim=16, tie_word_embeddings=True)
    llm = HybridLLM(model, bundled_tokenizer, OffloadConfig(device="cpu", window=4096))  # the prompt stays resident
    model.generation_config.repetition_penalty = 1.05
    prompt = "Once upon a time there was a"
    assert llm.generate_full_attention(prompt, 16) == llm.generate(prompt, 16, progress=False).text
    assert llm.generate_full_attention(prompt, 0) == ""  # transformers refused 0 new tokens
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got 2.5"):
        llm.generate_full_attention(prompt, 2.5)


def test_decoding_rejects_what_it_cannot_run(model, prompts):
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="stacked HybridCache"):
        Decoding(model, DynamicCache(), logits, 4)
    with pytest.raises(ValueError, match="stacked HybridCache"):
        Decoding(model, HybridCache(model, CFG), logits, 4)
    with pytest.raises(ValueError, match="lengths must give each of the 1 rows"):
        Decoding(model, DynamicCache(), logits[0], 4, lengths=[3, 4])
    with pytest.raises(ValueError, match="at least max_new_tokens - 1 tokens"):
        Decoding(model, DynamicCache(), logits[0], 4, forced=[[1, 2]])
    with pytest.raises(ValueError, match=r"logits must be \[vocab\] or \[B, vocab\]"):
        Decoding(model, DynamicCache(), torch.zeros(1, 1, 5), 4)
    run = Decoding(model, DynamicCache(), logits[0], 0)
    assert list(run) == []
    with pytest.raises(RuntimeError, match="runs once"):
        iter(run)


def test_prefill_chunks_never_leave_one_position_alone():
    """A one-position input is a decode step (it reads part of the host store): the prefill joins a
    last single position to the chunk before it, and its last logits are full attention's."""
    from engine.prefill import chunk_bounds, prefill

    assert chunk_bounds(9, 4) == [(0, 4), (4, 9)] and chunk_bounds(8, 4) == [(0, 4), (4, 8)]
    assert chunk_bounds(1, 4) == [(0, 1)] and chunk_bounds(3, 1) == [(0, 3)]
    for length, chunk in ((50, 7), (64, 9), (2, 1), (17, 16)):
        bounds = chunk_bounds(length, chunk)
        assert [b for _, b in bounds[:-1]] == [a for a, _ in bounds[1:]] and (bounds[0][0], bounds[-1][1]) == (
            0,
            length,
        )
        assert all(b - a >= min(2, length) for a, b in bounds)
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, 50), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(input_ids=ids, cache=DynamicCache(), use_cache=True).logits[0, -1]
        last = prefill(model, ids, HybridCache(model, CFG, progress=False), 7, progress=False)
    torch.testing.assert_close(last, full, atol=1e-4, rtol=1e-4)
