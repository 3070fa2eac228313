"""Prompts decoded together, each with its own sampling (HybridLLM.stream_batch, engine.sampling): each
streams what it streams alone, ends by its own length, stop strings or its consumer's leaving, and the
batch goes on without it; prompts that join a running batch (`more`) stream what they stream alone too."""

import contextlib
import itertools
import json
import traceback

import pytest
import torch

import engine.prefill
from engine.api import HybridLLM
from engine.cache import HybridCache
from engine.cli import main
from engine.decode.recheck import forward_step
from engine.generation import Decoding, GenerationReport, Joiner
from engine.prefill import (
    PrefillLeft,
    SteppedPrefill,
    chunk_bounds,
    prefill,
    prefill_prompt,
)
from engine.sampling import Sampling
from engine.stop import StopStrings
from tests.conftest import tiny_llama
from tests.test_generation import CFG, LENGTHS
from tests.test_stop import first_new_piece

NEW = 16


@pytest.fixture(scope="module")
def llm(bundled_tokenizer):
    return HybridLLM(tiny_llama(vocab=len(bundled_tokenizer)), bundled_tokenizer, CFG)


@pytest.fixture(scope="module")
def prompts():
    ids = torch.randint(0, 5000, (400,), generator=torch.Generator().manual_seed(9))
    return [ids[5 * i : 5 * i + n] for i, n in enumerate(LENGTHS)]


def streamed(llm, prompts, sampling, **kwargs):
    """Each prompt's text and finish from stream_batch, checking that a prompt's finish comes once, last."""
    texts, finishes = {}, {}
    for row, piece, finish in llm.stream_batch(prompts, sampling, progress=False, **kwargs):
        assert not finishes.get(row), f"prompt {row} went on after its finish"
        texts[row] = texts.get(row, "") + piece
        finishes[row] = finish
    return [texts.get(i, "") for i in range(len(texts))], [finishes.get(i, "") for i in range(len(finishes))]


def alone(llm, prompt, s: Sampling):
    """What `stream` gives the prompt by itself, with the same sampling."""
    report = GenerationReport()
    pieces = llm.stream(
        prompt, s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
        stop=list(s.stop), report=report, progress=False,
    )  # fmt: skip
    return "".join(pieces), report


