"""A document prefilled once and continued by several prompts (engine.prefix): each prompt finds the
state the document left, to the bit, whatever ran before it; with a covering budget a continuation is
the whole prompt's generation; the cache's rewind drops every row, landmark and list entry the
continuation added; misuse is refused with errors that say what to do."""

import pytest
import torch

from engine import HybridCache, OffloadConfig
from engine.api import HybridLLM
from engine.prefix import Prefix
from tests.conftest import tiny_llama
from tests.test_attention import COVER_ALL

# the default's parts at a small scale: query->query lists, Quest's blocks, the estimate, the adaptive
# budget rated on the exact keys, near ties run again wider and exactly (margins a random model's
# logits often fall within)
DEFAULT_SMALL = OffloadConfig(
    device="cpu",
    n_sink=4,
    window=16,
    block_size=8,
    host_dtype="float32",
    recent=16,
    prefill_chunk=64,
    recheck_margin=0.05,
    recheck_wide_margin=0.02,
    recheck_share=1.0,
)
NEW = 40  # answers long enough that the host store, the summaries and the lists take new tokens


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 5000, (460,), generator=torch.Generator().manual_seed(3))


def answer(llm, prompt, prefix=None) -> tuple:
    """What a generation gives that no clock decides: tokens, reads and re-checks."""
    r = llm.generate(prompt, NEW, prefix=prefix, stop_at_eos=False, progress=False)
    rep = r.report
    return r.token_ids, rep.prompt_tokens, rep.kv_read_frac, rep.rated_frac, rep.rechecked_steps, rep.wider_runs


def state(cache) -> list:
    """Every layer's positions, host rows, landmarks and lists, copied."""
    out = []
    for layer in cache.layers:
        n = layer.host.n
        blocks = layer.blocks
        parts = [layer.n_seen, n, layer.host.keys[:, :n].clone(), layer.host.values[:, :n].clone()]
        parts += [layer.resident_k.clone(), layer.resident_pos.copy(), blocks.n, blocks.landmarks.clone()]
        for index in (layer.summary.keys, layer.summary.values, layer.summary.coarse_keys):
            parts += [index.n, index.landmarks.clone()]
        lists = layer.key_index.lists
        parts += [layer.n_indexed, lists.lists.clone(), lists.list_scores.clone(), lists.n_keys]
        out.append(parts)
    return out


def same(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if hasattr(a, "shape"):  # numpy
        return a.shape == b.shape and (a == b).all()
    return a == b


def test_each_prompt_after_a_prefix_finds_the_document_as_it_was_left(model, bundled_tokenizer, ids):
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    doc, first, second = ids[:400], ids[400:430], ids[430:460]
    prefix = llm.prefix(doc, progress=False)
    before = state(prefix.cache)
    once = answer(llm, first, prefix)
    assert once[1] == 430 and once[2] > 0  # the whole prompt's positions; host rows read
    assert once[4] + once[5] > 0  # near ties ran again: the rewind also undoes what they wrote
    answer(llm, second, prefix)
    assert same(state(prefix.cache), before)  # what the continuations added is gone, to the bit
    assert answer(llm, first, prefix) == once  # and the first prompt finds what it found
    prefix.release()


@pytest.mark.parametrize("length", [10, 25])
def test_a_document_shorter_than_the_resident_set_or_a_block_of_host_tokens(model, bundled_tokenizer, ids, length):
    """All of it resident (10 tokens), or too few host tokens to build the key index on (25): the
    index is built during the first prompt, and dropped again with what that prompt added."""
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    prefix = llm.prefix(ids[:length], progress=False)
    assert all(layer.key_index is None for layer in prefix.cache.layers)
    once = answer(llm, ids[400:430], prefix)
    answer(llm, ids[430:460], prefix)
    assert all(layer.key_index is None for layer in prefix.cache.layers)
    assert answer(llm, ids[400:430], prefix) == once
    prefix.release()


@pytest.mark.parametrize(
    "changes",
    [
        dict(key_index="flat", budget="fixed", top_k=8),  # a faiss index, copied whole
        dict(sketch_rank=8),  # candidates rated on a key sketch, which keys are added to
        dict(candidates_from="blocks", landmark="mean"),  # no key index; the summaries' keys choose blocks
        dict(estimate=False),  # blocks without summaries
    ],
    ids=["faiss", "sketch", "blocks-alone", "no-estimate"],
)
def test_other_configurations_find_the_document_again(model, bundled_tokenizer, ids, changes):
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL.replace(**changes))
    prefix = llm.prefix(ids[:400], progress=False)
    once = answer(llm, ids[400:430], prefix)
    answer(llm, ids[430:460], prefix)
    assert answer(llm, ids[400:430], prefix) == once
    prefix.release()


