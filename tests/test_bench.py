"""The benchmark scripts run in --quick mode on tiny inputs and write the JSON
their readers rely on (schemas only: timings are not tested)."""

import collections
import gc
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from engine import HybridCache, OffloadConfig
from engine.cache.store import HostKV
from engine.decode import estimate
from engine.decode.estimate import block_dots, block_sums
from engine.native import ops
from engine.prefill import prefill

BENCH = Path(__file__).resolve().parents[1] / "bench"


def script(name: str):
    return importlib.import_module(name)


def has_keys(row: dict, keys: set[str]) -> None:
    missing = keys - row.keys()
    assert not missing, f"missing {missing} in {row}"


@pytest.mark.skipif(not ops.HAS_EXT, reason="the kernel benchmark times the C++ extension")
def test_bench_kernel_quick(tmp_path):
    out = tmp_path / "kernel.json"
    script("bench.speed.kernel").main(["--quick", "--json", str(out)])
    cases = json.loads(out.read_text())["cases"]
    expected = {(d, m) for d in ("bf16", "fp16", "fp32") for m in (256, 2048, 8192)}
    assert {(c["dtype"], c["n_ids"]) for c in cases} == expected
    keys = {"dtype", "n_tokens", "n_ids", "ms_cpp", "ms_torch", "speedup", "gathered_gbps", "read_gbps", "max_abs_err"}
    for c in cases:
        has_keys(c, keys)
        assert c["max_abs_err"] < 2e-3


def test_bench_decode_quick(tmp_path, monkeypatch):
    from engine.cache.layer import HybridLayer

    out, decode = tmp_path / "decode.json", script("bench.speed.decode")
    adds, per_block = [], []  # the key index's adds, and those made within each run over a block of steps
    add, time_block = HybridLayer.index_new_keys, decode.time_block

    def counted_add(layer):
        adds.append(layer)
        add(layer)

    def counted_block(*args):
        before = len(adds)
        ms = time_block(*args)
        per_block.append(len(adds) - before)
        return ms

    monkeypatch.setattr(HybridLayer, "index_new_keys", counted_add)
    monkeypatch.setattr(decode, "time_block", counted_block)
    decode.main(["--quick", "--models", "tiny-llama", "--layers", "2", "--contexts", "256", "512", "--json", str(out)])
    cases = json.loads(out.read_text())["cases"]
    # a run over a block of steps makes one add a layer (the 3 timed steps of --quick make none) where there
    # is a key index to add to: the price of the re-checks starts from its mean
    offloading = [c for c in cases if c.get("host_bytes") and c["method"].startswith("hybrid")]
    assert len(per_block) == len(offloading) > 0
    assert all((c.get("attn_ms_per_layer_over_block") is None) == (c not in offloading) for c in cases)
    made = {(c["method"], c["context"]): n for c, n in zip(offloading, per_block)}
    assert made["hybrid-default", 512] == 2 and made["hybrid-block-only", 512] == 0  # (no key index)
    keys = {"model", "method", "context", "decode_ms_per_token", "prefill_s", "device_bytes", "host_bytes"}
    timed = [c for c in cases if "error" not in c]
    assert {c["context"] for c in timed} == {256, 512}
    assert {"hybrid-default", "hybrid-flat", "hybrid-block-only", "full-sdpa"} <= {c["method"] for c in timed}
    assert "hybrid-all-resident" not in {c["method"] for c in cases}  # run only where named
    for c in timed:
        has_keys(c, keys | {"kv_read_frac"})
        assert 0 < c["kv_read_frac"] <= 1 and c["attn_ms_per_layer_mean"] > 0
        assert (c["method"] == "full-sdpa") == (c["host_bytes"] == 0)
        # a near tie's step run again is timed where the configuration re-checks them
        rechecks = c["method"].startswith("hybrid") and "fixed" not in c["method"] and "python" not in c["method"]
        assert (c["rerun_attn_ms_per_layer"] is not None) == rechecks
        if rechecks:  # the step alone and one exact run at the prose rate (at most recheck_work's), each timed
            default = OffloadConfig()
            host = c["context"] - default.n_sink - default.window
            span = min(c["context"], script("bench.common.timing").RECHECK_SPAN, default.exact_span(host))
            assert set(c["rerun_attn_ms_per_layer"]) == {"1", str(span)}
            assert all(ms > 0 for ms in c["rerun_attn_ms_per_layer"].values())
            # the step run wider, then wider still (recheck_wider_runs), each reading more than the one before
            assert len(c["wider_attn_ms_per_layer"]) == 2 and all(ms > 0 for ms in c["wider_attn_ms_per_layer"])
            first, second = c["wider_kv_read_frac"]
            # (on the tiny random model's flat attention the wider still may find no token more to read)
            assert 0 < first <= second, c["wider_kv_read_frac"]
            assert c["attn_ms_per_layer_with_rechecks"] > c["attn_ms_per_layer_over_block"]
            # priced from the mean over a block of steps, not the median nor the mean of --steps fewer than a
            # block (which leave out the key index's adds once a block)
            priced = script("bench.common.timing").with_rechecks(
                c["attn_ms_per_layer_over_block"], c["wider_attn_ms_per_layer"], c["rerun_attn_ms_per_layer"][str(span)]
            )
            assert c["attn_ms_per_layer_with_rechecks"] == pytest.approx(priced, abs=2e-4)
        else:
            assert c["wider_attn_ms_per_layer"] is None and c["attn_ms_per_layer_with_rechecks"] is None
    # the default through the native host call and through the Python selection read the same share
    by = {(c["method"], c["context"]): c for c in timed}
    native, python = by["hybrid-default", 512], by["hybrid-default-python-selection", 512]  # 256: no host store
    assert abs(native["kv_read_frac"] - python["kv_read_frac"]) <= 0.02 * python["kv_read_frac"]
    assert native["wider_kv_read_frac"][0] > native["kv_read_frac"]  # three times the candidates and blocks


def test_rechecks_are_priced_run_by_run_at_the_prose_rates():
    timing = script("bench.common.timing")
    wider_rates, exact_rate = timing.PROSE_WIDER_RATES, timing.PROSE_EXACT_RATE
    assert timing.with_rechecks(10.0, [], 100.0) == pytest.approx(10.0 + exact_rate * 100.0)
    expected = 10.0 + wider_rates[0] * 20.0 + wider_rates[1] * 40.0
    assert timing.with_rechecks(10.0, [20.0, 40.0], 0.0) == pytest.approx(expected)
    with pytest.raises(ValueError, match="3 wider runs timed, rates known for 2"):
        timing.with_rechecks(10.0, [20.0, 40.0, 80.0], 0.0)


def test_bench_throughput_quick(tmp_path, monkeypatch):
    out, fig = tmp_path / "throughput.json", tmp_path / "throughput.png"
    throughput, lengths = script("bench.speed.throughput"), []

    def step(model, cache, B, *args):
        if isinstance(cache, HybridCache):  # each row's length, and the position the step is given
            lengths.append((B, sorted({layer.n_seen for layer in cache.sequence_layers()}), cache.get_seq_length()))
        return real(model, cache, B, *args)

    real = throughput.step
    monkeypatch.setattr(throughput, "step", step)
    throughput.main(["--quick", "--json", str(out), "--plot", str(fig)])
    # every batch size's run starts from the contexts as filled, its rows of one length, each step at the
    # position after them (batch 2's first row had grown by batch 1's steps, its steps at batch 1's positions)
    assert [(B, rows) for B, rows, _ in lengths[:1] + lengths[4:5]] == [(1, [512]), (2, [512])]
    assert all(len(rows) == 1 and rows[0] == at for _, rows, at in lengths)
    cases = json.loads(out.read_text())["cases"]
    assert {(c["batch"], c["method"]) for c in cases} == {(b, m) for b in (1, 2) for m in ("hybrid", "full-sdpa")}
    keys = {"model", "context", "attn_tokens_per_s", "model_tokens_per_s", "device_bytes", "host_bytes"}
    for c in cases:
        has_keys(c, keys)
        assert c["attn_tokens_per_s"] > 0 and c["model_tokens_per_s"] > 0
    hybrid = {c["batch"]: c for c in cases if c["method"] == "hybrid"}
    assert hybrid[2]["host_bytes"] > hybrid[1]["host_bytes"] > 0  # each sequence its own host store
    assert fig.stat().st_size > 0
    text = script("bench.tables").throughput(json.loads(out.read_text()))
    assert "engine / full" in text and "against its batch 1: batch 2:" in text


