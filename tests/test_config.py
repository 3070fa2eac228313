import dataclasses
import math
import re
import warnings

import pytest
import torch

from engine import HybridCache, OffloadConfig, plan_memory
from engine.config import (
    BUDGETS,
    CANDIDATE_SOURCES,
    HOST_DTYPES,
    KEY_INDEXES,
    LANDMARKS,
    MAX_COUNT,
    MAX_WIDENING,
    PRESETS,
    SECTIONS,
)
from engine.plan import MODEL_PRESETS, ModelShape
from tests.conftest import tiny_llama


def test_defaults_are_valid_and_frozen():
    cfg = OffloadConfig()
    assert cfg.resident_tokens == cfg.n_sink + cfg.window
    with pytest.raises(AttributeError):
        cfg.window = 3


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(window=0), "window must be at least 1"),
        (dict(window=-5), "window must be a non-negative int"),
        (dict(block_size=0), "block_size must be at least 1"),
        (dict(n_sink=0), "n_sink must be at least 1"),
        (dict(top_k=2.5), "top_k must be a non-negative int"),
        (dict(key_index="lsh"), "key_index must be one of flat, ivf, hnsw, graph, qq"),
        (dict(candidates_from="hybrid"), "candidates_from must be one of keys, blocks, both"),
        (dict(landmark="median"), "landmark must be one of mean, minmax"),
        (dict(host_dtype="int8"), "host_dtype must be one of"),
        (dict(candidates_from="keys", budget="fixed", top_k=0), "top_k must be >= 1"),
        (dict(budget="some"), "budget must be one of adaptive, fixed"),
        (dict(candidates=0), "candidates must be >= 1"),
        (dict(min_prob=-0.1), "min_prob must lie in"),
        (dict(min_prob="high"), "min_prob must be a number"),
        (dict(min_ratio=-1.0), "min_ratio must be a finite number >= 0"),
        (dict(min_ratio=True), "min_ratio must be a finite number >= 0"),
        (dict(min_ratio=float("nan")), "min_ratio must be a finite number >= 0"),  # read as 0 before
        (dict(budget="fixed", min_prob="high"), "min_prob must be a number"),  # a wider run divides it
        (dict(max_build_queries=0), "key_index 'qq' builds from prefill queries: max_build_queries must be >= 1"),
        (dict(device="meta"), "device must be auto, cpu, cuda or cuda:N"),
        (dict(sketch_rank=-1), "sketch_rank must be a non-negative int"),
        (dict(neighbours=-1), "neighbours must be a non-negative int"),
        (dict(estimate="yes"), "estimate must be True or False"),
        (dict(recheck_margin=-0.1), "recheck_margin must be a finite number >= 0"),
        (dict(recheck_margin=float("nan")), "recheck_margin must be a finite number >= 0"),
        (dict(recheck_margin=float("inf")), "recheck_margin must be a finite number >= 0"),
        (dict(recheck_margin=True), "recheck_margin must be a finite number >= 0"),
        (dict(recheck_share=1.5), "recheck_share must lie in \\[0, 1\\]"),
        (dict(recheck_share=None), "recheck_share must lie in \\[0, 1\\]"),
        (dict(recheck_work=-1), "recheck_work must be a non-negative int"),
        (dict(grow_from=-1), "grow_from must be a non-negative int"),
        (dict(candidates_from="blocks", n_blocks=0), "n_blocks must be >= 1"),
        (dict(device="gpu0"), "not a torch device"),
        (dict(index_params=[1]), "index_params must be a dict"),
        (dict(host_threads=-1), "host_threads"),
        (dict(block_frac=0), "block_frac must lie in"),
        (dict(block_frac=1.5), "block_frac must lie in"),
        (dict(block_frac=True), "block_frac must lie in"),
        # past these the counts a wider run multiplies overflowed int64, and the kernel's threads its C int
        (dict(top_k=2**62), "top_k must be a non-negative int below 2\\*\\*31"),
        (dict(candidates=2**62), "candidates must be a non-negative int below 2\\*\\*31"),
        (dict(host_threads=2**31), "host_threads must be a non-negative int below 2\\*\\*31"),
        # a torch.device passed here and failed in from_pretrained; None gave torch's own TypeError
        (dict(device=torch.device("cpu")), "device must be a device's name"),
        (dict(device=None), "device must be a device's name"),
    ],
)
def test_invalid_values_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        OffloadConfig(**changes)


