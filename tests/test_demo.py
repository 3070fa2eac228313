"""`hybridattn generate --demo` (engine.cli.answer._demo) prints whole lines: no progress bar, and an
answer's line is ended even when its run fails."""

import argparse

import pytest

from engine.api import GenerationResult
from engine.cli import answer as cli
from engine.generation import GenerationReport


class Answers:
    """Stands in for HybridLLM: answers with the pass key, or fails at `fail`."""

    def __init__(self, tokenizer, fail=None):
        self.tokenizer, self.fail, self.progress = tokenizer, fail, []

    def generate_full_attention(self, prompt, max_new_tokens):
        if self.fail == "full":
            raise RuntimeError("full attention failed")
        return " " + prompt.split("The pass key is ")[1].split(".")[0] + "."

    def generate(self, prompt, max_new_tokens, *, progress=True):
        self.progress.append(progress)
        text = self.generate_full_attention(prompt, max_new_tokens)
        return GenerationResult(text, [1, 2], GenerationReport(prompt_tokens=4000, new_tokens=2, decode_steps=1))


def args():
    return argparse.Namespace(seed=0, max_new_tokens=8, json=None)


def test_the_demo_prints_its_answers_on_whole_lines_without_bars(bundled_tokenizer, capfd):
    llm = Answers(bundled_tokenizer)
    report = cli._demo(llm, args())
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert len(lines) == 3 and "\r" not in out + err and "\x1b" not in out + err
    assert lines[0].startswith("demo: a pass key hidden at depth 40%")
    key = lines[0].rsplit(" ", 1)[1]
    assert lines[1] == f"full attention : '{key}.' -> correct"
    assert lines[2] == f"hybridattn     : '{key}.' -> correct"
    assert report.prompt_tokens == 4000 and llm.progress == [False]


def test_a_failing_run_ends_its_line_before_the_error(bundled_tokenizer, capfd):
    with pytest.raises(RuntimeError, match="full attention failed"):
        cli._demo(Answers(bundled_tokenizer, fail="full"), args())
    out = capfd.readouterr().out
    assert out.endswith("full attention : \n")
