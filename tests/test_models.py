"""Model loading: a model stretched past its trained context by YaRN (`engine.models.stretched`),
and what a name that loads nothing is told."""

import pytest
import torch
import transformers

from engine.models import load_model, stretched
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, bundled_tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(vocab=len(bundled_tokenizer)).save_pretrained(path)
    bundled_tokenizer.save_pretrained(path)
    return path


def test_rope_scale_stretches_the_loaded_model(tiny_dir):
    plain, _ = load_model(str(tiny_dir))
    model, _ = load_model(str(tiny_dir), rope_scale=2)
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 2.0
    assert rope["original_max_position_embeddings"] == 8192 and model.config.max_position_embeddings == 16384
    assert rope["rope_theta"] == plain.config.rope_parameters["rope_theta"]
    ids = torch.arange(1, 41).unsqueeze(0)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-3)  # the positions do move
    assert plain.config.rope_parameters["rope_type"] == "default"


@pytest.mark.parametrize("factor", [0.5, True, float("inf"), "2"])
def test_stretch_rejects_a_bad_factor(factor):
    with pytest.raises(ValueError, match="rope_scale must be a number >= 1"):
        stretched(tiny_llama().config, factor)


def test_stretch_refuses_a_scaled_rope():
    config = stretched(tiny_llama().config, 2)
    with pytest.raises(ValueError, match="scaled already .'yarn'."):
        stretched(config, 2)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "acme/llm-9b", "acme/smollm2-135m"])
def test_a_name_the_hub_does_not_serve_is_told_what_it_is_not(monkeypatch, name):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub")

    asked = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **kw: asked.append(a) or offline())
    with pytest.raises(OSError, match=f"model '{name}' is not the bundled model 'smollm2-135m'") as caught:
        load_model(name)
    owned = "/" in name  # only a name with an owner can be a hub id: the hub is asked for no other
    assert bool(asked) == owned
    told = "the hub did not serve it: We couldn't connect" if owned else "nor a hub id, which names its owner"
    assert told in str(caught.value)
    assert ("did you mean the bundled model 'smollm2-135m'" in str(caught.value)) == ("smollm2" in name)