def test_bench_ann_quick(tmp_path, monkeypatch):
    """On a small synthetic capture (random queries and keys of two layers)."""
    rng = np.random.default_rng(0)
    n_tokens, hq, hkv, dim = 700, 4, 2, 16
    capture = {"layers": np.array([5, 17]), "n_tokens": np.array(n_tokens), "prefill_s_per_layer": np.array(1.0)}
    for layer in (5, 17):
        capture[f"q_{layer}"] = rng.standard_normal((hq, n_tokens, dim)).astype(np.float16)
        capture[f"k_{layer}"] = rng.standard_normal((hkv, n_tokens, dim)).astype(np.float16)
    path = tmp_path / "capture.npz"
    np.savez(path, **capture)
    out = tmp_path / "ann.json"
    argv = ["bench_ann", "--quick", "--capture", str(path), "--n-keys", "600", "--json", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    script("bench.evals.ann_recall").main()
    rows = json.loads(out.read_text())["rows"]
    assert {r["index"].split("-")[0] for r in rows} >= {"flat", "ivf", "hnsw", "graph", "qq", "block", "hybrid"}
    keys = {"index", "layer", "kv_head", "n_keys", "k", "recall", "scanned_frac", "build_s", "search_ms", "params"}
    for r in rows:
        has_keys(r, keys)
        assert 0 <= r["recall"] <= 1
    assert all(r["recall"] == 1.0 for r in rows if r["index"] == "flat")


def test_eval_accuracy_quick(tmp_path, bundled_tokenizer, monkeypatch):
    """On a tiny random-weight Llama that uses the bundled model's tokenizer; `--first`
    starts the prompts' seeds where an earlier run of the cell stopped."""
    from tests.conftest import tiny_llama

    model_dir = tmp_path / "tiny"
    tiny_llama(vocab=len(bundled_tokenizer)).save_pretrained(model_dir)
    bundled_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "eval.json"
    module, tasks, seeds = script("bench.evals.accuracy"), script("bench.evals.tasks"), []
    real_make_sample = tasks.make_sample

    def make_sample(*args, seed, **kwargs):
        seeds.append(seed)
        return real_make_sample(*args, seed=seed, **kwargs)

    monkeypatch.setattr(tasks, "make_sample", make_sample)  # the prompts of a cell are made in tasks.cell_sample
    oracle_caches, answer_with = [], module.answer_with

    def recorded(*args):
        oracle_caches.append(args[-1])
        return answer_with(*args)

    monkeypatch.setattr(module, "answer_with", recorded)
    module.main(["--quick", "--first", "5", "--model", str(model_dir), "--contexts", "512", "--json", str(out)])
    assert seeds == [5, 6, 5, 6]  # two prompts of each task
    # each oracle keeps its configuration's resident set (fixed-noest's window 128 took the default's 256: its share
    # then counted fewer host tokens, and 128 more were read exactly beside them)
    resident = {(c.n_sink, c.window) for c in oracle_caches}
    assert (
        resident == {(module.CONFIGS[n].n_sink, module.CONFIGS[n].window) for n in ("default", "fixed-noest")}
        and len(resident) == 2
    )
    rows = json.loads(out.read_text())["rows"]
    engines = ("default", "fixed-noest")
    methods = {"full", *engines, *(f"oracle{e}@{name}" for name in engines for e in ("", "+est"))}
    assert {(r["task"], r["method"]) for r in rows} == {(t, m) for t in ("passkey", "niah_single") for m in methods}
    for r in rows:
        has_keys(r, {"task", "context", "method", "n", "accuracy", "accuracy_ci", "agreement", "kv_read_frac"})
        assert r["n"] == 2 and r["context"] == 512 and r["first"] == 5
        assert r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1]
        assert len(r["scores"]) == 2 and sum(r["scores"]) / 2 == pytest.approx(r["accuracy"], abs=1e-4)
        if r["method"] == "full":
            assert r["agreement"] == 1.0 and r["kv_read_frac"] == 1.0
        else:  # steps re-checked at near ties (frequent in a random model) read every host token
            assert 0 < r["selected_frac"] < 1 and r["kv_read_frac"] >= r["selected_frac"]
            assert (r["kv_read_frac"] > r["selected_frac"]) == (r["rechecked_frac"] > 0 or r["widened"] > 0)
        assert len(r["read_over_selected"]) == 2 and max(r["read_over_selected"]) == r["max_read_over_selected"] >= 1
    read = {(r["task"], r["method"]): r["selected_frac"] for r in rows}
    for task in ("passkey", "niah_single"):  # each oracle selects about what its engine configuration selected
        for name in engines:
            for oracle in (f"oracle@{name}", f"oracle+est@{name}"):
                assert read[(task, oracle)] == pytest.approx(read[(task, name)], rel=0.1, abs=0.01)


def test_eval_accuracy_runs_the_peers_at_the_share_the_engine_read(tmp_path, bundled_tokenizer):
    from tests.conftest import tiny_llama

    model_dir = tmp_path / "tiny"
    tiny_llama(vocab=len(bundled_tokenizer)).save_pretrained(model_dir)
    bundled_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "eval.json"
    argv = ["--quick", "--model", str(model_dir), "--contexts", "512", "--tasks", "passkey", "--no-oracle"]
    script("bench.evals.accuracy").main(
        argv + ["--configs", "default", "--peers", "streaming", "snapkv", "quest", "--json", str(out)]
    )
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"full", "default", "streaming@default", "snapkv@default", "quest@default"}
    assert result["config"]["peers"] == ["streaming", "snapkv", "quest"]
    for peer in ("streaming", "snapkv", "quest"):
        row = rows[f"{peer}@default"]
        assert row["rechecks"] == 0 and row["kv_read_frac"] == row["selected_frac"]  # no re-check, no estimate
        # given the share the default read, its re-checks included, at most every host token (Quest rounds
        # up to whole pages)
        share = min(1.0, rows["default"]["kv_read_frac"])
        assert row["selected_frac"] == pytest.approx(share, rel=0.15, abs=0.02)


def test_report_sets_the_engine_against_each_peer_prompt_by_prompt():
    base = {"task": "niah_single", "context": 4096, "n": 4, "attn_rel_err": None}

    def row(method, scores, read):
        acc = sum(scores) / len(scores)
        return {
            **base,
            "method": method,
            "accuracy": acc,
            "accuracy_ci": [0, 1],
            "scores": scores,
            "kv_read_frac": read,
        }

    rows = [row("full", [1, 1, 1, 0], 1.0), row("default", [1, 1, 1, 0], 0.05)]
    rows += [row("streaming@default", [0, 0, 0, 0], 0.05), row("quest@default", [1, 1, 0, 1], 0.05)]
    text = script("bench.tables").accuracy({"rows": rows})
    # default minus streaming: 1, 1, 1, 0 (mean 0.75, sd 0.5, t(3) 3.182 -> half width 0.7955): level on 4 prompts
    assert "| niah_single | 4096 | default | streaming | 5.0% | 0.0 | +75.0 [-4.5, +154.6] | level |" in text
    assert "| niah_single | 4096 | default | quest | 5.0% | 75.0 | +0.0 [-129.9, +129.9] | level |" in text
    assert "streaming@default: niah_single" not in text  # no target checks on the peers
    many = [row("full", [1] * 8, 1.0), row("default", [1] * 8, 0.05), row("streaming@default", [0] * 8, 0.05)]
    for r in many:
        r["n"] = 8
    assert "| default | streaming | 5.0% | 0.0 | +100.0 [+100.0, +100.0] | ahead |" in script("bench.tables").accuracy(
        {"rows": many}
    )


def test_report_pairs_accuracy_prompt_by_prompt():
    """With per-prompt scores the report adds each method's paired difference from full
    attention (mean, t interval, prompts better and worse, and of the prompts full attention
    scores on, those the method scores as much on); without them it adds nothing."""
    base = {"task": "niah_single", "context": 2048, "n": 4, "kv_read_frac": 1.0, "attn_rel_err": 0.0}
    full = {**base, "method": "full", "accuracy": 0.75, "accuracy_ci": [0.3, 0.95], "scores": [1, 0, 1, 1]}
    engine = {**base, "method": "default", "accuracy": 0.25, "accuracy_ci": [0.05, 0.7], "scores": [1, 0, 0, 0]}
    text = script("bench.tables").accuracy({"rows": [full, engine]})
    # differences 0, 0, -1, -1: mean -0.5, sd 0.5774, t(3) 3.182 -> half width 0.9186
    assert "| niah_single | 2048 | default | -50.0 [-141.9, +41.9] | 0 | 2 | 1 of 3 |" in text
    unpaired = [{k: v for k, v in r.items() if k != "scores"} for r in (full, engine)]
    assert "paired" not in script("bench.tables").accuracy({"rows": unpaired})


def test_ruler_s_full_attention_decodes_by_the_engine_s_greedy_rule(bundled_tokenizer):
    # lm-eval's hf model generates through transformers, which applied the model's repetition penalty
    from engine.api import HybridLLM
    from tests.conftest import tiny_llama

    model = tiny_llama(vocab=len(bundled_tokenizer), n_heads=4, head_dim=16, tie_word_embeddings=True)
    model.generation_config.repetition_penalty = 1.3
    llm = HybridLLM(model, bundled_tokenizer, OffloadConfig(device="cpu"))
    ids = llm.encode("Once upon a time there was a")
    reference = llm.generate_full_attention("Once upon a time there was a", 12)
    script("bench.evals.ruler").plain_greedy(model)
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=12, attention_mask=torch.ones_like(ids))
    assert bundled_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == reference
    assert model.generation_config.eos_token_id is not None