def test_the_widest_run_again_stops_at_max_widening():
    """A wider run's counts are the selection's times its factor: past MAX_WIDENING (which reads every token
    already) they overflowed int64; a run as wide as the one before is not run again."""
    assert OffloadConfig(recheck_widen=3.0, recheck_wider_runs=3).wider_factors == [3.0, 9.0, 27.0]
    assert OffloadConfig(recheck_widen=1e300, recheck_wider_runs=2).wider_factors == [MAX_WIDENING]
    assert OffloadConfig(recheck_widen=1e5, recheck_wider_runs=3).wider_factors == [1e5, MAX_WIDENING]
    widest = OffloadConfig().widened(OffloadConfig(recheck_widen=1e300).wider_factors[-1])
    assert widest.candidates == widest.n_blocks == widest.top_k == MAX_COUNT  # no int64 overflow downstream


def test_index_params_the_key_index_does_not_take_are_refused_before_a_prefill():
    model = tiny_llama()
    refused = [("qq", {"bogus": 1}), ("hnsw", {"efx": 5}), ("flat", {"m_keys": 4})]  # names they do not know
    refused += [("flat", {"dim": 16}), ("qq", {"device": "cpu"})]  # names the engine gives them itself
    refused += [("hnsw", {"M": 1}), ("qq", {"m_keys": 0})]  # values they refuse
    for key_index, params in refused:
        with pytest.raises(ValueError, match=f"do not fit the key index '{key_index}'"):
            HybridCache(model, OffloadConfig(key_index=key_index, index_params=params), progress=False)
    HybridCache(model, OffloadConfig(index_params={"m_keys": 32}), progress=False)  # what qq takes


def test_from_pretrained_refuses_index_params_before_the_weights_load(monkeypatch):
    import transformers

    from engine.api import HybridLLM

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match="do not fit the key index 'qq': m_keys must be positive"):
        HybridLLM.from_pretrained(offload=OffloadConfig(index_params={"m_keys": -64}))


def test_blocks_per_step_is_a_share_of_the_host_blocks_with_a_cap():
    cfg = OffloadConfig(n_blocks=64, block_frac=0.04)
    assert cfg.blocks_per_step(1) == 1
    assert cfg.blocks_per_step(500) == 20
    assert cfg.blocks_per_step(100_000) == 64


def test_an_exact_run_spans_the_positions_its_work_allows_within_the_window():
    assert OffloadConfig(window=256).exact_span(131_072) == 16  # the default's work: 16 positions at 131K
    assert OffloadConfig(window=256).exact_span(8192) == 256  # a window's worth below 8K
    assert OffloadConfig(window=64, recheck_work=1000).exact_span(100) == 10
    assert OffloadConfig(window=64, recheck_work=1000).exact_span(10**6) == 1  # at least one
    assert OffloadConfig(window=64, recheck_work=0).exact_span(10**9) == 64  # 0: up to the window


def test_default_takes_its_full_share_of_blocks_from_4k_tokens_and_the_fixed_presets_keep_4_percent():
    # 4,096 tokens less the resident ones are 120 host blocks of 32; 131,072 tokens, about 4,088
    default = OffloadConfig()
    assert [default.blocks_per_step(n) for n in (56, 120, 4088)] == [5, 8, 8]
    for name in ("fixed", "block"):
        assert OffloadConfig.preset(name).blocks_per_step(120) == 5  # the earlier defaults' 4%


def test_an_adaptive_budget_grows_with_the_context_past_grow_from():
    cfg = OffloadConfig(grow_from=4096)
    assert cfg.growth(2000) == cfg.growth(4096) == 1.0 and cfg.growth(16384) == 4.0
    assert cfg.replace(grow_from=0).growth(131_072) == 1.0  # the same counts at every length
    assert cfg.replace(budget="fixed").growth(16384) == 1.0  # a fixed budget is fixed
    # blocks: n_blocks x growth, still within block_frac of the host blocks
    assert [cfg.blocks_per_step(b, n) for b, n in ((120, 4096), (504, 16384), (120, 16384))] == [8, 32, 10]


def test_a_config_holds_its_own_index_params():
    # replace() and preset() handed on one dict: a change to one config's changed every preset after it
    mine = {"m_keys": 32, "block": {"frac": 0.5}}
    cfg = OffloadConfig(index_params=mine)
    mine["m_keys"], mine["block"]["frac"] = 0, 1.0
    assert cfg.index_params == {"m_keys": 32, "block": {"frac": 0.5}}
    preset = OffloadConfig.preset("default")
    preset.index_params["m_keys"] = 0
    assert "m_keys" not in OffloadConfig.preset("default").index_params
    assert "m_keys" not in PRESETS["default"].index_params
    replaced = cfg.replace(top_k=5)
    replaced.index_params["m_keys"] = 1
    assert cfg.index_params["m_keys"] == 32


