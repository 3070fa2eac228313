"""Every public entry point rejects bad input with a clear message naming what was wrong."""

import logging
import re

import pytest
import torch

from engine import HybridCache, OffloadConfig, plan_memory
from engine.api import HybridLLM
from engine.config import MAX_COUNT
from engine.plan import full_attention_batch, largest_batch
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def llm(bundled_tokenizer):
    model = tiny_llama(vocab=len(bundled_tokenizer))
    return HybridLLM(model, bundled_tokenizer, OffloadConfig(device="cpu"))


@pytest.mark.parametrize(
    "prompt,kwargs,error,message",
    [
        ("", {}, ValueError, "the prompt is empty"),
        ([], {}, ValueError, "no chat messages"),
        ([{"content": "hi"}], {}, ValueError, "chat message 0 must be a dict with string 'role' and 'content'"),
        (12, {}, TypeError, "prompt must be a string, chat messages or token ids, got int"),
        (torch.zeros(2, 5, dtype=torch.long), {}, ValueError, "one prompt at a time"),
        (torch.zeros(5), {}, TypeError, "token ids must be an integer tensor"),
        (torch.tensor([10**7]), {}, ValueError, "token ids must lie in"),
        ([5, 10**30], {}, ValueError, "token ids must lie in"),  # beyond int64 too
        ([5, -1], {}, ValueError, "token ids must lie in"),
        ("hi", {"max_new_tokens": -1}, ValueError, "max_new_tokens must be an int >= 0, got -1"),
        ("hi", {"max_new_tokens": 2.5}, ValueError, "max_new_tokens must be an int >= 0, got 2.5"),
        ("hi", {"temperature": float("nan")}, ValueError, "temperature must be a finite number >= 0"),
        ("hi", {"temperature": -1}, ValueError, "temperature must be a finite number >= 0"),
        ("hi", {"seed": "one"}, ValueError, "seed must be an int"),
    ],
)
def test_generate_rejects_bad_input(llm, prompt, kwargs, error, message):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        llm.generate(prompt, **kwargs)
    with pytest.raises(error, match=re.escape(message)):  # the stream says the same, on its first piece
        next(llm.stream(prompt, **kwargs))


@pytest.mark.parametrize(
    "prompts,error,message",
    [
        (["hi", ""], ValueError, "prompt 1 of the batch's 2: the prompt is empty"),
        (["hi", "there", 12], TypeError, "prompt 2 of the batch's 3: prompt must be a string"),
    ],
)
def test_a_bad_prompt_in_a_batch_is_named(llm, prompts, error, message):
    with pytest.raises(error, match=re.escape(message)):
        llm.generate(prompts, max_new_tokens=2, progress=False)


def test_token_ids_as_a_list_of_ints_are_one_prompt(llm):
    ids = llm.tokenizer("The pass key is 123.").input_ids  # a list of ints, as a tokenizer gives them
    assert isinstance(ids, list) and len(ids) > 1
    as_tensor = llm.generate(torch.tensor(ids), max_new_tokens=3, progress=False).token_ids
    assert llm.generate(ids, max_new_tokens=3, progress=False).token_ids == as_tensor  # one prompt, not a batch
    batch = llm.generate([ids, tuple(ids)], max_new_tokens=3, progress=False)
    assert [r.token_ids for r in batch] == [as_tensor, as_tensor]
    assert "".join(llm.stream(ids, 3, progress=False)) == llm.tokenizer.decode(as_tensor, skip_special_tokens=True)


def test_a_huge_max_new_tokens_reserves_no_more_than_the_model_s_context(llm):
    from engine.prefill import RESERVED_NEW_TOKENS, sized_for

    trained = llm.model.config.max_position_embeddings
    assert sized_for(llm.model, 100, 50) == 150  # a bound within the context: sized exactly
    assert sized_for(llm.model, 100, 10**12) == trained
    assert sized_for(llm.model, trained + 10, 10**12) == trained + 10 + RESERVED_NEW_TOKENS
    assert next(llm.stream("The pass key is 123.", 10**12, progress=False))  # "until the end": no huge allocation


def test_buffers_too_large_to_allocate_are_named_by_their_fields(llm):
    too_many = MAX_COUNT  # tokens: terabytes, beyond what any allocator gives
    cache = HybridCache(llm.model, OffloadConfig(device="cpu", block_size=too_many))
    with pytest.raises(ValueError, match="n_sink \\+ window = .* block_size = .* could not be allocated"):
        llm.model(torch.arange(1, 9).unsqueeze(0), cache=cache)
    engine = HybridLLM(llm.model, llm.tokenizer, OffloadConfig(device="cpu", block_size=too_many))
    with pytest.raises(ValueError, match="block_size = .* could not be allocated"):  # a block is kept whole
        engine.generate("The pass key is 123.", max_new_tokens=1, progress=False)


@pytest.mark.parametrize("field", ["window", "n_sink"])
def test_a_resident_set_without_a_length_takes_the_slots_of_its_first_chunk(llm, field):
    cache = HybridCache(llm.model, OffloadConfig(device="cpu", **{field: MAX_COUNT}))  # terabytes, were it all taken
    with torch.no_grad():
        llm.model(torch.arange(1, 9).unsqueeze(0), cache=cache)
        assert cache.layers[0].resident_k.shape[1] == 8
        llm.model(torch.tensor([[9]]), cache=cache)
    assert cache.layers[0].resident_k.shape[1] == 16 and cache.get_seq_length() == 9  # grown twofold


