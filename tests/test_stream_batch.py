"""Prompts decoded together, each with its own sampling (HybridLLM.stream_batch, engine.sampling): each
streams what it streams alone, ends by its own length, stop strings or its consumer's leaving, and the
batch goes on without it."""

import pytest
import torch

from engine.api import HybridLLM
from engine.generation import Decoding, GenerationReport
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
    texts, finishes = [""] * len(prompts), [""] * len(prompts)
    for row, piece, finish in llm.stream_batch(prompts, sampling, progress=False, **kwargs):
        assert not finishes[row], f"prompt {row} went on after its finish"
        texts[row] += piece
        finishes[row] = finish
    return texts, finishes


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


def test_a_prompt_whose_consumer_leaves_ends_there_and_the_batch_goes_on(llm, prompts):
    calls = [0] * len(prompts)

    def leave(row):
        calls[row] += 1
        return row == 1 and calls[row] >= 3

    reports = [GenerationReport() for _ in prompts]
    texts, finishes = streamed(llm, prompts, Sampling(NEW), reports=reports, leave=leave)
    assert reports[1].new_tokens == 3 and finishes[1] == "stop"
    for row in (0, 2):
        assert (texts[row], finishes[row]) == (alone(llm, prompts[row], Sampling(NEW))[0], "length")
        assert reports[row].new_tokens == NEW


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
        ({"stop": [""]}, "stop strings"),
    ],
)
def test_bad_sampling_is_refused_naming_what_is_wrong(llm, prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        list(llm.stream_batch(prompts, Sampling(**kwargs), progress=False))


def test_a_batch_needs_a_list_of_prompts_and_a_sampling_for_each(llm, prompts):
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        list(llm.stream_batch([], Sampling()))
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        list(llm.stream_batch(prompts[0], Sampling()))
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


def test_each_prompt_stops_at_an_end_token_or_not_as_its_sampling_says(llm, prompts, monkeypatch):
    free = llm.generate(prompts[0], NEW, stop_at_eos=False, progress=False)
    end = free.token_ids[3]  # taken as the model's end-of-sequence token: the answer ends at its first
    monkeypatch.setattr(llm.model.generation_config, "eos_token_id", end)
    reports = [GenerationReport() for _ in range(2)]
    sampling = [Sampling(NEW), Sampling(NEW, stop_at_eos=False)]
    texts, finishes = streamed(llm, [prompts[0]] * 2, sampling, reports=reports)
    assert finishes == ["eos", "length"] and texts[1] == free.text
    assert reports[0].new_tokens == free.token_ids.index(end) + 1 and reports[1].new_tokens == NEW