def test_presets():
    assert set(PRESETS) >= {"default", "tight", "wide"}
    assert OffloadConfig.preset("tight", top_k=7).top_k == 7
    with pytest.raises(ValueError, match="unknown preset 'huge'; presets: default"):
        OffloadConfig.preset("huge")


def test_fields_are_keywords_only():
    """The fields are laid out by section, not in their historical order: a positional value is refused."""
    with pytest.raises(TypeError):
        OffloadConfig(4)


def test_every_field_has_a_section_and_a_description():
    for f in dataclasses.fields(OffloadConfig):
        assert f.metadata.get("section") in SECTIONS, f"OffloadConfig.{f.name} has no section"
        assert f.metadata.get("help", "").strip(), f"OffloadConfig.{f.name} has no description"


def test_fields_are_declared_section_by_section():
    described = OffloadConfig.described()
    assert [item.name for item in described] == [f.name for f in dataclasses.fields(OffloadConfig)]
    sections = [item.section for item in described]
    assert sorted(sections, key=list(SECTIONS).index) == sections  # each section in one run, in SECTIONS' order
    by_section = {s: [item.name for item in described if item.section == s] for s in SECTIONS}
    assert by_section["resident"] == ["n_sink", "window"]
    assert by_section["correction"] == [
        "estimate",
        "recheck_margin",
        "recheck_work",
        "recheck_share",
        "recheck_read_limit",
        "recheck_credit_steps",
        "recheck_widen",
        "recheck_wider_runs",
        "recheck_fit_wider",
        "recheck_wide_margin",
    ]
    assert by_section["sources"][:2] == ["candidates_from", "key_index"]


def test_choices_and_types_come_from_the_annotations():
    described = {item.name: item for item in OffloadConfig.described()}
    assert described["candidates_from"].choices == CANDIDATE_SOURCES == ("keys", "blocks", "both")
    assert described["key_index"].choices == KEY_INDEXES == ("flat", "ivf", "hnsw", "graph", "qq")
    assert described["budget"].choices == BUDGETS and described["landmark"].choices == LANDMARKS
    assert described["host_dtype"].choices == ("auto", *HOST_DTYPES)
    assert (described["window"].type, described["window"].choices) == (int, None)
    assert described["min_prob"].type is float and described["estimate"].type is bool
    assert described["index_params"].type is dict and described["index_params"].default == {}
    assert all(item.default == getattr(OffloadConfig(), item.name) for item in described.values())


def test_markdown_table_has_one_row_per_field_in_section_order():
    lines = OffloadConfig.markdown_table().splitlines()
    assert lines[:2] == ["| section | field | default | description |", "| --- | --- | --- | --- |"]
    rows = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[2:]]
    fields = dataclasses.fields(OffloadConfig)
    assert [row[1] for row in rows] == [f"`{f.name}`" for f in fields]
    assert [row[0] for row in rows] == [f.metadata["section"] for f in fields]
    assert [row[3] for row in rows] == [f.metadata["help"].replace("|", "\\|") for f in fields]
    defaults = {row[1]: row[2] for row in rows}
    assert (defaults["`window`"], defaults["`candidates_from`"], defaults["`estimate`"]) == ("256", "`both`", "`True`")


@pytest.mark.parametrize(
    "old,new",
    [
        (dict(mode="ann"), dict(candidates_from="keys")),
        (dict(mode="block"), dict(candidates_from="blocks")),
        (dict(mode="hybrid"), dict(candidates_from="both")),
        (dict(method="graph"), dict(key_index="graph")),
        (dict(mode="block", method="flat"), dict(candidates_from="blocks", key_index="flat")),
    ],
    ids=str,
)
def test_old_field_names_give_the_new_fields_with_a_warning(old, new):
    made = {
        "init": lambda **kw: OffloadConfig(window=64, **kw),
        "preset": lambda **kw: OffloadConfig.preset("fixed", **kw),
        "replace": lambda **kw: OffloadConfig(window=64).replace(**kw),
    }
    for how, make in made.items():
        with pytest.warns(DeprecationWarning) as caught:
            cfg = make(**old)
        assert cfg == make(**new), how
        assert [getattr(cfg, name) for name in new] == list(new.values()), how
        messages = " ".join(str(w.message) for w in caught)
        assert all(f"write {name}=" in messages for name in new), messages
        assert {w.filename for w in caught} == {__file__}, how  # the warning points at the caller's line