@pytest.mark.parametrize("order", ["chunks", "layers"])
def test_a_continuation_with_a_covering_budget_is_the_whole_prompt_s_generation(model, bundled_tokenizer, ids, order):
    cfg = OffloadConfig(device="cpu", **COVER_ALL, host_dtype="float32", prefill_chunk=64, prefill_order=order)
    llm = HybridLLM(model, bundled_tokenizer, cfg)
    prefix = llm.prefix(ids[:300], progress=False)
    for question in (ids[300:320], ids[320:322]):
        whole = answer(llm, torch.cat([ids[:300], question]))
        assert answer(llm, question, prefix) == whole
    prefix.release()


def test_an_extended_prefix_is_the_longer_document_s(model, bundled_tokenizer, ids):
    """With a covering budget, a prompt after a prefix extended by more tokens answers as the whole prompt
    does; with the default's parts, it finds the extended state again after another prompt."""
    cfg = OffloadConfig(device="cpu", **COVER_ALL, host_dtype="float32", prefill_chunk=64)
    covering = HybridLLM(model, bundled_tokenizer, cfg)
    prefix = covering.prefix(ids[:300], progress=False)
    assert prefix.extend(ids[None, 300:340], progress=False) > 0 and prefix.tokens == 340
    assert answer(covering, ids[340:350], prefix) == answer(covering, ids[:350])
    prefix.release()
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    prefix = llm.prefix(ids[:300], progress=False)
    answer(llm, ids[300:310], prefix)  # a prompt before the extension leaves nothing behind either
    prefix.extend(ids[None, 300:400], progress=False)
    extended = state(prefix.cache)
    once = answer(llm, ids[400:430], prefix)
    assert once[1] == 430
    answer(llm, ids[430:460], prefix)
    assert same(state(prefix.cache), extended) and answer(llm, ids[400:430], prefix) == once
    with pytest.raises(ValueError, match="at least 2 token ids"):
        prefix.extend(ids[None, 400:401], progress=False)
    pieces = llm.stream(ids[400:430], NEW, prefix=prefix, stop_at_eos=False, progress=False)
    next(pieces)
    with pytest.raises(RuntimeError, match="one prompt at a time"):  # a stream after it holds it
        prefix.extend(ids[None, 400:410], progress=False)
    pieces.close()
    assert prefix.tokens == 400
    prefix.release()
    with pytest.raises(ValueError, match="was released"):
        prefix.extend(ids[None, 400:410], progress=False)


def test_a_list_of_prompts_after_a_prefix_answers_each_as_alone(model, bundled_tokenizer, ids):
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    prefix = llm.prefix(ids[:300], progress=False)
    questions = [ids[300:330], ids[330:345], ids[345:350]]
    alone = [llm.generate(q, 12, prefix=prefix, stop_at_eos=False, progress=False) for q in questions]
    listed = llm.generate(questions, 12, prefix=prefix, stop_at_eos=False, progress=False)
    assert [r.token_ids for r in listed] == [r.token_ids for r in alone]
    assert [r.report.kv_read_frac for r in listed] == [r.report.kv_read_frac for r in alone]
    prefix.release()


def test_a_stream_stopped_early_leaves_the_prefix_as_it_was(model, bundled_tokenizer, ids):
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    prefix = llm.prefix(ids[:300], progress=False)
    want = answer(llm, ids[300:330], prefix)
    pieces = llm.stream(ids[300:330], NEW, prefix=prefix, stop_at_eos=False, progress=False)
    next(pieces)
    with pytest.raises(RuntimeError, match="one prompt at a time"):  # the stream holds it
        llm.generate(ids[330:340], 2, prefix=prefix, progress=False)
    with pytest.raises(RuntimeError, match="not finished: finish or close it first"):
        prefix.release()
    pieces.close()
    assert answer(llm, ids[300:330], prefix) == want
    prefix.release()


