"""Integration on the bundled SmolLM2 model at short contexts."""

import pytest
import torch

from bench.evals.tasks import make_sample, score
from engine import OffloadConfig
from engine.api import HybridLLM


@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    # the exact flat index keeps the index build out of the test time; the other
    # methods are exercised on tiny models in test_attention.py
    cfg = OffloadConfig(window=64, key_index="flat", top_k=32, device="cpu")
    return HybridLLM.from_pretrained("smollm2-135m", offload=cfg)


@pytest.fixture(scope="module")
def passkey(llm):
    return make_sample("passkey", 900, llm.tokenizer, seed=0, depth=0.3)


@pytest.fixture(scope="module")
def result(llm, passkey):
    return llm.generate(passkey.prompt, 8, progress=False)


def test_passkey_answer_matches_full_attention(llm, passkey, result):
    full = llm.generate_full_attention(passkey.prompt, 8)
    assert score(passkey, full) == 1.0  # the model can do this task ...
    assert score(passkey, result.text) == score(passkey, full)  # ... and so can the engine
    r = result.report
    assert r.prompt_tokens == passkey.n_tokens and r.new_tokens == len(result.token_ids) <= 8
    assert 0 < r.kv_read_frac < 1  # a subset of the host store was read per step
    assert r.decode_steps == r.new_tokens - 1 and r.keys_scored_frac > 0  # the flat index scores the host keys
    weights = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    assert r.device_bytes["weights"] == weights
    assert r.host_bytes["kv_store"] > r.device_bytes["resident_kv"]


def test_with_every_step_re_checked_the_text_is_full_attention_s(llm, passkey):
    """A margin no step's logits clear: every step runs the tokens decoded so far again exactly."""
    always = llm.offload.replace(recheck_margin=1e9, recheck_wide_margin=1e9, recheck_share=1.0, recheck_read_limit=0)
    every_step = HybridLLM(llm.model, llm.tokenizer, always)
    result = every_step.generate(passkey.prompt, 24, stop_at_eos=False, progress=False)
    assert result.report.rechecked_steps == 23 and result.report.kv_read_frac > 1  # each reads the host store again
    full = llm.generate_full_attention(passkey.prompt, 24)
    assert full and result.text.startswith(full)


def test_questions_after_a_prefix_get_the_whole_prompt_s_answer(llm, passkey, result):
    """The passkey's document prefilled once: its question after it answers as the whole prompt does,
    and again after another question, with only the question prefilled."""
    document, question = passkey.prompt.rsplit("\n\n", 1)
    prefix = llm.prefix(document, progress=False)
    try:
        first = llm.generate("\n\n" + question, 8, prefix=prefix, progress=False)
        llm.generate("\n\nWhat colour is the grass? The grass is", 4, prefix=prefix, progress=False)
        again = llm.generate("\n\n" + question, 8, prefix=prefix, progress=False)
    finally:
        prefix.release()
    assert score(passkey, first.text) == score(passkey, result.text) == 1.0
    assert again.token_ids == first.token_ids and again.report.kv_read_frac == first.report.kv_read_frac
    assert first.report.prefix_tokens == prefix.tokens > 10 * (first.report.prompt_tokens - prefix.tokens)


def test_stream_yields_the_generated_text(llm, passkey, result):
    pieces = list(llm.stream(passkey.prompt, 8, progress=False))
    assert len(pieces) > 1
    assert "".join(pieces) == result.text


def test_a_prompt_shorter_than_the_resident_set_generates_as_full_attention_does(llm):
    """Everything stays resident, then offloading starts during decode."""
    prompt = "Hello, my name is"
    result = llm.generate(prompt, 80, stop_at_eos=False, progress=False)
    assert len(result.token_ids) == 80
    assert result.report.host_bytes["kv_store"] > 0  # tokens left the window during decode
    # the host holds less than a block: every host token is read, so the text is full attention's
    assert result.text == llm.generate_full_attention(prompt, 80)


def test_chat_messages_use_the_chat_template(llm):
    ids = llm.encode([{"role": "user", "content": "Hi"}])
    text = llm.tokenizer.decode(ids[0])
    assert "user" in text and "Hi" in text and text.rstrip().endswith("assistant")


def test_progress_false_silences_every_bar(llm, passkey, capfd):
    llm.generate(passkey.prompt, 2, progress=False)
    err = capfd.readouterr().err
    assert "building host key index" not in err and "prefill" not in err


def test_a_list_of_prompts_decodes_as_a_batch_each_as_alone(llm, passkey):
    prompts = [
        passkey.prompt,
        make_sample("passkey", 700, llm.tokenizer, seed=1, depth=0.6).prompt,
        [{"role": "user", "content": "Say hello."}],  # shorter than the resident set
    ]
    results = llm.generate(prompts, 12, progress=False)
    assert len(results) == 3
    for prompt, got in zip(prompts, results):
        alone = llm.generate(prompt, 12, progress=False)
        assert got.token_ids == alone.token_ids and got.text == alone.text
        g, w = got.report, alone.report  # each report is its sequence's, as alone
        assert (g.prompt_tokens, g.new_tokens, g.decode_steps) == (w.prompt_tokens, w.new_tokens, w.decode_steps)
        assert g.rechecked_steps == w.rechecked_steps and g.kv_read_frac == pytest.approx(w.kv_read_frac, rel=1e-3)
        assert g.keys_scored_frac == pytest.approx(w.keys_scored_frac, rel=1e-3)
    assert results[0].report.keys_scored_frac > 0  # filled for a batch too
    assert score(passkey, results[0].text) == 1.0
    assert results[0].report.host_bytes["kv_store"] > 0


def test_an_empty_list_of_prompts_is_refused(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([], 4)


def test_the_same_prompt_gives_the_same_tokens_and_reads_in_every_run(llm):
    """The default configuration (qq lists built on the worker thread while the prefill's last
    layers run, host stores pooled between generations): a second generation, and one from a
    new HybridLLM with stores of its own, give the same tokens, reads and re-checks."""
    prompt = make_sample("niah_single", 1500, llm.tokenizer, seed=3).prompt
    # every step runs wider, some exactly
    wide = dict(recheck_margin=1e9, recheck_wide_margin=2.0, recheck_share=1.0, recheck_read_limit=0.0)
    cfg = OffloadConfig(window=64, build_workers=1, device="cpu", **wide)
    runs = [HybridLLM(llm.model, llm.tokenizer, cfg)] * 2 + [HybridLLM(llm.model, llm.tokenizer, cfg)]
    results = [run.generate(prompt, 16, stop_at_eos=False, progress=False) for run in runs]
    first = results[0]
    assert 0 < first.report.kv_read_frac < 1 and first.report.widened_steps > first.report.rechecked_steps > 0
    assert 0 < first.report.rated_frac < 1  # the adaptive budget rates a part of the host tokens
    # a tie the first wider run leaves runs wider once more (recheck_wider_runs 2)
    assert first.report.widened_steps < first.report.wider_runs <= 2 * first.report.widened_steps
    for other in results[1:]:
        assert other.token_ids == first.token_ids
        same = ("kv_read_frac", "keys_scored_frac", "rated_frac", "rechecked_steps", "widened_steps", "wider_runs")
        same += ("rechecks_changed", "host_bytes")
        assert {k: getattr(other.report, k) for k in same} == {k: getattr(first.report, k) for k in same}