def test_each_prompt_streams_what_it_streams_alone_with_its_own_sampling(llm, prompts):
    free = llm.generate(prompts[2], NEW, progress=False)
    stop = first_new_piece(StopStrings(llm.tokenizer, []), free.token_ids, NEW // 3)
    sampling = [
        Sampling(NEW, temperature=1.0, seed=7),  # drawn with a generator of its own
        Sampling(NEW - 6, temperature=0.7, top_k=5, top_p=0.9, seed=2),
        Sampling(NEW, stop=stop),  # greedy, ends at its stop string
    ]
    reports = [GenerationReport() for _ in prompts]
    texts, finishes = streamed(llm, prompts, sampling, reports=reports)
    for prompt, s, text, finish, report in zip(prompts, sampling, texts, finishes, reports):
        want, want_report = alone(llm, prompt, s)
        assert text == want and finish == want_report.finish_reason
        assert (report.new_tokens, report.decode_steps) == (want_report.new_tokens, want_report.decode_steps)
    assert finishes == ["length", "length", "stop"] and reports[1].new_tokens == NEW - 6
    assert texts[2] == free.text[: free.text.find(stop)]
    assert texts[0] != streamed(llm, prompts, [Sampling(NEW, temperature=1.0, seed=8)] + sampling[1:])[0][0]


def prefill_asks(llm, prompt_tokens: int, *, builds: bool = True) -> int:
    """How often `leave` is asked for a prompt before its first token: before each decoder layer of each of its
    prefill chunks and (`builds`: not after a prefix) each layer's index build."""
    layers = llm.model.config.num_hidden_layers
    return len(chunk_bounds(prompt_tokens, llm.offload.prefill_chunk)) * layers + (layers if builds else 0)


def test_a_prompt_whose_consumer_leaves_ends_there_and_the_batch_goes_on(llm, prompts):
    calls = [0] * len(prompts)

    def leave(row):
        calls[row] += 1
        return row == 1 and calls[row] >= prefill_asks(llm, len(prompts[1])) + 3

    reports = [GenerationReport() for _ in prompts]
    texts, finishes = streamed(llm, prompts, Sampling(NEW), reports=reports, leave=leave)
    assert reports[1].new_tokens == 3 and finishes[1] == reports[1].finish_reason == "left"
    for row in (0, 2):
        assert (texts[row], finishes[row]) == (alone(llm, prompts[row], Sampling(NEW))[0], "length")
        assert reports[row].new_tokens == NEW


@pytest.mark.parametrize("after_prefix", [False, True])
def test_generate_ends_a_prompt_where_leave_says_and_the_others_go_on(llm, prompts, after_prefix):
    """generate's `leave`, as the server's closing asks it: in a batch, and after a prefix, where the
    prompts run one after another."""
    calls = [0] * 3
    prefix = llm.prefix(prompts[0], progress=False) if after_prefix else None
    questions = [p[:4] for p in prompts[1:]] if after_prefix else prompts

    def leave(row):  # after a prefix, the question is prefilled after the document's last token
        calls[row] += 1
        asks = prefill_asks(llm, len(questions[1]) + bool(after_prefix), builds=not after_prefix)
        return row == 1 and calls[row] >= asks + 2

    results = llm.generate(questions, NEW, prefix=prefix, leave=leave, progress=False)
    assert len(results[1].token_ids) == 2 and results[1].report.finish_reason == "left"
    for row in [row for row in range(len(questions)) if row != 1]:
        want = llm.generate(questions[row], NEW, prefix=prefix, progress=False)
        assert results[row].token_ids == want.token_ids and results[row].report.finish_reason == "length"


def test_a_prompt_with_no_new_tokens_ends_at_once(llm, prompts):
    texts, finishes = streamed(llm, prompts[:2], [Sampling(0), Sampling(5)])
    assert (texts[0], finishes[0]) == ("", "length")
    assert (texts[1], finishes[1]) == (alone(llm, prompts[1], Sampling(5))[0], "length")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"seed": "x"}, "seed"),
        ({"seed": 2**64}, "seed"),  # more than a generator takes
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stop": [""]}, "stop strings"),
    ],
)
def test_bad_sampling_is_refused_naming_what_is_wrong(llm, prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        list(llm.stream_batch(prompts, Sampling(**kwargs), progress=False))


def test_a_seed_is_taken_across_what_a_generator_takes_and_refused_past_it(llm, prompts, capsys, monkeypatch):
    edges = [Sampling(4, temperature=1.0, seed=seed) for seed in (2**64 - 1, -(2**63))]
    assert streamed(llm, prompts[:2], edges)[0] == [alone(llm, p, s)[0] for p, s in zip(prompts, edges)]
    monkeypatch.setattr(HybridLLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["generate", "--prompt", "hi", "--temperature", "1", "--seed", str(2**64)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"hybridattn: error: --seed must be an int in [-2**63, 2**64), got {2**64}"


def test_a_batch_needs_a_list_of_prompts_and_a_sampling_for_each(llm, prompts):
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        list(llm.stream_batch([], Sampling()))
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        list(llm.stream_batch(prompts[0], Sampling()))
    for one in ("Hi!", torch.tensor([5, 6, 7])):  # a string was a batch of its characters
        with pytest.raises(ValueError, match="non-empty list of prompts"):
            llm.generate_batch(one, 2, progress=False)
    with pytest.raises(ValueError, match="one per prompt"):
        list(llm.stream_batch(prompts, [Sampling(), Sampling()]))
    with pytest.raises(ValueError, match="one GenerationReport per prompt"):
        list(llm.stream_batch(prompts, Sampling(), reports=[GenerationReport()]))


def test_a_decoding_takes_per_row_settings_only_one_per_row():
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="max_new_tokens, given as a list"):
        Decoding(None, None, logits[:1], [3, 4])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        Decoding(None, None, logits[:1], -1)
    with pytest.raises(ValueError, match="pick, given as a list"):
        Decoding(None, None, logits[:1], 3, pick=[max, max])
    # one value for every row is checked as those of a list are: a limit of 2.5 was never reached (the row
    # decoded on without end), one of True was 1
    for limit in (2.5, True, "3"):
        with pytest.raises(TypeError, match="max_new_tokens must be int, or a list of one per row"):
            Decoding(None, None, logits[:1], limit)
    with pytest.raises(TypeError, match="eos must be set or frozenset"):
        Decoding(None, None, logits[:1], 3, eos=2)


def test_each_prompt_stops_at_an_end_token_or_not_as_its_sampling_says(llm, prompts, monkeypatch):
    free = llm.generate(prompts[0], NEW, stop_at_eos=False, progress=False)
    end = free.token_ids[3]  # taken as the model's end-of-sequence token: the answer ends at its first
    monkeypatch.setattr(llm.model.generation_config, "eos_token_id", end)
    reports = [GenerationReport() for _ in range(2)]
    sampling = [Sampling(NEW), Sampling(NEW, stop_at_eos=False)]
    texts, finishes = streamed(llm, [prompts[0]] * 2, sampling, reports=reports)
    assert finishes == ["eos", "length"] and texts[1] == free.text
    assert reports[0].new_tokens == free.token_ids.index(end) + 1 and reports[1].new_tokens == NEW


def joining_at(calls: dict[int, list]):
    """A `more` for stream_batch: at its n-th call (from 1) the pairs calls[n], else none; `asked` counts."""
    asked = []

    def more():
        asked.append(len(asked) + 1)
        return calls.get(len(asked), [])

    return more, asked


def test_prompts_that_join_a_running_batch_stream_what_they_stream_alone(llm, prompts):
    joined = [Sampling(NEW - 2, temperature=0.7, seed=3), Sampling(NEW - 6)]
    more, asked = joining_at({3: [(prompts[1], joined[0])], 5: [(prompts[2], joined[1])]})
    reports = [GenerationReport()]
    order = []
    texts = {}
    for row, piece, finish in llm.stream_batch([prompts[0]], Sampling(NEW), reports=reports, more=more, progress=False):
        order.append((row, finish))
        texts[row] = texts.get(row, "") + piece
    assert len(reports) == 3 and len(asked) >= 5
    for row, (prompt, s) in enumerate(zip(prompts, [Sampling(NEW), *joined])):
        want, want_report = alone(llm, prompt, s)
        assert texts[row] == want
        assert (reports[row].new_tokens, reports[row].decode_steps) == (want_report.new_tokens, s.max_new_tokens - 1)
        assert reports[row].prompt_tokens == len(prompt) and reports[row].finish_reason == "length"
    # the joined prompts took their tokens while the first was still decoding (one finish each, last)
    firsts = [order.index(next(x for x in order if x[0] == row)) for row in (1, 2)]
    assert all(first < order.index((0, "length")) for first in firsts)
    assert [finish for row, finish in order if finish] == ["length"] * 3


def test_a_joined_prompt_leaves_as_its_consumer_says_and_the_batch_goes_on(llm, prompts):
    more, _ = joining_at({2: [(prompts[1], Sampling(NEW))]})
    texts, finishes = streamed(llm, [prompts[0]], Sampling(NEW), more=more, leave=lambda row: row == 1)
    assert finishes == ["length", "left"] and texts[0] == alone(llm, prompts[0], Sampling(NEW))[0]


@pytest.mark.parametrize(
    ("joined", "match"),
    [
        ("not a list", "list of \\(prompt, Sampling\\) pairs"),
        ([("a prompt", {"max_new_tokens": 3})], "list of \\(prompt, Sampling\\) pairs"),
        ([("a prompt", Sampling(0))], "a token or more"),
    ],
)
def test_what_joins_a_batch_is_checked(llm, prompts, joined, match):
    more, _ = joining_at({1: joined})
    with pytest.raises(ValueError, match=match):
        list(llm.stream_batch([prompts[0]], Sampling(4), more=more, progress=False))


def test_a_decoding_takes_joining_rows_only_in_a_batch_of_a_hybrid_cache(llm, prompts):
    logits = torch.zeros(1, 5)
    with pytest.raises(ValueError, match="rows join a batch"):
        Decoding(None, None, logits, 3, joining=list)
    with pytest.raises(ValueError, match="rows join a batch"):
        Decoding(None, None, logits, 3, lengths=[4], joining=list)  # not a HybridCache
    with torch.no_grad():
        first, second = (prefill_prompt(llm.model, p[None], CFG, 4, progress=False) for p in prompts[:2])
    try:
        run = Decoding(
            llm.model,
            first.cache,
            first.logits,
            3,
            lengths=[len(prompts[0])],
            joining=lambda whole: [Joiner(second, 0)],
        )
        with pytest.raises(ValueError, match="a token or more"):
            list(run)
    finally:
        first.cache.release()
        second.cache.release()


def test_a_joined_cache_is_moved_into_the_batch_and_given_up(llm, prompts):
    ids = [p[None] for p in prompts[:2]]
    with torch.no_grad():
        first, second = (prefill_prompt(llm.model, x, CFG, 4, progress=False) for x in ids)
    try:
        layers = list(second.cache.layers)
        first.cache.join(second.cache)
        assert second.cache.layers == [] and all(b.batch_size == 2 for b in first.cache.layers)
        assert all(b.seqs[1] is layer for b, layer in zip(first.cache.layers, layers))
        assert first.cache.host_tokens(1) == len(prompts[1]) - CFG.resident_tokens
        with pytest.raises(TypeError, match="another HybridCache"):
            first.cache.join(first.cache)
        with pytest.raises(ValueError, match="prefilled single-sequence caches"):
            first.cache.join(HybridCache(llm.model, CFG, progress=False))
    finally:
        first.cache.release()


def free_stores(llm) -> int:
    """The host stores the engine's pool holds for the next caches."""
    return sum(len(stores) for stores in llm.stores._free.values())


@pytest.mark.parametrize("joined_new", [4, NEW + 4], ids=["joined-ends-first", "prefix-row-ends-first"])
def test_prompts_join_a_prompt_after_a_prefix_and_the_prefix_is_kept(llm, prompts, joined_new):
    """A prompt that continues a prefix starts a batch that others join (the prefix's cache is the batch's):
    each streams what it streams alone; at the end the prefix holds its document alone again, as before,
    and the rows that joined gave their host stores back."""
    prefix = llm.prefix(prompts[0][None], progress=False)
    try:
        after = prompts[2][:40]
        want = "".join(llm.stream(after, NEW, prefix=prefix, progress=False))
        joined = Sampling(joined_new)
        held = None
        for _ in range(2):  # the second run finds the first's stores in the pool, and gives them back again
            reports = [GenerationReport()]
            more, _ = joining_at({2: [(prompts[1], joined)]})
            texts, finishes = streamed(llm, [after], Sampling(NEW), reports=reports, more=more, prefix=prefix)
            assert texts == [want, alone(llm, prompts[1], joined)[0]] and finishes == ["length", "length"]
            assert [r.batch for r in reports] == [2, 2] and reports[0].prefix_tokens == len(prompts[0])
            assert held is None or free_stores(llm) == held
            held = free_stores(llm)
        assert all(isinstance(layer, type(prefix.cache.layers[0])) for layer in prefix.cache.layers)
        assert "".join(llm.stream(after, NEW, prefix=prefix, progress=False)) == want
    finally:
        prefix.release()


def test_after_a_prefix_stream_batch_takes_one_prompt(llm, prompts):
    prefix = llm.prefix(prompts[0][None], progress=False)
    try:
        with pytest.raises(ValueError, match="takes one prompt"):
            list(llm.stream_batch([prompts[1], prompts[2]], Sampling(4), prefix=prefix, progress=False))
    finally:
        prefix.release()


def test_a_cache_keeps_only_a_sequence_of_its_own(llm, prompts):
    with torch.no_grad():
        first, second, third = (prefill_prompt(llm.model, p[None], CFG, 4, progress=False) for p in prompts)
    try:
        own, stranger = list(first.cache.layers), list(third.cache.layers)
        first.cache.join(second.cache)
        with pytest.raises(ValueError, match="a sequence of its own"):
            first.cache.keep_only(stranger)
        first.cache.keep_only(own)
        assert first.cache.layers == own and first.cache.host_tokens() == len(prompts[0]) - CFG.resident_tokens
    finally:
        first.cache.release()
        third.cache.release()


def test_a_near_tie_after_a_join_runs_again_the_positions_every_row_fed(llm, prompts):
    """Rows that joined at different steps have fed different numbers of tokens: a step run again exactly
    runs as many of the newest positions as every one of its rows fed: the row that fed fewer is exact again."""
    always = CFG.replace(recheck_margin=1e9, recheck_share=1.0, recheck_read_limit=0.0, recheck_widen=1.0)
    model = llm.model
    with torch.no_grad():
        a, b = (prefill_prompt(model, p[None], always, 8, progress=False) for p in prompts[:2])
    try:
        fed_a, fed_b = [1, 2, 3], [4]
        with torch.no_grad():
            for token in fed_a:  # approximate steps: a plain forward pass is never re-checked
                model(input_ids=torch.tensor([[token]]), cache=a.cache, use_cache=True)
            model(input_ids=torch.tensor([[fed_b[0]]]), cache=b.cache, use_cache=True)
            a.cache.join(b.cache)
            fed_a, fed_b = fed_a + [5], fed_b + [6]
            lengths = [len(prompts[0]) + len(fed_a) - 1, len(prompts[1]) + len(fed_b) - 1]
            step = forward_step(model, a.cache, torch.tensor([[5], [6]]), torch.tensor([[n] for n in lengths]),
                                fed=[fed_a, fed_b])  # fmt: skip
            whole = torch.cat([prompts[1], torch.tensor(fed_b)])[None]
            full = model(input_ids=whole, use_cache=False).logits[0, -1]
        assert step.rechecked == 2 and a.cache.approximate_newest(1) == 0
        torch.testing.assert_close(step.logits[1], full, atol=1e-4, rtol=1e-4)
    finally:
        a.cache.release()


@pytest.fixture(scope="module")
def chunked(llm):
    """The same model prefilling 64 tokens a pass: a prompt that joins takes a step per chunk to come in."""
    return HybridLLM(llm.model, llm.tokenizer, CFG.replace(prefill_chunk=64))


def test_a_joining_prompt_is_prefilled_a_chunk_a_step_while_the_batch_decodes(chunked, prompts):
    tokens = []  # the row of each prefill chunk and token, in order (`leave` is asked before each and after each)
    asked_at = []

    def more():
        if asked_at:
            return []
        asked_at.append(len(tokens))
        return [(prompts[1], Sampling(NEW - 4))]

    reports = [GenerationReport()]
    texts, _ = streamed(chunked, [prompts[0]], Sampling(NEW), reports=reports, more=more,
                        leave=lambda row: tokens.append(row) and False)  # fmt: skip
    chunks = -(-len(prompts[1]) // 64)
    # the first row took a token at every step its chunks ran, the one that asked for it included
    since = tokens[asked_at[0] :]
    first_token = [i for i, row in enumerate(since) if row == 1][prefill_asks(chunked, len(prompts[1]))]
    assert since[:first_token].count(0) >= chunks
    for row, (prompt, s) in enumerate(zip(prompts, [Sampling(NEW), Sampling(NEW - 4)])):
        assert texts[row] == alone(chunked, prompt, s)[0]
    assert reports[1].prompt_tokens == len(prompts[1]) and reports[1].new_tokens == NEW - 4
    assert reports[1].first_token_s > 0 and reports[0].batch == reports[1].batch == 2


def test_a_prompt_on_its_way_in_goes_on_alone_where_the_batch_ends_first(chunked, prompts):
    more, asked = joining_at({1: [(prompts[1], Sampling(NEW))]})
    reports = [GenerationReport()]
    texts, finishes = streamed(chunked, [prompts[0]], Sampling(2), more=more, reports=reports)
    assert finishes == ["length", "length"]
    assert texts[1] == alone(chunked, prompts[1], Sampling(NEW))[0]
    assert reports[1].new_tokens == NEW and reports[1].decode_steps == NEW - 1
    assert reports[0].batch == reports[1].batch == 1  # never decoded together: one ended before the other came


def test_a_prompt_on_its_way_in_is_given_up_when_the_consumer_stops(chunked, prompts, monkeypatch):
    closed = []
    close = SteppedPrefill.close
    monkeypatch.setattr(SteppedPrefill, "close", lambda self: closed.append(self) or close(self))
    more, _ = joining_at({1: [(prompts[1], Sampling(NEW))]})
    stream = chunked.stream_batch([prompts[0]], Sampling(NEW), more=more, progress=False)
    rows = [next(stream)[0], next(stream)[0]]
    stream.close()
    assert rows == [0, 0] and len(closed) == 1
    assert not closed[0].cache.sequence_layers() or not closed[0].cache.sequence_layers()[0].is_initialized


def test_a_stepped_prefill_is_the_prefill_of_the_prompt_whole(llm, prompts):
    x = prompts[0][None]
    cfg = CFG.replace(prefill_chunk=100, build_workers=1)
    with torch.no_grad():
        whole = prefill_prompt(llm.model, x, cfg, 4, progress=False)
        stepped = SteppedPrefill(llm.model, x, cfg, 4)
        steps = 1
        while (prompt := stepped.step()) is None:
            steps += 1
    try:
        assert steps >= 3 and prompt.prompt_tokens == len(prompts[0]) and prompt.cache.builds_done()
        torch.testing.assert_close(prompt.logits, whole.logits)
        assert prompt.cache.host_tokens() == whole.cache.host_tokens()
    finally:
        whole.cache.release()
        stepped.close()


# ------------------------------------------------- a prompt that leaves in its prefill


@pytest.fixture
def chunks_run(monkeypatch):
    """The caches of the prefill chunks run, in order (held, so that no cache's id is reused by the next)."""
    import engine.prefill

    run = []
    chunk = engine.prefill.prefill_chunk

    def counted(model, ids, cache):
        run.append(cache)
        return chunk(model, ids, cache)

    monkeypatch.setattr(engine.prefill, "prefill_chunk", counted)
    return run


@contextlib.contextmanager
def layers_run(model):
    """Within, the forward passes of the model's decoder layers that ran to their end, counted in the list it gives."""
    run = []
    hooks = [layer.register_forward_hook(lambda *_: run.append(1)) for layer in model.model.layers]
    try:
        yield run
    finally:
        for hook in hooks:
            hook.remove()


def leaving_at(row: int, ask: int, calls: list[int]):
    """A `leave` true for `row` from its `ask`-th question on, counting every row's questions in `calls`."""

    def leave(i):
        calls[i] += 1
        return i == row and calls[i] >= ask

    return leave


def test_a_prompt_that_leaves_in_its_prefill_runs_no_more_chunks_and_the_others_go_on(chunked, prompts, chunks_run):
    calls = [0] * 3
    reports = [GenerationReport() for _ in prompts]
    sampling = Sampling(NEW)
    ask = chunked.model.config.num_hidden_layers + 2  # before its second chunk's second layer
    texts, finishes = streamed(chunked, prompts, sampling, reports=reports, leave=leaving_at(1, ask, calls))
    assert (texts[1], finishes[1], calls[1]) == ("", "left", ask)  # then never asked again
    assert reports[1].prompt_tokens == len(prompts[1]) and reports[1].new_tokens == reports[1].decode_steps == 0
    assert reports[1].finish_reason == "left" and reports[1].prefill_s > 0
    # two chunks of its 4 began; the others' every chunk ran
    ran = [len(list(chunks)) for _, chunks in itertools.groupby(chunks_run, key=id)]
    assert ran == [len(chunk_bounds(len(prompts[i]), 64)) if i != 1 else 2 for i in range(3)]
    for row in (0, 2):
        assert (texts[row], finishes[row]) == (alone(chunked, prompts[row], sampling)[0], "length")
        assert reports[row].new_tokens == NEW and reports[row].batch == 2


def test_a_prompt_that_leaves_after_its_prefill_does_not_wait_for_its_index_builds(chunked, prompts, chunks_run):
    chunks = len(chunk_bounds(len(prompts[0]), 64))
    ask = prefill_asks(chunked, len(prompts[0]), builds=False) + 1  # before the first layer's index build
    calls = [0]
    result = chunked.generate(prompts[0], NEW, leave=leaving_at(0, ask, calls), progress=False)
    assert (result.token_ids, result.report.finish_reason, calls) == ([], "left", [ask])
    assert len(chunks_run) == chunks


def test_prompts_that_all_leave_before_their_prefill_run_nothing(chunked, prompts):
    with layers_run(chunked.model) as run:
        results = chunked.generate(prompts, NEW, leave=lambda _row: True, progress=False)
        assert run == []
        assert [(r.text, r.token_ids, r.report.finish_reason) for r in results] == [("", [], "left")] * 3
        assert [r.report.prompt_tokens for r in results] == [len(p) for p in prompts]
        report = GenerationReport()
        assert list(chunked.stream(prompts[0], NEW, report=report, leave=lambda _row: True, progress=False)) == []
        assert report.finish_reason == "left" and run == []


def test_a_prompt_that_leaves_on_its_way_in_is_given_up_and_the_next_joins(chunked, prompts):
    calls = [0] * 3
    more, _ = joining_at({1: [(prompts[1], Sampling(NEW))], 3: [(prompts[2], Sampling(NEW - 4))]})
    reports = [GenerationReport()]
    rows = []
    for row, piece, finish in chunked.stream_batch(
        [prompts[0]], Sampling(NEW), reports=reports, more=more, leave=leaving_at(1, 2, calls), progress=False
    ):
        rows.append((row, piece, finish))
    assert (1, "", "left") in rows and [r for r in rows if r[0] == 1] == [(1, "", "left")]
    assert calls[1] == 2 and reports[1].finish_reason == "left" and reports[1].new_tokens == 0
    assert reports[1].prompt_tokens == len(prompts[1]) and reports[1].prefill_s > 0
    texts = ["".join(piece for row, piece, _ in rows if row == i) for i in (0, 2)]
    assert texts == [alone(chunked, prompts[0], Sampling(NEW))[0], alone(chunked, prompts[2], Sampling(NEW - 4))[0]]
    assert reports[2].new_tokens == NEW - 4 and reports[2].finish_reason == "length"


def test_a_prompt_whose_prefill_fails_on_its_way_in_fails_alone_and_the_next_joins(chunked, prompts, monkeypatch):
    """Prompt 1's second chunk runs out of memory: it ends with finish "error" and its report holds the
    exception; its cache is given up, and prompt 0 and prompt 2, which joins after it, stream what they do alone."""
    run_chunk, failing = engine.prefill.prefill_chunk, prompts[1][64:128][None]
    given_up = []

    def prefill_chunk(model, ids, cache):
        if torch.equal(ids, failing):
            raise torch.OutOfMemoryError("no room for this chunk")
        return run_chunk(model, ids, cache)

    monkeypatch.setattr(engine.prefill, "prefill_chunk", prefill_chunk)
    monkeypatch.setattr(SteppedPrefill, "close", lambda self, close=SteppedPrefill.close: given_up.append(close(self)))
    more, _ = joining_at({1: [(prompts[1], Sampling(NEW))], 4: [(prompts[2], Sampling(NEW - 4))]})
    reports = [GenerationReport()]
    rows = list(chunked.stream_batch([prompts[0]], Sampling(NEW), reports=reports, more=more, progress=False))
    assert [r for r in rows if r[0] == 1] == [(1, "", "error")] and len(given_up) == 1
    assert reports[1].finish_reason == "error" and isinstance(reports[1].error, torch.OutOfMemoryError)
    assert reports[1].new_tokens == 0 and reports[1].prompt_tokens == len(prompts[1]) and reports[1].prefill_s > 0
    texts = ["".join(piece for row, piece, _ in rows if row == i) for i in (0, 2)]
    assert texts == [alone(chunked, prompts[0], Sampling(NEW))[0], alone(chunked, prompts[2], Sampling(NEW - 4))[0]]
    assert [reports[i].finish_reason for i in (0, 2)] == ["length", "length"] and reports[0].error is None
    # the error, kept as long as its report, keeps no frame's locals: they held the prompt's cache, its
    # activations and (through the batch's frame) every other prompt's cache
    frames = [frame for frame, _ in traceback.walk_tb(reports[1].error.__traceback__)]
    assert frames and [frame.f_code.co_name for frame in frames if frame.f_locals] == []


def test_a_prompt_of_the_call_whose_prefill_fails_fails_alone_where_generate_raises(chunked, prompts, monkeypatch):
    """stream_batch's own prompts are prefilled one by one: prompt 1's runs out of memory, it ends with
    finish "error", and prompts 0 and 2 stream what they do alone; `generate` of the same prompts raises."""
    import engine.batch_run

    prefill = engine.batch_run.prefill_prompt

    def out_of_memory_for_prompt_1(model, ids, *args, **kwargs):
        if torch.equal(ids[0], prompts[1]):
            raise torch.OutOfMemoryError("no room for this prompt")
        return prefill(model, ids, *args, **kwargs)

    monkeypatch.setattr(engine.batch_run, "prefill_prompt", out_of_memory_for_prompt_1)
    reports = [GenerationReport() for _ in range(3)]
    rows = list(chunked.stream_batch(prompts[:3], Sampling(NEW), reports=reports, progress=False))
    assert [r for r in rows if r[0] == 1] == [(1, "", "error")] and isinstance(reports[1].error, torch.OutOfMemoryError)
    assert reports[1].new_tokens == 0 and reports[1].prompt_tokens == len(prompts[1])
    texts = ["".join(piece for row, piece, _ in rows if row == i) for i in (0, 2)]
    assert texts == [alone(chunked, prompts[i], Sampling(NEW))[0] for i in (0, 2)]
    with pytest.raises(torch.OutOfMemoryError):
        chunked.generate(prompts[:3], NEW, progress=False)
    assert json.loads(json.dumps(reports[1].as_dict()))["error"] == "OutOfMemoryError: no room for this prompt"
    assert reports[0].as_dict()["error"] is None


def test_a_prompt_whose_cache_cannot_be_made_fails_alone(chunked, prompts, monkeypatch):
    made, make = [], engine.prefill.prompt_cache

    def second_cache_fails(*args, **kwargs):
        made.append(1)
        if len(made) == 2:  # the joining prompt's, after the first prompt's
            raise MemoryError("no host memory for its store")
        return make(*args, **kwargs)

    monkeypatch.setattr(engine.prefill, "prompt_cache", second_cache_fails)
    more, _ = joining_at({1: [(prompts[1], Sampling(NEW))]})
    reports = [GenerationReport()]
    rows = list(chunked.stream_batch([prompts[0]], Sampling(NEW), reports=reports, more=more, progress=False))
    assert [r for r in rows if r[0] == 1] == [(1, "", "error")] and isinstance(reports[1].error, MemoryError)
    assert "".join(piece for row, piece, _ in rows if row == 0) == alone(chunked, prompts[0], Sampling(NEW))[0]


def test_a_prompt_that_leaves_on_its_way_in_after_the_batch_ended_ends_the_call(chunked, prompts):
    more, _ = joining_at({1: [(prompts[1], Sampling(NEW))]})
    calls = [0] * 2
    texts, finishes = streamed(chunked, [prompts[0]], Sampling(2), more=more, leave=leaving_at(1, 3, calls))
    assert finishes == ["length", "left"] and texts[1] == "" and calls[1] == 3


def test_a_prompt_that_leaves_in_its_prefill_after_a_prefix_leaves_the_document_as_it_was(chunked, prompts):
    prefix = chunked.prefix(prompts[0], progress=False)
    question = prompts[1][:150]  # 151 positions after the document's last token: 3 chunks
    want = chunked.generate(question, NEW, prefix=prefix, progress=False).token_ids
    gone = chunked.generate(question, NEW, prefix=prefix, leave=leaving_at(0, 2, [0]), progress=False)
    assert gone.token_ids == [] and gone.report.finish_reason == "left"
    assert gone.report.prompt_tokens == prefix.tokens + len(question) == len(prompts[0]) + len(question)
    assert chunked.generate(question, NEW, prefix=prefix, progress=False).token_ids == want
    prefix.release()


@pytest.mark.parametrize(("order", "seen"), [("chunks", [200, 100]), ("layers", [300, 0])])
def test_a_prefill_asks_leave_before_each_layer_of_each_chunk(llm, prompts, order, seen):
    """3 chunks of 100 through 2 layers, given up at the 4th question: before the second chunk's second
    layer, or, layer by layer, before the second layer's first chunk."""
    cfg = CFG.replace(prefill_chunk=100, prefill_order=order)
    calls = [0]
    leave = leaving_at(0, 4, calls)
    cache = HybridCache(llm.model, cfg, max_length=len(prompts[0]) + 1, prompt_length=len(prompts[0]))
    try:
        with torch.no_grad(), pytest.raises(PrefillLeft, match="left during its prefill"):
            prefill(llm.model, prompts[0][None], cache, 100, progress=False, order=order, leave=lambda: leave(0))
        assert calls == [4] and [layer.n_seen for layer in cache.layers] == seen
    finally:
        cache.close()