def test_report_renders_ruler_runs_as_accuracy_tables():
    """bench.evals.ruler's rows (a file per task) in the accuracy tables: lengths as contexts,
    paired per document, no attention-error column where none was measured."""

    def row(task, method, scores, read=None):
        mean = sum(scores) / len(scores)
        r = {"task": task, "metric": "4096", "method": method, "n": len(scores), "score": mean, "low": 0.0}
        return r | {"high": 0.9, "scores": scores} | ({} if read is None else {"read_frac": read})

    vt = {"rows": [row("ruler_vt", "full", [1, 1, 0.5, 0]), row("ruler_vt", "default", [1, 0.5, 0.5, 0], 0.04)]}
    cwe = {"rows": [row("ruler_cwe", "full", [0, 0, 0, 0]), row("ruler_cwe", "default", [0, 0, 0, 0], 0.03)]}
    niah = [row("niah", "full", [1] * 48 + [0] * 2), row("niah", "default", [1] * 47 + [0] * 3, 0.02)]
    text = script("bench.tables").ruler([vt, cwe, {"rows": niah}])
    assert "| ruler_vt | 4096 | 4 | 62.5 [0, 90] | 50.0 (-12.5) | 4.0% |" in text
    assert "niah at" not in text  # 96% - 94% is 2 points: within the target, whatever floats say
    assert "| ruler_cwe | 4096 | 4 | 0.0 [0, 90] | 0.0 (+0.0) | 3.0% |" in text
    assert "default: ruler_vt at 4096 is 12.50 points below full" in text and "ruler_cwe at" not in text
    assert "| ruler_vt | 4096 | default | -12.5 [-52.3, +27.3] | 0 | 1 | 2 of 3 |" in text
    assert "attn err" not in text


@pytest.mark.parametrize("argv", [["--n", "0"], ["--first", "-1"]])
def test_eval_accuracy_rejects_bad_counts(argv, capsys):
    with pytest.raises(SystemExit) as e:
        script("bench.evals.accuracy").main(argv)
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err


def passkey_run(method: str, first: int, scores: list[float]) -> dict:
    """An eval_accuracy result row of a 2K passkey cell over seeds first..first + len(scores) - 1."""
    return {
        "task": "passkey",
        "context": 2048,
        "method": method,
        "first": first,
        "n": len(scores),
        "accuracy": sum(scores) / len(scores),
        "accuracy_ci": [0.0, 1.0],
        "scores": scores,
        "agreement": None,
        "attn_rel_err": 0.0 if method == "full" else 0.1 * (1 + first),
        "kv_read_frac": 0.04,
    }


def test_report_pools_runs_over_other_seeds():
    """Two runs of a cell over disjoint seeds count as one cell of their prompts together, in
    the accuracy table and the paired differences; runs that share seeds are refused unless they
    repeat the same scores (full attention beside each configuration run apart), which count once."""
    tables = script("bench.tables")
    row = passkey_run
    rows = [row("full", 0, [1, 1]), row("default", 0, [1, 0]), row("full", 2, [1, 0]), row("default", 2, [0, 0])]
    pooled = {r["method"]: r for r in tables.pool(rows)}
    assert pooled["default"]["n"] == 4 and pooled["default"]["scores"] == [1, 0, 0, 0]
    assert pooled["default"]["accuracy"] == 0.25 and pooled["full"]["accuracy"] == 0.75
    assert pooled["default"]["attn_rel_err"] == pytest.approx(0.2)  # 0.1 and 0.3, two prompts each
    text = tables.accuracy({"rows": rows})
    assert "| passkey | 2048 | 4 | 75.0 [" in text and "25.0 (-50.0)" in text and "n = 4 prompts" in text
    assert "| passkey | 2048 | default | -50.0 [-141.9, +41.9] | 0 | 2 | 1 of 3 |" in text
    with pytest.raises(ValueError, match="share seeds"):
        tables.pool([row("full", 0, [1, 1]), row("full", 1, [1, 0])])
    with pytest.raises(ValueError, match="share seeds"):  # the same seeds, other answers
        tables.pool([row("full", 0, [1, 1]), row("full", 0, [1, 0])])
    older = [{k: v for k, v in r.items() if k != "scores"} for r in (row("full", 0, [1, 1]), row("full", 0, [1, 0]))]
    with pytest.raises(ValueError, match="share seeds"):  # rows of older files, without their scores
        tables.pool(older)
    assert len(tables.pool(older[:1] * 2)) == 1
    again = tables.pool(rows + [row("full", 2, [1, 0]), row("quest", 2, [1, 1])])  # a second run's reference
    assert {r["method"]: r["n"] for r in again} == {"full": 4, "default": 4, "quest": 2}


def test_report_compares_a_configuration_run_on_part_of_a_cell_with_full_attention_on_those_prompts():
    tables = script("bench.tables")
    row = passkey_run
    # full attention: 1, 1 on seeds 0-1 and 1, 0 on seeds 2-3; "quest" ran seeds 2-3 only
    rows = [row("full", 0, [1, 1]), row("full", 2, [1, 0]), row("quest", 2, [1, 1])]
    text = tables.accuracy({"rows": rows})
    assert "100.0 (+50.0; 2 prompts)" in text  # against full attention's 50% on seeds 2-3, not its 75% on all four
    assert "| passkey | 2048 | quest | +50.0 [" in text and "| 1 | 0 | 1 of 1 |" in text
    assert "below full" not in text
    with pytest.raises(ValueError, match="no scores for some of its prompts"):
        tables.accuracy({"rows": [row("full", 0, [1, 1]), row("quest", 2, [1, 1])]})


def test_gpu_check_runs_its_steps_on_the_cpu(tmp_path):
    """Without CUDA the GPU check runs at toy sizes: exactness holds and every case reports."""
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--contexts", "600", "--prefill", "300", "--steps", "2", "--json", str(out)]
    assert script("bench.gpu_check").main(argv + ["--chunk", "64", "128"]) == 0
    rows = json.loads(out.read_text())["rows"]
    exact = [r for r in rows if r["case"].startswith("exactness")]
    assert {r["case"] for r in exact} == {"exactness-float32", "exactness-bfloat16"}
    for r in exact:
        assert r["logits_ok"] and r["greedy_ok"] and r["conservation_ok"] and r["all_read"]
    assert next(r for r in exact if r["case"] == "exactness-float32")["max_abs_logit_diff"] <= 1e-4
    prefixes = {r["case"]: r for r in rows if r["case"].startswith("prefix")}
    assert set(prefixes) == {"prefix-float32", "prefix-bfloat16"} and all(r["prefix_ok"] for r in prefixes.values())
    assert prefixes["prefix-float32"]["equals_whole_prompt"] and prefixes["prefix-float32"]["same_after_rewind"]
    assert prefixes["prefix-float32"]["extended_equals_whole_prompt"]
    assert all(p["loaded_equals_saved"] for p in prefixes.values())  # a prefix file, loaded on the device
    decode = {r["method"]: r for r in rows if r["case"] == "decode"}
    assert {"hybrid-default", "hybrid-default-no-growth", "full-sdpa"} <= set(decode)
    assert 0 < decode["hybrid-default"]["kv_read_frac"] < 1 and decode["hybrid-default"]["host_bytes"] > 0
    assert decode["hybrid-default"]["rerun_attn_ms_per_layer"] > 0  # a near tie's step run again, timed
    default = decode["hybrid-default"]
    assert len(default["wider_ms_per_token"]) == 2 and all(ms > 0 for ms in default["wider_ms_per_token"])
    assert default["kv_read_frac"] < min(default["wider_kv_read_frac"]) and default["rerun_positions"] > 0
    assert default["ms_per_token_over_block"] > 0 and default["ms_per_token_mean"] > 0
    assert default["ms_per_token_clocked"] > 0 and default["attn_ms_per_layer"] > 0  # its steps in turns, clocked
    # its peak is its steps' (it was read after the runs again, which hold a layer's host rows on the device)
    assert "peak_device_bytes_with_rechecks" in default and "peak_device_bytes" in default
    assert all("peak_device_bytes_with_rechecks" not in r for m, r in decode.items() if m != "hybrid-default")
    batch = {r["method"]: r for r in rows if r["case"] == "batch"}
    assert set(batch) == {"hybrid-default-batch1", "hybrid-default-batch8", "hybrid-default-batch8-per-sequence"}
    for r in batch.values():
        assert r["tokens_per_s"] > 0 and 0 < r["kv_read_frac"] < 1
        assert r["ms_per_token_clocked"] > 0 and r["attn_ms_per_layer"] > 0
        # a step makes `batch` tokens: ms per token was the whole step's
        assert (
            r["ms_per_token"] == pytest.approx(r["ms_per_step"] / r["batch"]) == pytest.approx(1e3 / r["tokens_per_s"])
        )
    assert default["ms_per_token_with_rechecks"] == pytest.approx(
        script("bench.common.timing").with_rechecks(
            default["ms_per_token_over_block"], default["wider_ms_per_token"], default["rerun_ms_per_token"]
        )
    )
    assert "tokens_per_s_vs_batch1" in batch["hybrid-default-batch8-per-sequence"]
    first_tokens = {(r["method"], r["chunk"]): r for r in rows if r["case"] == "prefill"}
    hybrid = {
        ("hybrid-default-first-call", 64),
        ("hybrid-default-stores-reused", 64),
        ("hybrid-default-stores-reused", 128),
        ("hybrid-by-layer-stores-reused", 64),
        ("hybrid-by-layer-stores-reused", 128),
    }
    assert set(first_tokens) == hybrid | {("full-sdpa", 64), ("full-sdpa", 128)}  # one first call; sdpa per chunk
    for name, chunk in hybrid:
        r = first_tokens[name, chunk]
        assert r["first_token_s"] == r["prefill_s"] + r["index_build_after_s"] > 0
        assert r["ratio_to_sdpa"] == r["first_token_s"] / first_tokens["full-sdpa", chunk]["first_token_s"]
        # counted as the engine reads it (the test below); layer by layer it reads nothing back (test_layer_prefill)
        assert (r["host_bytes_read_back"] > 0) == ("by-layer" not in name)