@pytest.mark.parametrize("field", ["window", "n_sink"])
def test_a_resident_set_longer_than_the_generation_takes_its_slots_alone(llm, field):
    engine = HybridLLM(llm.model, llm.tokenizer, OffloadConfig(device="cpu", **{field: MAX_COUNT}))
    prompt = "The pass key is 123. " * 4
    result = engine.generate(prompt, max_new_tokens=3, progress=False)
    config, n = llm.model.config, len(llm.tokenizer(prompt).input_ids) + 3
    D = config.hidden_size // config.num_attention_heads
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * D * 4  # K and V, fp32
    assert result.report.device_bytes["resident_kv"] == n * per_token
    assert result.token_ids == llm.generate(prompt, max_new_tokens=3, progress=False).token_ids  # all resident


def test_leave_and_more_must_be_functions(llm):
    with pytest.raises(TypeError, match="leave must be a function"):
        llm.generate("hi", 2, leave=True, progress=False)
    with pytest.raises(TypeError, match="leave must be a function"):
        next(llm.stream("hi", 2, leave=1, progress=False))
    with pytest.raises(TypeError, match="leave must be a function"):
        next(llm.stream_batch(["hi"], leave="yes", progress=False))
    with pytest.raises(TypeError, match="leave must be a function"):
        llm.prefix("a document", leave=0, progress=False)
    with pytest.raises(TypeError, match="more must be a function"):
        next(llm.stream_batch(["hi"], more=[("there", None)], progress=False))


def test_stream_takes_one_prompt_and_says_so_of_a_list_of_them(llm):
    with pytest.raises(ValueError, match="stream decodes one prompt; a list of prompts is a batch"):
        next(llm.stream(["hi", "there"], 2))


def test_hybrid_llm_rejects_a_bad_offload_tokenizer_and_dtype(llm):
    with pytest.raises(TypeError, match="offload must be an OffloadConfig .* got str"):
        HybridLLM(llm.model, llm.tokenizer, offload="tight")
    with pytest.raises(TypeError, match="tokenizer must be the model's tokenizer .* got NoneType"):
        HybridLLM(llm.model, None)
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        HybridLLM.from_pretrained("smollm2-135m", dtype="half")
    with pytest.raises(FileNotFoundError, match="model not found: /no/such/model"):
        HybridLLM.from_pretrained("/no/such/model")


@pytest.mark.parametrize(
    "args,kwargs,error,message",
    [
        (("llama",), {}, TypeError, "HybridCache needs a transformers model or its config, got str"),
        ((None,), {}, TypeError, "got NoneType"),
        ((), {"offload": {"window": 3}}, TypeError, "offload must be an OffloadConfig"),
        ((), {"max_length": -1}, ValueError, "max_length must be an int >= 0"),
    ],
)
def test_hybrid_cache_rejects_bad_input(tiny_model, args, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        HybridCache(*(args or (tiny_model,)), **kwargs)


@pytest.mark.parametrize(
    "args,error,message",
    [
        (("llama-3-8b", 0), ValueError, "context_len must be a positive int, got 0"),
        (("llama-3-8b", 2.5), ValueError, "context_len must be a positive int, got 2.5"),
        ((12, 100), ValueError, "the model must be a preset name, a dict or a transformers config"),
        (({"num_hidden_layers": 2}, 100), ValueError, "num_attention_heads"),
        (("llama-3-8b", 100, {"window": 1}), TypeError, "cfg must be an OffloadConfig"),
        (("llama-3-8b", 100, None, -5), ValueError, "gpu_budget_bytes must be a positive number"),
    ],
)
def test_plan_memory_rejects_bad_input(args, error, message):
    with pytest.raises(error, match=re.escape(message)):
        plan_memory(*args)


SHAPE = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "intermediate_size": 128}


@pytest.mark.parametrize(
    "plan,message",
    [  # each failed in torch's, min()'s or Python's own words, or (0 KV heads) planned as many as query heads
        (lambda: plan_memory("llama-3-8b", 100, weight_dtype=torch.int8), "weight_dtype must be a floating-point"),
        (lambda: plan_memory("llama-3-8b", 100, weight_dtype="bfloat16"), "weight_dtype must be a floating-point"),
        (lambda: largest_batch("llama-3-8b", 100, None, None), "largest_batch needs a budget"),
        (lambda: full_attention_batch("llama-3-8b", 0, 2**34), "context_len must be a positive int, got 0"),
        (lambda: full_attention_batch("llama-3-8b", 100, None), "full_attention_batch needs gpu_budget_bytes"),
        (lambda: plan_memory({**SHAPE, "vocab_size": 100, "num_key_value_heads": 0}, 100), "num_key_value_heads"),
    ],
)
def test_the_plan_s_helpers_name_what_is_wrong(plan, message):
    with pytest.raises(ValueError, match=message):
        plan()


def test_generate_warns_where_the_prompt_runs_past_the_models_context(llm, caplog):
    """Past max_position_embeddings the engine attends as asked, but the model was not trained
    there: one warning naming the positions, and the way to stretch the context."""
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    trained = llm.model.config.max_position_embeddings
    llm.model.config.max_position_embeddings = 44
    try:
        with caplog.at_level(logging.WARNING, logger="engine.batch_run"):
            llm.generate(ids, max_new_tokens=5, progress=False)  # positions 0..43: the last token is not fed back
            assert not caplog.records
            llm.generate(ids, max_new_tokens=6, progress=False)
    finally:
        llm.model.config.max_position_embeddings = trained
    (record,) = caplog.records
    message = record.getMessage()
    assert "40 tokens and 6 new tokens take the model to 45 positions, past the 44" in message
    assert "rope_scale" in message