def test_a_prefix_is_refused_where_it_cannot_serve(model, bundled_tokenizer, ids):
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    prefix = llm.prefix(ids[:100], progress=False)
    assert isinstance(prefix, Prefix) and prefix.tokens == 100
    chat = [{"role": "user", "content": "hello"}]
    with pytest.raises(ValueError, match="prompt 1 of the 2 after the prefix: the prompt is empty"):
        llm.generate(["a question", ""], 2, prefix=prefix, progress=False)
    with pytest.raises(ValueError, match="not chat messages"):
        llm.generate(chat, 2, prefix=prefix, progress=False)
    with pytest.raises(ValueError, match="not chat messages"):
        llm.prefix(chat, progress=False)
    with pytest.raises(ValueError, match="the prompt is empty"):
        llm.generate("", 2, prefix=prefix, progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens, got 1"):
        llm.prefix(ids[:1], progress=False)
    with pytest.raises(TypeError, match="prefix must be what HybridLLM.prefix returns"):
        llm.generate(ids[100:110], 2, prefix="a document", progress=False)
    other = HybridLLM(tiny_llama(vocab=len(bundled_tokenizer), seed=1), bundled_tokenizer, DEFAULT_SMALL)
    with pytest.raises(ValueError, match="made by another engine"):
        other.generate(ids[100:110], 2, prefix=prefix, progress=False)
    assert answer(llm, ids[100:110], prefix)[1] == 110  # none of the refusals touched it
    prefix.release()
    with pytest.raises(ValueError, match="was released"):
        llm.generate(ids[100:110], 2, prefix=prefix, progress=False)


def test_text_after_a_prefix_takes_no_special_tokens_of_its_own(model, bundled_tokenizer):
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    prefix = llm.prefix("A long document. " * 40, progress=False)
    question = " What is it about?"
    r = llm.generate(question, 3, prefix=prefix, stop_at_eos=False, progress=False)
    n_question = len(bundled_tokenizer(question, add_special_tokens=False).input_ids)
    assert r.report.prompt_tokens == prefix.tokens + n_question and r.report.prefix_tokens == prefix.tokens
    assert f"prompt {n_question} tokens after a prefix of {prefix.tokens}" in r.report.summary()
    # what the prefix holds to go back to the document, counted with the rest: its copy of the resident
    # set and of the query lists (ids and logits of m_keys entries per build query)
    copies = prefix.nbytes()
    assert r.report.device_bytes["prefix_copies"] == copies["device"]["prefix_copies"]
    assert copies["device"]["prefix_copies"] >= r.report.device_bytes["resident_kv"] > 0
    lists = [layer.key_index.lists.lists for layer in prefix.cache.layers]
    assert r.report.host_bytes["prefix_copies"] == copies["host"]["prefix_copies"] == sum(2 * x.nbytes for x in lists)
    prefix.release()


def test_transformers_generate_after_a_marked_cache(model, ids):
    """For transformers' generate: a cache marked after the document's prefill, given the whole prompt
    (transformers feeds the positions the cache lacks), rewound after each generation."""
    model.set_attn_implementation("hybrid")
    cfg = OffloadConfig(device="cpu", **COVER_ALL)
    doc, questions = ids[None, :300], [ids[None, 300:320], ids[None, 320:340]]
    cache = HybridCache(model, cfg, progress=False)
    with torch.no_grad():
        model(doc, cache=cache, use_cache=True)
    marks = cache.mark()
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)

    def generated(prompt, cache):
        return model.generate(prompt, cache=cache, attention_mask=torch.ones_like(prompt), **kwargs)[0, 320:].tolist()

    answers = []
    for question in (questions[0], questions[1], questions[0]):
        answers.append(generated(torch.cat([doc, question], 1), cache))
        cache.rewind(marks)
    assert (
        answers[2]
        == answers[0]
        == generated(torch.cat([doc, questions[0]], 1), HybridCache(model, cfg, progress=False))
    )