def test_gpu_check_counts_the_host_rows_a_chunked_prefill_reads_back():
    """The prefill rows' host bytes read back are the rows the engine's prefill attention takes
    from the host store, over every chunk and layer."""
    gpu_check = script("bench.gpu_check")
    model = gpu_check.llama(gpu_check.TOY, 2, torch.bfloat16, torch.device("cpu"), impl="hybrid")
    cfg = OffloadConfig(n_sink=4, window=32, device="cpu")
    n, chunk = 300, 48
    read = []
    rows_for = HostKV.rows_for

    def counting(self, device, n=None):
        k, v = rows_for(self, device, n)
        if n is not None:  # prefill attention names the rows it reads; a key index build takes them all
            read.append(k.nbytes + v.nbytes)
        return k, v

    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    with mock.patch.object(HostKV, "rows_for", counting), torch.inference_mode():
        prefill(model, ids, HybridCache(model, cfg, max_length=n), chunk, progress=False)
    assert sum(read) == gpu_check.host_bytes_read_back(model.config, model.dtype, cfg, n, chunk) > 0


def test_gpu_check_reports_a_broken_case_and_runs_the_others(tmp_path, monkeypatch):
    """An unexpected error in one case is a row naming it, the other cases still run, and
    the exit status says something broke (a GPU session is too short to lose to one bug)."""
    gpu_check = script("bench.gpu_check")

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(gpu_check, "exactness", broken)
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--contexts", "600", "--prefill", "300", "--steps", "1", "--json", str(out)]
    assert gpu_check.main(argv) == 1
    rows = json.loads(out.read_text())["rows"]
    exact = [r for r in rows if r["case"].startswith("exactness")]
    assert len(exact) == 2 and all("RuntimeError: no kernel image for this device" in r["error"] for r in exact)
    others = [r for r in rows if not r["case"].startswith("exactness")]
    assert {r["case"] for r in others} >= {"prefix-float32", "decode", "prefill"} and all(
        "error" not in r for r in others
    )


def test_a_paused_layer_clock_runs_the_attention_untimed():
    """A token is timed with the clock paused (no synchronisation around each layer on a GPU): its
    layers add no seconds then, they do once it runs again, also after a failure while paused."""
    from transformers import AttentionInterface

    from bench.common.timing import LayerClock

    gpu_check = script("bench.gpu_check")
    clock = LayerClock("cpu")
    AttentionInterface.register("test-clock", clock)
    model = gpu_check.llama(gpu_check.TOY, 2, torch.float32, torch.device("cpu"), impl="test-clock")
    cache = HybridCache(model, OffloadConfig(device="cpu"), max_length=64, progress=False)
    ids = torch.arange(1, 9)[None]
    with torch.inference_mode():
        with clock.paused():
            model(input_ids=ids, cache=cache, use_cache=True)
        assert clock.seconds == 0.0
        with pytest.raises(RuntimeError, match="inside"), clock.paused():
            raise RuntimeError("inside")
        model(input_ids=ids[:, :1], cache=cache, use_cache=True)
    assert clock.seconds > 0


def test_gpu_check_profiles_the_decode_step_phase_by_phase(tmp_path):
    """--profile: the torch.profiler tables of a decode step and of a batch's name the step's phases,
    and the ranges around them are gone once they are written (the timed steps run the engine's own functions)."""
    from bench.common.profiling import STEP_PHASES

    gpu_check = script("bench.gpu_check")
    before = {(owner, name): getattr(owner, name) for _, owner, name in STEP_PHASES}
    argv = ["--device", "cpu", "--cases", "decode", "batch", "--contexts", "600", "--batch-context", "300"]
    argv += ["--batch", "2", "--steps", "2", "--profile", str(tmp_path), "--json", str(tmp_path / "gpu.json")]
    assert gpu_check.main(argv) == 0
    for name in ("decode-hybrid-default-600", "batch2-stacked"):  # one sequence's step, and a batch's
        table = (tmp_path / f"{name}-torch.txt").read_text()
        by_host = table[table.index("By the host's time") :]
        for label in ("hybridattn.prepare", "hybridattn.read", "hybridattn.native_call", "hybridattn.merge"):
            assert label in by_host
    assert all(getattr(owner, name) is fn for (owner, name), fn in before.items())