def test_reading_the_old_names_warns_and_gives_the_old_values():
    cfg = OffloadConfig(candidates_from="keys", key_index="graph")
    with pytest.warns(DeprecationWarning, match="read candidates_from"):
        assert cfg.mode == "ann"
    with pytest.warns(DeprecationWarning, match="read key_index"):
        assert cfg.method == "graph"
    with pytest.warns(DeprecationWarning):
        assert [OffloadConfig.preset(name).mode for name in ("default", "block")] == ["hybrid", "block"]


def test_the_new_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = OffloadConfig.preset("tight", candidates_from="keys", key_index="flat").replace(candidates_from="both")
    assert (cfg.candidates_from, cfg.key_index, cfg.uses_blocks, cfg.uses_key_index) == ("both", "flat", True, True)
    blocks, keys = OffloadConfig(candidates_from="blocks"), OffloadConfig(candidates_from="keys")
    assert (blocks.uses_blocks, blocks.uses_key_index) == (True, False)
    assert (keys.uses_blocks, keys.uses_key_index) == (False, True)


@pytest.mark.parametrize("how", ["init", "preset", "replace"])
@pytest.mark.parametrize(
    "both,message",
    [
        (dict(mode="block", candidates_from="blocks"), "mode is the old name of candidates_from"),
        (dict(method="flat", key_index="qq"), "method is the old name of key_index"),
    ],
)
def test_old_and_new_spelling_of_one_field_together_are_refused(how, both, message):
    make = {
        "init": lambda **kw: OffloadConfig(**kw),
        "preset": lambda **kw: OffloadConfig.preset("default", **kw),
        "replace": lambda **kw: OffloadConfig().replace(**kw),
    }[how]
    with pytest.raises(TypeError, match=message):
        make(**both)


@pytest.mark.parametrize("preset", ["default", "fixed"])
def test_llama3_8b_at_128k_fits_a_24gb_gpu(preset):
    plan = plan_memory("llama-3-8b", 131072, OffloadConfig.preset(preset, device="cuda"), 24 * 2**30)
    assert plan.fits
    assert plan.device_beside_weights <= 3 * 2**30
    assert 14e9 < plan.device["weights"] < 17e9  # 8.0B parameters in bf16
    # the full KV cache would not fit beside the weights: that is why it lives on the host
    assert plan.host["kv_store"] > 15 * 2**30


def test_a_context_shorter_than_the_resident_set_is_planned_resident():
    plan = plan_memory("llama-3-8b", 100, OffloadConfig(window=128))
    assert plan.host["kv_store"] == 0 and plan.host.get("key_sketch", 0) == 0
    assert plan.device["resident_kv"] > 0
    with pytest.raises(ValueError, match="context_len must be a positive int"):
        plan_memory("llama-3-8b", 0)


def test_unknown_model_preset():
    with pytest.raises(ValueError, match="unknown model preset 'gpt-5'"):
        plan_memory("gpt-5", 10000)


def test_plan_of_a_config_names_a_model_type_the_engine_does_not_run():
    shape = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "intermediate_size": 128}
    shape["vocab_size"] = 256
    assert plan_memory(shape | {"model_type": "qwen2"}, 4096).host["kv_store"] > 0  # a shape, or a type it runs
    assert plan_memory(shape, 4096).host["kv_store"] > 0
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        plan_memory(shape | {"model_type": "gpt2"}, 4096)
    for kv_heads in (3, -2, 2.0):  # no grouping of 4 query heads
        with pytest.raises(ValueError, match="num_key_value_heads must be a positive divisor of num_attention_heads"):
            plan_memory(shape | {"num_key_value_heads": kv_heads}, 4096)
    assert plan_memory(shape | {"num_key_value_heads": 2}, 4096).host["kv_store"] > 0


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_model_preset_parameter_counts(name):
    expected = {
        "llama-3-8b": 8.03e9,
        "llama-3.1-8b": 8.03e9,
        "qwen2.5-7b": 7.62e9,
        "mistral-7b": 7.25e9,
        "smollm2-135m": 134.5e6,
    }[name]
    assert ModelShape.of(name).n_params() == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize(
    "changes",
    [
        dict(candidates_from="blocks"),
        dict(candidates_from="both", budget="fixed"),
        dict(candidates_from="both", budget="fixed", landmark="minmax"),
        dict(candidates_from="both", budget="fixed", landmark="minmax", estimate=False),
        dict(candidates_from="keys", budget="adaptive", sketch_rank=8),
        dict(candidates_from="keys", budget="fixed", estimate=False),
    ],
    ids=str,
)
def test_plan_matches_what_the_cache_allocates(changes):
    """Plan vs bytes actually held on the CPU device after a prefill of the planned length."""
    model = tiny_llama(n_layers=3)
    context = 1000
    cfg = OffloadConfig(n_sink=4, window=60, block_size=16, key_index="flat", **changes)
    plan = plan_memory(model.config, context, cfg, weight_dtype=torch.float32)
    cache = HybridCache(model, cfg, max_length=context)
    ids = torch.randint(0, 97, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    cache.build_indexes()
    held = cache.memory_report()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.device["weights"] == pytest.approx(weights, rel=0.02)
    for where, name in [
        ("device", "resident_kv"),
        ("device", "block_index"),
        ("device", "block_values"),
        ("host", "kv_store"),
        ("host", "key_index"),
        ("host", "key_sketch"),
    ]:
        planned, actual = getattr(plan, where).get(name, 0), held[where].get(name, 0)
        assert planned == pytest.approx(actual, rel=0.05, abs=4096), f"{where} {name}: plan {planned}, held {actual}"


@pytest.mark.parametrize("context", [150, 1000])
def test_plan_of_the_query_lists_counts_the_build_queries_of_every_position(context):
    # it counted those of the host tokens only: below max_build_queries + the resident set, the lists held
    # context / (context - resident) times the plan (2.8x at 100 tokens)
    model = tiny_llama(n_layers=2)
    cfg = OffloadConfig(n_sink=4, window=60, block_size=16)
    plan = plan_memory(model.config, context, cfg, weight_dtype=torch.float32)
    cache = HybridCache(model, cfg, max_length=context)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, context), generator=torch.Generator().manual_seed(0)), cache=cache)
    cache.build_indexes()
    held = cache.memory_report()
    for where, name in [("host", "key_index"), ("device", "query_index")]:
        planned, actual = plan.__dict__[where][name], held[where][name]
        assert planned == pytest.approx(actual, rel=0.05, abs=4096), f"{where} {name}: plan {planned}, held {actual}"


