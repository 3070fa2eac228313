import json

import pytest

from engine.cli import main


def test_plan_llama3_8b_fits_24gb(capsys):
    assert main(["plan", "--model", "llama-3-8b", "--context", "131072", "--gpu-gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "does NOT fit" not in out
    beside = float(out.split("device bytes beside weights:")[1].split()[0])
    assert beside <= 2.0


def test_plan_reports_a_budget_that_does_not_fit(capsys):
    assert main(["plan", "--model", "llama-3-8b", "--context", "131072", "--gpu-gb", "8"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


def test_plan_takes_a_config_json(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "hidden_size": 64,
                "intermediate_size": 128,
                "vocab_size": 100,
            }
        )
    )
    assert main(["plan", "--model", str(path), "--context", "4096", "--preset", "block"]) == 0
    assert "kv_store" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["plan", "--preset", "huge"], "invalid choice: 'huge'"),
        (["plan", "--method", "lsh"], "invalid choice: 'lsh'"),
        (["plan", "--context", "10"], None),
    ],
)
def test_bad_arguments(argv, message, capsys):
    if message is None:
        with pytest.raises(ValueError, match="shorter than sinks"):
            main(argv)
        return
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_bench_names_a_missing_script(capsys, monkeypatch, tmp_path):
    import engine.cli as cli

    monkeypatch.setattr(cli, "BENCH_DIR", tmp_path)
    assert main(["bench", "kernel"]) == 2
    assert "source checkout" in capsys.readouterr().err
