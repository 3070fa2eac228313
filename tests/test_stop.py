"""Stop strings (engine.stop): a sequence ends at the token that completes one, its text cut before
it, the tokens before it as they were without it; a stream shows no part of one; the checks."""

import pytest
import torch

from engine.api import HybridLLM
from engine.sampling import Sampling
from engine.stop import StopStrings, TextStream
from tests.conftest import tiny_llama
from tests.test_generation import CFG, LENGTHS

NEW = 24


@pytest.fixture(scope="module")
def llm(bundled_tokenizer):
    return HybridLLM(tiny_llama(vocab=len(bundled_tokenizer)), bundled_tokenizer, CFG)


@pytest.fixture(scope="module")
def prompts():
    ids = torch.randint(0, 5000, (400,), generator=torch.Generator().manual_seed(5))
    return [ids[7 * i : 7 * i + n] for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def free(llm, prompts):
    """Each prompt's answer without stop strings (the random model never picks its EOS before NEW)."""
    return llm.generate(prompts, NEW, stop_at_eos=False, progress=False)


def first_new_piece(stops: StopStrings, tokens: list[int], start: int) -> str:
    """The text a token from `start` on adds that the text before it does not already hold."""
    for k in range(start, len(tokens)):
        before, after = stops.text(tokens[:k]), stops.text(tokens[: k + 1])
        piece = after[len(before) :].strip()
        if after.startswith(before) and piece and piece not in before and "\ufffd" not in piece:
            return piece
    raise AssertionError("no token adds new text")


def stopped_at(stops: StopStrings, tokens: list[int]) -> int:
    """How many of `tokens` a sequence decodes with `stops`: up to the first that completes one."""
    return next((n for n in range(1, len(tokens) + 1) if stops.reached(tokens[:n])), len(tokens))


def test_each_sequence_of_a_batch_ends_at_its_first_stop_string(llm, free, prompts):
    stops = StopStrings(llm.tokenizer, [])
    stop = first_new_piece(stops, free[1].token_ids, NEW // 3)  # row 1 ends a third of the way in, or later
    stops = StopStrings(llm.tokenizer, ["\x00never", stop])
    got = llm.generate(prompts, NEW, stop=stops.strings, stop_at_eos=False, progress=False)
    for alone, result in zip(free, got):
        n = stopped_at(stops, alone.token_ids)
        assert result.token_ids == alone.token_ids[:n]  # the tokens before are as they were
        assert result.text == (alone.text[: alone.text.find(stop)] if stop in alone.text else alone.text)
        assert result.report.new_tokens == n and result.report.decode_steps == n - 1
        assert result.report.finish_reason == ("stop" if stops.reached(alone.token_ids[:n]) else "length")
    assert len(got[1].token_ids) < NEW and stop not in got[1].text and got[1].text  # it stopped early, cut


def test_a_stream_shows_no_part_of_a_stop_string(llm, free, prompts):
    stops = StopStrings(llm.tokenizer, [])
    stop = first_new_piece(stops, free[0].token_ids, NEW // 2)
    pieces = list(llm.stream(prompts[0], NEW, stop=stop, stop_at_eos=False, progress=False))
    assert "".join(pieces) == llm.generate(prompts[0], NEW, stop=stop, stop_at_eos=False, progress=False).text
    assert "".join(pieces) == free[0].text[: free[0].text.find(stop)]


def test_a_stream_gives_what_it_held_back_when_the_stop_string_never_comes(llm, free, prompts):
    """A string the answer's end begins but never completes: held back, then shown at the end."""
    text = free[2].text
    stop = text[-1] + "\x00never"
    pieces = list(llm.stream(prompts[2], NEW, stop=stop, stop_at_eos=False, progress=False))
    assert "".join(pieces) == text  # its last character too, held back at the last token


def test_the_cut_and_what_a_stream_holds_back():
    stops = StopStrings(None, ["\n\nQ", "."])
    assert stops.cut("a b\n\nQ c. d") == "a b" and stops.cut("a. b\n\nQ") == "a" and stops.cut("none") == "none"
    assert [stops.held(t) for t in ("ab\n", "ab\n\n", "ab\n\nx", "ab")] == [1, 2, 0, 0]
    assert stops.held("a\n\nQ") == 0  # complete: `reached`'s, not held


def test_a_stop_string_is_checked_at_the_answer_s_end_only(bundled_tokenizer):
    stops = StopStrings(bundled_tokenizer, "END")
    tokens = bundled_tokenizer.encode("x END " + "word " * 200)
    n = stopped_at(stops, tokens)
    assert "END" in stops.text(tokens[:n]) and "END" not in stops.text(tokens[: n - 1])  # where it is completed
    assert not stops.reached(tokens)  # far behind the end: found at the token that completed it, not again


@pytest.mark.parametrize("strings", [[""], ["ok", 3], [None]])
def test_bad_stop_strings_are_refused(strings, llm, prompts):
    with pytest.raises(ValueError, match="stop strings must be non-empty strings"):
        llm.generate(prompts[0], 2, stop=strings, progress=False)


@pytest.mark.parametrize("stop", [0, False, 5, {"END"}])
def test_a_stop_that_is_not_strings_is_refused(stop, llm, prompts):
    # 0 and False were read as no stop strings, 5 failed in iter()
    with pytest.raises(ValueError, match="stop must be a string or a list of strings"):
        llm.generate(prompts[0], 2, stop=stop, progress=False)
    with pytest.raises(ValueError, match="stop must be a string or a list of strings"):
        Sampling(stop=stop)


@pytest.mark.parametrize("strings", [[""], ["ok", 3]])
def test_a_sampling_checks_its_stop_strings_where_it_is_made(strings):
    # checked only once a running batch took it in (from more()), where the error ended every prompt
    with pytest.raises(ValueError, match="stop strings must be non-empty strings"):
        Sampling(stop=strings)


@pytest.mark.parametrize("stop_at_eos", ["no", [True], 1, None])
def test_stop_at_eos_is_true_or_false(stop_at_eos, llm, prompts):
    # a string was truthy, a list was taken for one setting per prompt and indexed past its end
    with pytest.raises(ValueError, match="stop_at_eos must be True or False"):
        llm.generate(prompts[:2], 2, stop_at_eos=stop_at_eos, progress=False)
    with pytest.raises(ValueError, match="stop_at_eos must be True or False"):
        next(llm.stream(prompts[0], 2, stop_at_eos=stop_at_eos, progress=False))
    with pytest.raises(ValueError, match="stop_at_eos must be True or False"):
        Sampling(stop_at_eos=stop_at_eos)


def test_no_stop_strings_stop_nothing(llm, free, prompts):
    assert not StopStrings(None, None) and not StopStrings(None, []).reached([1, 2])
    assert llm.generate(prompts[1], NEW, stop=[], stop_at_eos=False, progress=False).token_ids == free[1].token_ids


def test_a_stop_string_that_is_one_special_token_ends_the_answer_at_that_token(bundled_tokenizer):
    """The text leaves special tokens out, so "<|im_end|>" (as lm-eval's chat tasks give it) would never
    show there: the answer ends where the token comes, its text what came before."""
    hello = bundled_tokenizer.encode("hello there", add_special_tokens=False)
    end = bundled_tokenizer.convert_tokens_to_ids("<|im_end|>")
    stops = StopStrings(bundled_tokenizer, ["<|im_end|>", "hello"])
    assert stops.token_ids == {end}  # "hello", one ordinary token, is found in the text
    assert not stops.reached(hello[1:]) and stops.reached([*hello[1:], end])
    stream = TextStream(stops)
    shown = "".join(stream.add(t) for t in [*hello[1:], end]) + stream.finish()
    assert shown == bundled_tokenizer.decode(hello[1:])


def text_stream_reference(stops: StopStrings, tokens: list[int]) -> list[str]:
    """The pieces a stream shows, each from the whole answer decoded again at each token."""
    pieces, shown = [], ""
    for n in range(1, len(tokens) + 1):
        text = stops.text(tokens[:n])
        if stops.cut(text) != text:
            text = stops.cut(text)
        elif text.endswith("\ufffd"):
            pieces.append("")
            continue
        else:
            text = text[: len(text) - stops.held(text)]
        pieces.append(text[len(shown) :] if len(text) > len(shown) else "")
        shown = max(shown, text, key=len)
        if stops.reached(tokens[:n]):
            break
    final = stops.cut(stops.text(tokens[:n]))
    return pieces + [final[len(shown) :]]


def test_a_stream_decodes_each_token_once_and_shows_what_the_whole_text_shows(bundled_tokenizer):
    """Text with characters of several bytes (split across tokens), stop strings that come and that do
    not: the pieces are those of the whole answer decoded again at each token, and the tokens decoded
    stay within a few per token, however long the answer."""
    text = "Le café coûte 3 € — 東京は晴れ 🌤️, then END of it. " * 12
    tokens = bundled_tokenizer.encode(text, add_special_tokens=False)
    decoded = []

    class Counting:
        def decode(self, ids, **kwargs):
            decoded.append(len(ids))
            return bundled_tokenizer.decode(ids, **kwargs)

        def encode(self, s, **kwargs):
            return bundled_tokenizer.encode(s, **kwargs)

    for strings in ([], ["END"], ["晴れ 🌤"], ["\x00never", "it. Le café coûte 3 € — 東京は晴れ 🌤️, then END of it. Le"]):
        stops = StopStrings(Counting(), strings)
        stream, pieces = TextStream(stops), []
        for token in tokens:
            pieces.append(stream.add(token))
            if stops.reached(stream.tokens):
                break
        pieces.append(stream.finish())
        assert pieces == text_stream_reference(StopStrings(bundled_tokenizer, strings), tokens)
    decoded.clear()
    stream = TextStream(StopStrings(Counting(), ["\x00never"]))
    for token in tokens:
        stream.add(token)
    assert sum(decoded) < 8 * len(tokens)  # the newest tokens at each, not the whole answer (70,000 here)