def test_plan_of_a_context_shorter_than_the_resident_set_counts_its_slots_alone():
    model = tiny_llama(n_layers=3)
    cfg = OffloadConfig(n_sink=4, window=500, block_size=16, key_index="flat")
    plan = plan_memory(model.config, 30, cfg, weight_dtype=torch.float32)
    cache = HybridCache(model, cfg, max_length=30)
    with torch.no_grad():
        model(torch.arange(30).unsqueeze(0), cache=cache, use_cache=True)
    assert plan.device["resident_kv"] == cache.memory_report()["device"]["resident_kv"] == 3 * 2 * 2 * 30 * 16 * 4


def test_plan_scales_the_per_sequence_parts_with_the_batch():
    one = plan_memory("llama-3-8b", 32768, OffloadConfig(device="cuda"))
    four = plan_memory("llama-3-8b", 32768, OffloadConfig(device="cuda"), batch=4)
    for part in ("weights", "workspace"):
        assert four.device[part] == one.device[part]  # shared: one model, prefill one sequence at a time
    for part in ("resident_kv", "block_index", "query_index"):
        assert four.device[part] == 4 * one.device[part]
    assert four.host_total == 4 * one.host_total
    with pytest.raises(ValueError, match="batch must be a positive int"):
        plan_memory("llama-3-8b", 32768, batch=0)


def test_largest_batch_fits_and_one_more_does_not():
    from engine.plan import full_attention_batch, largest_batch

    cfg, gpu, host = OffloadConfig(device="cuda"), 24 * 2**30, 100 * 2**30
    most = largest_batch("llama-3-8b", 131072, cfg, gpu, host_budget_bytes=host)
    assert most >= 2
    assert plan_memory("llama-3-8b", 131072, cfg, gpu, batch=most, host_budget_bytes=host).fits
    assert not plan_memory("llama-3-8b", 131072, cfg, gpu, batch=most + 1, host_budget_bytes=host).fits
    assert largest_batch("llama-3-8b", 131072, cfg, gpu) > most  # the host budget was the limit
    assert full_attention_batch("llama-3-8b", 131072, gpu) == 0  # 16 GiB of KV per sequence beside 15 of weights
    assert full_attention_batch("llama-3-8b", 8192, gpu) >= 1
    assert type(full_attention_batch("llama-3-8b", 8192, gpu + 0.5)) is int  # was a float for a float budget
    # an endless budget: largest_batch failed in NaN's words, full_attention_batch gave 0
    for call in (
        lambda: largest_batch("llama-3-8b", 8192, cfg, math.inf),
        lambda: full_attention_batch("llama-3-8b", 8192, math.inf),
        lambda: plan_memory("llama-3-8b", 8192, cfg, gpu, host_budget_bytes=math.inf),
    ):
        with pytest.raises(ValueError, match="must be a positive number of bytes"):
            call()