def test_gpu_check_profiles_a_first_prefill_and_says_so_without_timing_its_table(tmp_path, monkeypatch):
    # the profile's table was written inside the first call's timer (1.07 s against 0.05 for the next call)
    import pstats

    print_stats = pstats.Stats.print_stats
    monkeypatch.setattr(pstats.Stats, "print_stats", lambda self, *a: time.sleep(2.0) or print_stats(self, *a))
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--cases", "prefill", "--prefill", "300", "--chunk", "128"]
    assert script("bench.gpu_check").main([*argv, "--profile", str(tmp_path), "--json", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"] if r["case"] == "prefill"}
    first = rows["hybrid-default-first-call"]
    assert first["timed_under_profiler"] and first["prefill_s"] < 2.0
    assert not any(r.get("timed_under_profiler") for m, r in rows.items() if m != "hybrid-default-first-call")


def test_gpu_check_runs_only_the_cases_asked_for(tmp_path, monkeypatch):
    """--cases splits the check over calls: each call runs and reports the cases it names only."""
    gpu_check = script("bench.gpu_check")
    ran = []
    ok = dict(max_abs_logit_diff=0.0, tolerance=1e-4, greedy_equal=True, greedy_ok=True, peak_device_bytes=0)
    ok.update(logits_ok=True, conservation_ok=True, all_read=True)

    def exactness(device, dtype, **kwargs):
        ran.append("exactness")
        return {"case": gpu_check.exactness_case(dtype), **ok}

    monkeypatch.setattr(gpu_check, "exactness", exactness)
    for case in ("decode", "batch", "prefill"):
        row = {"case": case, "peak_device_bytes": 0}
        monkeypatch.setattr(gpu_check, f"{case}_cases", lambda *args, case=case, row=row: ran.append(case) or [row])
    argv = ["--device", "cpu", "--json", str(tmp_path / "gpu.json"), "--cases"]
    for cases in (["prefill"], ["batch", "decode"], ["exactness"]):
        ran.clear()
        assert gpu_check.main(argv + cases) == 0
        assert sorted(set(ran)) == sorted(cases)
    with pytest.raises(SystemExit):
        gpu_check.main(argv + ["speed"])


def test_gpu_check_stopped_at_its_time_limit_writes_the_rows_it_finished(tmp_path, monkeypatch):
    # the JSON was written at the end alone: a part stopped by its time limit (SIGTERM) left none
    import signal

    gpu_check = script("bench.gpu_check")

    def decode_cases(args, *rest):
        gpu_check.shown({"case": "decode", "method": "hybrid-default", "peak_device_bytes": 0})
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` sends it, mid-case
        time.sleep(5)
        pytest.fail("went on after SIGTERM")

    monkeypatch.setattr(gpu_check, "decode_cases", decode_cases)
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--device", "cpu", "--json", str(out), "--cases", "decode"]) == 124
    rows = json.loads(out.read_text())["rows"]
    assert [row["case"] for row in rows] == ["decode", "stopped"] and rows[0]["method"] == "hybrid-default"
    assert json.loads(out.read_text())["environment"]["native_ext"] == ops.HAS_EXT
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler goes with the run


def test_gpu_check_lets_a_failed_case_go_before_the_next_starts(tmp_path, monkeypatch):
    """A decode case that fails after its cache is filled keeps none of that cache's memory
    into the cases after it: each case starts (reset_peak) with every earlier cache gone."""
    import weakref

    gpu_check = script("bench.gpu_check")
    made, alive_at_start = [], []
    fill = gpu_check.filled

    def filled(*args, **kwargs):
        cache, build_s = fill(*args, **kwargs)
        made.append(weakref.ref(cache))
        return cache, build_s

    def broken(*args, **kwargs):
        raise RuntimeError("a kernel that fails at this size")

    def reset_peak(device):
        gc.collect()
        alive_at_start.append(sum(ref() is not None for ref in made))

    monkeypatch.setattr(gpu_check, "filled", filled)
    monkeypatch.setattr(gpu_check, "time_decode", broken)
    monkeypatch.setattr(gpu_check, "reset_peak", reset_peak)
    monkeypatch.setattr(gpu_check, "exactness", broken)
    monkeypatch.setattr(gpu_check, "prefix_rewind", broken)
    monkeypatch.setattr(gpu_check, "batch_cases", lambda *args: [])
    monkeypatch.setattr(gpu_check, "prefill_cases", lambda *args: [])
    argv = ["--device", "cpu", "--contexts", "600", "--steps", "1", "--json", str(tmp_path / "gpu.json")]
    assert gpu_check.main(argv) == 1
    decode = [r for r in json.loads((tmp_path / "gpu.json").read_text())["rows"] if r["case"] == "decode"]
    assert len(decode) >= 3 and all("a kernel that fails" in r["error"] for r in decode)
    assert len(made) == len(decode) and alive_at_start == [0] * len(decode)


def test_soak_checks_hold_on_the_bundled_model():
    """A short soak: the invariants hold at every check and the interrupted generation
    leaves nothing behind (the step-time drift is reported, not tested: timings are noisy)."""
    from engine.api import HybridLLM

    soak = script("bench.evals.soak")
    llm = HybridLLM.from_pretrained("smollm2-135m", offload=OffloadConfig(device="cpu", window=64))
    ids = soak.segments(llm.tokenizer, 1, 400, offset=800_000)[0]
    result = soak.soak(llm, ids, steps=60, every=20)
    assert [c["step"] for c in result["checks"]] == [20, 40, 60]
    for c in result["checks"]:
        assert c["conservation"] and c["device_bytes_constant"] and c["host_growth_exact"]
        assert c["recall_added"] is None or c["recall_added"] >= 0.8 * c["recall_prompt"]
    assert result["step_time_drift"] > 0
    interrupt = soak.interrupted_generation_is_harmless(llm, ids[:, :200], 12)
    assert interrupt["ok"]
    text = script("bench.tables").soak({**result, "all_ok": True, "interrupt": interrupt}, every=40)
    assert [line.split(" | ")[0] for line in text.splitlines()[2:4]] == [
        "| 20",
        "| 40",
    ]  # the first window, then every 40
    assert "FAIL" not in text


def test_bench_prefill_quick(tmp_path):
    out = tmp_path / "prefill.json"
    script("bench.speed.prefill").main(["--quick", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["case"] for r in rows} == {"sdpa", "engine", "overlapped", "by-layer", "by-layer-after"}
    for r in rows:
        has_keys(r, {"context", "prefill_s", "build_after_s", "first_token_s", "ratio_to_sdpa"})
        assert r["first_token_s"] >= r["prefill_s"] > 0
    text = script("bench.tables").prefill(json.loads(out.read_text()))
    assert text.count("\n| 512 |") == 5  # one row per case


def test_bench_prefix_quick(tmp_path, monkeypatch, capsys):
    out = tmp_path / "prefix.json"
    argv = ["--quick", "--context", "500", "--new-tokens", "4", "--samples", "1", "--server", "--json", str(out)]
    warmed = warm_ups(monkeypatch, "bench.speed.prefix")
    script("bench.speed.prefix").main(argv)
    result = json.loads(out.read_text())
    assert len(warmed) == 1  # the whole prompt's row, the others' reference, ran cold
    with pytest.raises(SystemExit) as refused:  # read with --samples alone: ignored without a word
        script("bench.speed.prefix").main(["--quick", "--conversations"])
    assert refused.value.code == 2 and "--conversations needs --samples" in capsys.readouterr().err
    served = result["server"]
    tokens = result["prefix"]["prefix_tokens"]
    assert [r["reused_tokens"] for r in served[:4]] == [0, 0, tokens, tokens]  # the document prefilled once
    assert [r["answer"] for r in served[1:4]] == [r["answer"] for r in result["rows"][1:]]  # as the Python API's
    assert served[4]["reused_tokens"] == 0 and served[5]["reused_tokens"] == served[4]["prompt_tokens"] - 1
    assert served[6]["loaded"] and served[6]["reused_tokens"] == tokens  # the document loaded from the folder
    assert served[6]["answer"] == served[1]["answer"] and not any(r["loaded"] for r in served[:6])
    assert served[7]["seconds"] is None and served[7]["prompt_tokens"] == served[5]["prompt_tokens"]  # asked whole
    text = script("bench.tables").served(result)
    assert text.count(" (document) |") == 2 and text.count(" (conversation) |") == 1
    assert text.count(" (document, from its file) |") == 1
    agreement = result["agreement"]
    assert agreement["prompts"] == 1 and 0 <= agreement["same_tokens"] <= 1 and agreement["task"] == "niah_multikey"
    whole, first, other, again = result["rows"]
    saved = result["file"]  # saved to a file and loaded by another engine: the prefix's own answer and reads
    assert (saved["answer"], saved["kv_read_frac"]) == (first["answer"], first["kv_read_frac"])
    assert saved["prefilled_tokens"] == first["prefilled_tokens"] and saved["file_bytes"] > 0
    assert result["prefix"]["prefix_tokens"] + first["prefilled_tokens"] == first["prompt_tokens"]
    assert whole["prefilled_tokens"] == whole["prompt_tokens"] == first["prompt_tokens"]
    assert first["prefilled_tokens"] < 20 and other["prefilled_tokens"] < 20
    assert {k: v for k, v in again.items() if k not in ("question", "first_token_s")} == {
        k: v for k, v in first.items() if k not in ("question", "first_token_s")
    }  # the document's state found again after the other question


def slow_shutdown(monkeypatch, seconds: float) -> None:
    """The server's shutdown made to take `seconds` (its loop's next turn is up to half a second away)."""
    from engine.server import Server

    shutdown = Server.shutdown

    def slow(self):
        time.sleep(seconds)
        shutdown(self)

    monkeypatch.setattr(Server, "shutdown", slow)


def warm_ups(monkeypatch, module: str) -> list:
    """The prompts `module`'s warm-up is given (before its timings), recorded."""
    prompts, warm_up = [], script(module).warm_up
    monkeypatch.setattr(script(module), "warm_up", lambda llm, prompt: prompts.append(prompt) or warm_up(llm, prompt))
    return prompts


def test_bench_serve_quick(tmp_path, monkeypatch):
    """Clients at once: one at a time every request is its own batch; in batches taken whole, those that
    waited together share one, and every answer is the one it gets one at a time, each its full length."""
    out = tmp_path / "serve.json"
    slow_shutdown(monkeypatch, 5.0)  # counted in the wall seconds: up to half a second a way, at random
    warmed = warm_ups(monkeypatch, "bench.speed.serve")
    script("bench.speed.serve").main(["--quick", "--context", "200", "--new-tokens", "3", "--json", str(out)])
    result = json.loads(out.read_text())
    assert all(run["wall_s"] < 5.0 for run in result["runs"]) and len(warmed) == 1  # the first way ran cold
    one, start, joining = result["runs"]
    assert (one["way"], one["max_batch"], one["batches"]) == ("one at a time", 1, [1, 1, 1])
    assert start["max_batch"] == 8 and sorted(start["batches"]) == [1, 2, 2]  # the first ran alone
    assert joining["max_batch"] == 8 and len(joining["batches"]) == 3  # who joined whom: timing's
    for run in (one, start, joining):
        assert run["completion_tokens"] == 3 * 3 and run["same_answers"] == 3  # ignore_eos: each its length
    assert set(result["summary"]) == {"one at a time", "batches at the start", "joining"}
    assert all(0 <= run["mean_longest_gap_s"] <= run["longest_gap_s"] < run["wall_s"] for run in result["runs"])
    assert "answers as one at a time" in script("bench.tables").clients(result)


def test_bench_leave_quick(tmp_path, monkeypatch):
    """Each way a request is let go, in the prefill and while decoding, timed in each round and summed up."""
    out = tmp_path / "leave.json"
    slow_shutdown(monkeypatch, 1.0)  # the loop's end, which Ctrl-C does not wait for: not in a stop's seconds
    warmed = warm_ups(monkeypatch, "bench.speed.leave")
    script("bench.speed.leave").main(["--quick", "--context", "300", "--new-tokens", "200", "--json", str(out)])
    result = json.loads(out.read_text())
    assert all(run["seconds"] < 1.0 for run in result["runs"] if run["case"].startswith("stop"))
    assert len(warmed) == 1  # the prompt's first token, which sets when each case lets go, not timed cold
    cases = script("bench.speed.leave").CASES
    assert [run["case"] for run in result["runs"]] == list(cases) and result["config"]["context"] == 300
    assert all(run["seconds"] > 0 for run in result["runs"])
    assert set(result["summary"]) == {*cases, "next request alone", "prompt first token", "prompt tokens"}
    rendered = script("bench.tables").let_go(result)
    tokens = result["summary"]["prompt tokens"]
    assert all(f"| {case} |" in rendered for case in cases) and f"a prompt of {tokens} tokens" in rendered


def test_bench_serve_joins_with_whole_prefills_beside_stepped_ones(tmp_path):
    """The ways chosen by number, the first the others' reference; joining prefills a chunk a step or whole,
    or keeps the prompts as the server does by default."""
    out = tmp_path / "serve.json"
    argv = ["--quick", "--clients", "2", "--context", "200", "--new-tokens", "3", "--ways", "2,3,4"]
    script("bench.speed.serve").main([*argv, "--prefill-chunk", "64", "--json", str(out)])
    result = json.loads(out.read_text())
    ways = ["joining", "joining, whole prefills", "joining, prompts kept"]
    assert [run["way"] for run in result["runs"]] == result["config"]["ways"] == ways
    # the same prompts' prefill (with prompts kept, into the kept cache: it was left out, 0.09 s against 1.5)
    assert result["runs"][2]["prefill_s"] > 0.3 * result["runs"][0]["prefill_s"] > 0
    assert result["config"]["prefill_chunk"] == 64 and "prefill_chunk 64" in script("bench.tables").clients(result)
    assert all(run["same_answers"] == 2 for run in result["runs"])
    assert "speed_up" in result["summary"]["joining, whole prefills"] and "speed_up" not in result["summary"]["joining"]
    assert "answers as joining" in script("bench.tables").clients(result)
    for ways in ("5", "1,1", "a"):
        with pytest.raises(SystemExit):
            script("bench.speed.serve").main(["--quick", "--ways", ways])


def test_bench_serve_sends_requests_apart_with_stagger(tmp_path):
    """(Which requests join a running batch depends on timing: tests/test_server.py holds the engine to see it.)"""
    out = tmp_path / "serve.json"
    argv = ["--quick", "--clients", "2", "--context", "200", "--new-tokens", "2", "--stagger", "0.05"]
    script("bench.speed.serve").main([*argv, "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["config"]["stagger"] == 0.05 and all(run["same_answers"] == 2 for run in result["runs"])
    assert "2 clients sent one every 0.05 s" in script("bench.tables").clients(result)
    with pytest.raises(SystemExit):
        script("bench.speed.serve").main(["--quick", "--stagger", "-1"])


def test_bench_prefix_conversations_quick(tmp_path):
    out = tmp_path / "conversations.json"
    argv = ["--quick", "--context", "500", "--new-tokens", "2", "--samples", "1", "--conversations"]
    script("bench.speed.prefix").main([*argv, "--json", str(out)])
    agreement = json.loads(out.read_text())["agreement"]
    assert agreement["prompts"] == 1 and 0 <= agreement["same_tokens"] <= 1 and "kept_score" in agreement
    assert 0.9 < agreement["found_kept_min"] < 1  # the second turn found the first's prompt kept, not its own


def test_bench_fidelity_quick(tmp_path):
    """One short prompt: every layer reports the engine's error and read share beside the
    oracle's, and the report renders them."""
    out = tmp_path / "fidelity.json"
    argv = ["--prompts", "1", "--context", "400", "--steps", "2", "--configs", "default", "fixed-noest"]
    script("bench.evals.fidelity").main([*argv, "--json", str(out)])
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert set(summary) == {"default", "fixed-noest"}
    assert "oracle_est_err" in summary["default"] and "oracle_est_err" not in summary["fixed-noest"]
    for e in summary.values():
        assert len(e["layers"]) == 30
        assert 0 <= e["err"][0] < 1 and 0 < e["read"][0] <= 1
    text = script("bench.tables").fidelity(result)
    assert text.count("\n| default |") == 1 and text.count("\n| 29 |") == 1
    assert result["config"]["dtype"] == "float32" and "the model in" not in text


def test_bench_fidelity_runs_the_model_in_bf16(tmp_path, monkeypatch):
    """--dtype bfloat16: the model and the engine's layers in bf16, the error still measured, the
    report saying so."""
    import torch

    fidelity = script("bench.evals.fidelity")
    dtypes, real = [], fidelity.measure

    def measure(model, *args):
        dtypes.append(next(model.parameters()).dtype)
        return real(model, *args)

    monkeypatch.setattr(fidelity, "measure", measure)
    out = tmp_path / "fidelity.json"
    argv = ["--prompts", "1", "--context", "300", "--steps", "2", "--configs", "default", "--dtype", "bfloat16"]
    fidelity.main([*argv, "--json", str(out)])
    result = json.loads(out.read_text())
    assert dtypes == [torch.bfloat16] and result["config"]["dtype"] == "bfloat16"
    assert 0 < result["summary"]["default"]["err"][0] < 1
    assert ", the model in bfloat16\n" in script("bench.tables").fidelity(result)


def test_eval_generation_quick(tmp_path):
    """Agreement is a share of the generated tokens; without teacher forcing the report says so.
    The `exact` configuration reads every host token: it follows full attention."""
    out = tmp_path / "generation.json"
    argv = ["--prompts", "1", "--context", "300", "--new", "6", "--configs", "default", "exact", "--no-forced"]
    script("bench.evals.generation").main([*argv, "--json", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["per_prompt"]
    assert set(row) == {"default", "exact"} and "forced_agreement" not in row["default"]
    assert 0 <= row["default"]["free_agreement"] <= 1 and 0 <= row["default"]["first_difference"] <= 6
    exact = {"free_agreement": 1.0, "first_difference": 6, "kv_read_frac": 1.0, "rechecked_frac": 0.0}
    assert row["exact"] == {**exact, "rechecks": 0, "rechecks_changed": 0, "widened": 0, "wider_runs": 0}
    assert 0 <= row["default"]["rechecks_changed"] <= row["default"]["rechecks"]
    rechecked = row["default"]["rechecked_frac"]  # a step run again reads every host token once more
    assert 0 <= rechecked <= 1 and 0 < row["default"]["kv_read_frac"] < 1 + rechecked
    text = script("bench.tables").generation(result)
    assert "not run" in text and "| 100.00% | 0.00% |" in text


def test_eval_generation_of_one_new_token_reads_nothing(tmp_path):
    # one token comes from the prefill: no decode step, whose read shares' mean raised StatisticsError
    out = tmp_path / "one.json"
    argv = ["--prompts", "1", "--context", "300", "--new", "1", "--configs", "default", "--no-forced"]
    script("bench.evals.generation").main([*argv, "--json", str(out)])
    (row,) = json.loads(out.read_text())["per_prompt"]
    assert row["default"]["kv_read_frac"] == row["default"]["rechecked_frac"] == 0.0
    assert row["default"]["free_agreement"] == 1.0


def test_eval_generation_forced_gives_the_gaps_where_the_engine_differs(tmp_path):
    out = tmp_path / "forced.json"
    argv = ["--prompts", "1", "--context", "300", "--new", "8", "--configs", "default-norecheck", "exact"]
    script("bench.evals.generation").main([*argv, "--json", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["per_prompt"]
    assert "forced_gaps_where_different" not in result["summary"]["exact"]  # per prompt only, not averaged
    engine, exact = row["default-norecheck"], row["exact"]
    assert exact["forced_agreement"] == 1.0 and exact["forced_gaps_where_different"] == []
    gaps = engine["forced_gaps_where_different"]
    assert len(gaps) == round((1 - engine["forced_agreement"]) * 8) and all(g >= 0 for g in gaps)


def test_recheck_margins_counts_the_steps_and_differing_picks_under_each_margin():
    """Pooled over prompts: a margin re-checks the steps whose gap lies below it, catches the
    differing picks among them, and each re-check adds one read of every host token."""
    per_prompt = [
        {"gaps": [0.1, 0.6, 2.0], "differs": [True, False, False], "selected_frac": 0.04},
        {"gaps": [0.3], "differs": [True], "selected_frac": 0.08},
    ]
    perfect, *rows = script("bench.tables").margin_rows(per_prompt, [0.05, 0.2, 0.5, 1.0])
    assert perfect["margin"] is None and perfect["rechecked"] == 0.5 and perfect["read"] == pytest.approx(0.55)
    assert [r["rechecked"] for r in rows] == [0.0, 0.25, 0.5, 0.75]
    assert [r["caught"] for r in rows] == [0, 1, 2, 2] and all(r["differs"] == 2 for r in rows)
    assert [r["read"] for r in rows] == pytest.approx([0.05 + x for x in (0.0, 0.25, 0.5, 0.75)])


def test_recheck_margins_after_wider_runs_recheck_only_the_steps_that_ran_wider():
    """With wider runs first, a margin re-checks the widened steps whose (wider) gap lies below
    it, and the reads start from the steps' own with their wider runs."""
    per_prompt = [
        {
            "gaps": [0.1, 0.05, 2.0],
            "differs": [True, False, True],
            "widened": [True, False, False],
            "selected_frac": 0.04,
            "read_frac": 0.06,
        }
    ]
    perfect, *rows = script("bench.tables").margin_rows(per_prompt, [0.2, 1e9])
    assert perfect["read"] == pytest.approx(0.06 + 2 / 3) and perfect["caught"] == 2
    assert [r["rechecked"] for r in rows] == pytest.approx([1 / 3, 1 / 3])  # the step that did not run wider: never
    assert [r["caught"] for r in rows] == [1, 1] and rows[0]["read"] == pytest.approx(0.06 + 1 / 3)


def test_recheck_margins_quick(tmp_path):
    """A margin above every gap re-checks every step and catches every differing pick."""
    out = tmp_path / "margins.json"
    argv = ["--prompts", "1", "--context", "300", "--new", "6", "--margins", "0.1", "1e9", "--json", str(out)]
    script("bench.evals.recheck_margins").main(argv)
    result = json.loads(out.read_text())
    (prompt,) = result["per_prompt"]
    assert len(prompt["gaps"]) == len(prompt["differs"]) == 5 and all(g >= 0 for g in prompt["gaps"])
    perfect, narrow, wide = result["margins"]
    assert perfect["caught"] == perfect["differs"] == wide["differs"]
    assert wide["rechecked"] == 1.0 and wide["caught"] == wide["differs"] == sum(prompt["differs"])
    assert 0 < prompt["selected_frac"] < 1 and wide["read"] == pytest.approx(prompt["selected_frac"] + 1)
    assert narrow["rechecked"] == sum(g < 0.1 for g in prompt["gaps"]) / 5


def test_accuracy_report_takes_cells_that_ran_some_configurations():
    """Cells from runs with different --configs render side by side; checks cover what ran."""

    def row(task, method, acc, lo=0.0):
        return {"task": task, "context": 2048, "method": method, "n": 40, "accuracy": acc, "accuracy_ci": [lo, 1.0]}

    rows = [row("passkey", "full", 0.5, 0.3), row("passkey", "default", 0.5), row("passkey", "fixed-noest", 0.4)]
    rows += [row("niah_single", "full", 1.0, 0.9), row("niah_single", "default", 0.7)]
    for r in rows:
        r.update(
            kv_read_frac=1.0 if r["method"] == "full" else 0.05, attn_rel_err=0.0 if r["method"] == "full" else 0.04
        )
    text = script("bench.tables").accuracy({"rows": rows})
    assert "- default: niah_single at 2048 is 30.00 points below full" in text
    assert "- default: niah_single at 2048 lies below full attention's 95% interval" in text
    assert "- fixed-noest: passkey at 2048 is 10.00 points below full" in text
    assert "fixed-noest: niah_single" not in text


def test_quick_defaults_fill_only_the_options_not_given():
    import argparse

    from bench.common.options import add_output_args, positive_int, quick_defaults

    p = argparse.ArgumentParser()
    add_output_args(p, quick="a short run")
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--context", type=positive_int)
    args = p.parse_args(["--quick", "--steps", "5"])
    quick_defaults(args, steps=(3, 9), context=(512, 4096))
    assert (args.steps, args.context) == (5, 512)
    args = p.parse_args([])
    quick_defaults(args, steps=(3, 9), context=(512, 4096))
    assert (args.steps, args.context) == (9, 4096)
    for bad in ("0", "-2", "x"):
        with pytest.raises(SystemExit):
            p.parse_args(["--steps", bad])


def test_a_script_s_help_gives_its_docstring_s_whole_first_sentence():
    import importlib

    from bench.common.options import parser
    from engine.cli import BENCHES, EVAL

    assert parser("Decode speed against\n   context length.\n\nHow it is timed.").description == (
        "Decode speed against context length."
    )
    for name in [*BENCHES.values(), EVAL]:  # what `hybridattn bench NAME -h` and `eval -h` print
        assert parser(importlib.import_module(name).__doc__).description.endswith("."), name


def test_a_script_s_usage_line_names_the_command_that_runs_it(monkeypatch):
    import importlib.util

    import engine.cli as cli
    from bench.common.options import parser

    spec = importlib.util.find_spec("bench.speed.kernel")
    assert parser("Kernel speed.", spec).prog == "python -m bench.speed.kernel"  # not `kernel.py`
    progs = []  # the script's parser, made while the command line runs it
    monkeypatch.setattr(cli.runpy, "run_module", lambda *a, **kw: progs.append(parser("Kernel speed.", spec).prog))
    assert cli.main(["bench", "kernel"]) == 0 and cli.main(["eval"]) == 0
    assert progs == ["hybridattn bench kernel", "hybridattn eval"]
    assert cli.script_command() is None  # once the script is over, a parser is named by its module again
    assert parser("Kernel speed.", spec).prog == "python -m bench.speed.kernel"


def test_in_turns_alternates_the_runs_and_leaves_out_the_warm_up():
    from bench.common.timing import in_turns

    calls = []

    def run(name):
        return lambda step: calls.append((name, step)) or (name, step)

    got = in_turns({"a": run("a"), "b": run("b")}, steps=2, warmup=1)
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert got == {"a": [("a", 1), ("a", 2)], "b": [("b", 1), ("b", 2)]}


def test_written_json_says_where_it_was_measured(tmp_path):
    import re

    import torch

    from bench.common.output import write_json

    path = tmp_path / "new" / "result.json"
    write_json(path, {"config": {"steps": 3}, "rows": []})
    result = json.loads(path.read_text())
    assert result["config"] == {"steps": 3} and result["rows"] == []
    env = result["environment"]
    assert env["threads"]["torch"] == torch.get_num_threads() and env["torch"] == torch.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", env["date"])
    assert env["git_commit"] is None or re.fullmatch("[0-9a-f]{40}", env["git_commit"])
    assert env["cpu"] and (env["memory_gib"] is None or env["memory_gib"] > 0)
    write_json(path, {"environment": {"device": "a GPU"}})  # a script's own environment stays
    assert json.loads(path.read_text()) == {"environment": {"device": "a GPU"}}


def test_the_cpu_is_recorded_by_its_model_and_vector_extensions(tmp_path):
    """A shared machine is not always the same CPU: results name it, not only its architecture."""
    from bench.common.output import cpu_model

    info = tmp_path / "cpuinfo"
    core = "processor\t: {}\nmodel name\t: Some CPU 9000\nflags\t\t: fpu avx2 avx512f amx_bf16 sse\n\n"
    info.write_text(core.format(0) + core.format(1))
    assert cpu_model(str(info)) == "Some CPU 9000 (avx2, avx512f, amx_bf16)"
    info.write_text("processor\t: 0\nmodel name\t: Plain CPU\nflags\t\t: fpu sse\n")
    assert cpu_model(str(info)) == "Plain CPU"
    assert cpu_model(str(tmp_path / "missing")) == (platform.processor() or platform.machine())


def test_synthetic_fill_holds_every_position_drawn_with_the_prefill_statistics():
    """A hybrid cache takes the positions chunk by chunk as a prefill would (every position in
    one place, no chunk kept, host indexes built from the build queries); a DynamicCache takes
    them at once, drawn around each channel's mean."""
    import torch
    from transformers import DynamicCache

    from bench.common.caches import channel_stats, fill
    from engine import HybridCache, OffloadConfig
    from tests.conftest import tiny_llama

    model = tiny_llama()
    stats = channel_stats(model, None, n_tokens=64)
    assert model.config._attn_implementation == "hybrid"  # left as it was
    cfg = OffloadConfig(device="cpu", n_sink=4, window=16, block_size=8, max_build_queries=32)
    cache = HybridCache(model, cfg, progress=False)
    assert fill(cache, stats, 150, dtype=torch.float32, chunk=61) >= 0
    for layer in cache.layers:
        where = layer.positions()
        assert sorted(np.concatenate(list(where.values())).tolist()) == list(range(150))
        assert layer.last_added is None and layer.key_index is not None
    full = DynamicCache()
    assert fill(full, stats, 4000, dtype=torch.float32, context="flat") == 0.0 and full.get_seq_length() == 4000
    for layer, ((km, ks), _, _) in zip(full.layers, stats):
        assert ((layer.keys[0].mean(1) - km).abs() <= 0.15 * ks + 1e-4).all()


def test_bench_host_side_quick(tmp_path):
    out = tmp_path / "host_side.json"
    script("bench.speed.host_side").main(["--quick", "--repeats", "2", "--json", str(out)])
    (case,) = json.loads(out.read_text())["cases"]
    has_keys(case, {"python_ms", "native_ms", "call_ms", "selection_ms", "read_per_head", "rated_per_head"})
    assert all(case[k] > 0 for k in ("python_ms", "native_ms", "call_ms", "selection_ms"))
    assert 0 < case["kv_read_frac"] < 1 and case["read_per_head"] <= case["host_tokens"]
    assert case["rated_per_head"] > 0  # the default rates its candidates on their keys


def test_the_operation_counter_counts_conversions_that_copy_and_not_those_that_do_not():
    """In inference mode (as a decode step runs) a conversion dispatches as `to`, a view-like
    name; it launches a kernel where it copies, and only there is it counted."""
    from bench.speed.device_ops import OpCounter

    x = torch.ones(3, 4, dtype=torch.bfloat16)
    with torch.inference_mode(), OpCounter() as counted:
        x.float()  # a copy
        x.to(torch.bfloat16)  # x itself
        x.t().contiguous()  # a copy
        x.contiguous()  # x itself
        x.t().reshape(-1)  # a copy
        x.reshape(-1)  # a view
    ops = collections.Counter()
    for (_, name), n in counted.counts.items():
        ops[name] += n
    assert ops == {"to (copy)": 1, "contiguous (copy)": 1, "reshape (copy)": 1}


def test_bench_device_ops_counts_a_step_and_a_stacked_batch_costs_less_than_its_steps(tmp_path):
    runs = {}
    for batch in (1, 2):
        out = tmp_path / f"ops{batch}.json"
        timed = ["--times", "2"] if batch == 1 else []
        script("bench.speed.device_ops").main(["--quick", "--batch", str(batch), "--json", str(out), *timed])
        (runs[batch],) = json.loads(out.read_text())["cases"]
    timed = runs[1]
    assert timed["step_ms"] > 0 and timed["operators_ms"] > 0
    ms = [op["ms"] for op in timed["slowest"]]
    assert ms == sorted(ms, reverse=True) and sum(ms) <= timed["operators_ms"] + 1e-9  # the slowest of them, first
    assert "aten::bmm" in {op["operation"] for op in timed["slowest"]}
    assert "step_ms" not in runs[2]  # timed only when asked
    for case in runs.values():
        assert case["operations"] == sum(case["by_site"].values()) == sum(case["by_operation"].values()) > 0
        assert "elsewhere" not in case["by_site"]  # each one traced to the engine's own code
        assert not set(case["by_operation"]) & {"view", "transpose", "unsqueeze"}  # views launch nothing
    assert runs[1]["by_operation"]["bmm"] >= 3  # block scores, the query lists and the estimate at least
    assert runs[2]["operations"] < 2 * runs[1]["operations"]  # the device parts stacked, not run twice


def test_recheck_margins_quick_with_wider_runs(tmp_path):
    """--widen: the steps under the first margin run wider (reading more), none runs exactly."""
    out = tmp_path / "margins.json"
    argv = ["--prompts", "1", "--context", "300", "--new", "6", "--widen", "4", "--first-margin", "1e9"]
    script("bench.evals.recheck_margins").main(argv + ["--margins", "1e9", "--json", str(out)])
    result = json.loads(out.read_text())
    (prompt,) = result["per_prompt"]
    assert prompt["widened"] == [True] * 5 and result["config"]["widen"] == 4
    assert prompt["read_frac"] > prompt["selected_frac"] > 0
    perfect, every = result["margins"]
    assert every["rechecked"] == 1.0 and every["read"] == pytest.approx(prompt["read_frac"] + 1)


@pytest.mark.parametrize(
    ("module", "stopped", "argv", "threads"),
    [
        # numba's OpenMP pool, launched at its first set_num_threads, sets the OpenMP count it shares with
        # torch and faiss to its own size: a run asked for one thread must not run on every core
        ("bench.evals.generation", "load_model", ["--quick", "--threads", "1"], 1),
        # it pinned torch to one thread, which (torch and faiss share one OpenMP count) took faiss to one too
        ("bench.evals.ann_recall", "load_or_capture", ["--threads", "2"], 2),
    ],
)
def test_every_pool_runs_on_the_threads_asked(module, stopped, argv, threads):
    """A script's own start (its parser reads torch's count first), stopped where its work begins
    (`stopped`), in a process of its own: numba's pool launches once."""
    code = (
        f"import json, {module} as script\n"
        "from bench.common.options import thread_counts\n"
        "def stop(*args, **kwargs):\n"
        "    raise SystemExit(json.dumps(thread_counts()))\n"
        f"script.{stopped} = stop\n"
        f"script.main({argv!r})\n"
    )
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    counts = json.loads(run.stderr.strip().splitlines()[-1])
    assert {name: n for name, n in counts.items() if n is not None and n != threads} == {}


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("bench.speed.decode", ["--quick", "--models", "tiny-llama"]),
        ("bench.speed.prefill", ["--quick"]),
        ("bench.speed.throughput", ["--quick"]),
        ("bench.gpu_check", ["--device", "cpu", "--cases", "decode", "--contexts", "600", "--steps", "2"]),
    ],
)
def test_the_speed_scripts_load_the_key_index_kernels_before_they_time(module, argv, monkeypatch):
    # the first index build timed paid numba's loading of its kernels (0.8 s of a 1.0 s build)
    script_module, events = script(module), []

    class Timed(BaseException):  # gpu_check turns an Exception of a case into its row
        pass

    def timed(*args, **kwargs):
        events.append("timed")
        raise Timed

    monkeypatch.setattr(script_module, "precompile", lambda: events.append("precompile"))
    monkeypatch.setattr(script_module, "in_turns", timed)
    with pytest.raises(Timed):
        script_module.main(argv)
    assert events == ["precompile", "timed"]


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("bench.speed.decode", ["--layers", "0"]),
        ("bench.speed.throughput", ["--layers", "-1"]),
        ("bench.speed.decode", ["--prefill-max", "-1"]),
        ("bench.evals.capture_qk", ["--tokens", "-5"]),
        ("bench.evals.fidelity", ["--offset", "-500"]),
        ("bench.evals.generation", ["--offset", "-1"]),
    ],
)
def test_bad_counts_and_offsets_are_refused_by_name(module, argv, capsys):
    with pytest.raises(SystemExit) as e:
        script(module).main(argv)
    assert e.value.code == 2 and f"argument {argv[0]}: must be an int >=" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("module", "argv", "named"),
    [
        ("bench.speed.decode", ["--contexts", "2048", "4096", "2048"], "--contexts names 2048 more than once"),
        ("bench.speed.decode", ["--methods", "full-sdpa", "full-sdpa"], "--methods names full-sdpa more than once"),
        ("bench.speed.throughput", ["--batches", "1", "8", "8"], "--batches names 8 more than once"),
        ("bench.speed.prefill", ["--contexts", "64", "64"], "--contexts names 64 more than once"),
        ("bench.speed.host_side", ["--models", "tiny-llama", "tiny-llama"], "--models names tiny-llama more than once"),
    ],
)
def test_a_value_listed_twice_is_refused_before_anything_runs(module, argv, named, monkeypatch):
    # it ran twice and wrote its rows twice (the tables keep the last); a batch size's second run started
    # from the sequences its first had grown
    monkeypatch.setattr(script(module), "run", lambda args: pytest.fail("ran"), raising=False)
    with pytest.raises(ValueError, match=named):
        script(module).main(argv)


def test_methods_named_run_on_the_bundled_model_too():
    decode = script("bench.speed.decode")
    # the name check took every method, the run SmolLM2's few: an empty result, without a word
    assert list(decode.chosen_methods("smollm2-135m", 4096, ["hybrid-block-only"], False)) == ["hybrid-block-only"]
    assert "hybrid-block-only" not in decode.chosen_methods("smollm2-135m", 4096, None, False)
    assert "hybrid-block-only" in decode.chosen_methods("smollm2-135m", 4096, None, True)
    assert "hybrid-all-resident" not in decode.chosen_methods("llama-3-8b-shape", 4096, None, False)
    assert not decode.chosen_methods("llama-3-8b-shape", 64, ["hybrid-default"], False)  # nothing offloaded


@pytest.mark.parametrize(
    "deadline,pip_seconds,pip_status,status,expected,exit_status",
    [
        (
            600,
            0,
            0,
            0,
            ["setup: exit 0", "decode: exit 0", "prefill_32k: exit 0", "prefill_131k: exit 0", "batch: exit 0"],
            0,
        ),
        # a failed part leaves the others their turn; the session's status is the worst (it was 0 whatever failed)
        (600, 0, 0, 3, ["setup: exit 3", "decode: exit 3", "batch: exit 3"], 3),
        # a failed install skips the rest (they timed the machine's own packages, failing every case)
        (600, 0, 2, 0, ["setup: exit 2", "install or build failed", "the other parts skipped"], 2),
        (3, 20, 0, 0, ["setup: stopped at its limit of 3 s", "the other parts skipped"], 124),  # past the deadline
    ],
)
def test_gpu_session_runs_its_parts_in_turn_within_the_deadline(
    tmp_path, deadline, pip_seconds, pip_status, status, expected, exit_status
):
    import tarfile

    fake = tmp_path / "python"  # stands for the GPU machine's Python: records its arguments; pip takes a while
    fake.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n'
        f'case "$*" in *"pip install"*) sleep {pip_seconds}; exit {pip_status};;\n'
        f"  *bench.gpu_check*) exit {status};;\nesac\n"
    )
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake), DEADLINE=str(deadline), MIN_PART="1")
    run = subprocess.run(["bash", str(BENCH / "gpu_session.sh"), str(out)], cwd=BENCH.parent, env=env, timeout=120)
    assert run.returncode == exit_status
    log = (out / "session.log").read_text()
    for line in expected:
        assert line in log
    # two files, whatever the parts left: the log and one archive of every part's files
    assert sorted(f.name for f in out.iterdir()) == ["session.log", "session.tar.gz"]
    with tarfile.open(out / "session.tar.gz") as archive:
        names = {Path(name).name for name in archive.getnames()}
    assert {"setup.log", "session.log"} <= names
    if expected[-1] == "batch: exit 0":
        assert {"decode.log", "prefill_32k.log", "prefill_131k.log", "batch.log", "installed"} <= names
        calls = (tmp_path / "calls").read_text()
        assert "-m bench.gpu_check --json" in calls and "--prefill 131072 --chunk 8192" in calls


def test_bench_query_dots_times_both_products_and_their_steps_give_the_same_output(tmp_path):
    out = tmp_path / "dots.json"
    script("bench.speed.query_dots").main(["--quick", "--rounds", "3", "--json", str(out)])
    (row,) = json.loads(out.read_text())["cases"]
    assert row["same_output"] is True and row["build_queries"] > 0
    assert row["native"] is False  # the tiny shape's 16 dimensions: torch's product on both sides
    assert min(row["product_ms"], row["product_ms_torch"], row["step_ms"], row["step_ms_torch"]) > 0
    # the blocks' scores too, each product in turn, and the engine's own product back in place after
    assert row["blocks_same_output"] is True and min(row["blocks_step_ms"], row["blocks_step_ms_torch"]) > 0
    assert estimate.block_dots is block_dots and estimate.block_sums is block_sums


def test_bench_decode_all_resident_offloads_nothing_and_reruns_nothing(tmp_path):
    """A short context with a window that holds it: the engine's step is its resident part alone."""
    out = tmp_path / "decode.json"
    args = ["--quick", "--models", "tiny-llama", "--layers", "2", "--contexts", "256", "--json", str(out)]
    script("bench.speed.decode").main([*args, "--methods", "hybrid-all-resident", "hybrid-default", "full-sdpa"])
    rows = {c["method"]: c for c in json.loads(out.read_text())["cases"]}
    assert set(rows) == {"hybrid-all-resident", "full-sdpa"}  # the default's resident set holds 256 tokens too
    row = rows["hybrid-all-resident"]
    assert row["host_bytes"] == 0 and row["kv_read_frac"] == 0 and row["rerun_attn_ms_per_layer"] is None
