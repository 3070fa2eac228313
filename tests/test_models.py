"""Model loading: a model stretched past its trained context by YaRN (`engine.models.stretched`),
and what a name that loads nothing is told."""

import shutil

import pytest
import torch
import transformers

from engine import models
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


def test_a_device_this_machine_lacks_is_named_before_anything_loads(tiny_dir):
    with pytest.raises(ValueError, match=r"device 'cuda:99' is not usable here .*device='cpu'"):
        load_model(str(tiny_dir), device="cuda:99")  # no machine has a 100th GPU
    with pytest.raises(ValueError, match="cuda:99"):
        load_model("no-such-owner/no-such-model", device="cuda:99")  # before the hub is asked


@pytest.mark.parametrize("damage", ["junk", "truncated"])
def test_damaged_weights_are_named_as_the_users_file(damage, tiny_dir, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_dir, tmp_path / "model")
    weights = next(folder.glob("*.safetensors"))
    if damage == "junk":
        weights.write_text("not a safetensors file")
    else:  # a download cut short
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"the weights of {folder} are not a readable safetensors file"):
        load_model(str(folder))


def test_a_folder_without_a_tokenizer_is_told_so(tiny_dir, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_dir, tmp_path / "model", ignore=shutil.ignore_patterns("tokenizer*", "vocab*"))
    with pytest.raises(FileNotFoundError, match=f"no tokenizer in {folder} .*tokenizer.save_pretrained"):
        load_model(str(folder))


def test_a_model_file_that_is_not_gguf_is_refused_as_such(tiny_dir):
    for name in ("config.json", "model.safetensors"):
        with pytest.raises(ValueError, match=f"{name} is a file: a model is a folder .*a .gguf file"):
            load_model(str(tiny_dir / name))


def test_a_model_type_the_engine_does_not_run_is_refused_before_its_weights_load(tiny_dir, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_dir, tmp_path / "model")
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(folder)  # another architecture
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("the weights loaded")
    )
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        load_model(str(folder))


@pytest.mark.parametrize("damage", ["junk", "truncated", "header cut"])
def test_a_damaged_gguf_file_is_named_with_what_failed(damage, tmp_path):
    path = tmp_path / "model.gguf"
    if damage == "junk":
        path.write_text("not a GGUF file")
    else:  # the bundled model's file cut short, its metadata whole or cut inside it
        with open(models.bundled_gguf_path(), "rb") as whole:
            path.write_bytes(whole.read(48 * 2**20 if damage == "truncated" else 5000))
    with pytest.raises(ValueError, match=f"{path}: reading it as a GGUF model failed: "):
        load_model(str(path))


@pytest.mark.parametrize("factor", [0.5, True, float("inf"), "2"])
def test_stretch_rejects_a_bad_factor(factor):
    with pytest.raises(ValueError, match="rope_scale must be a number >= 1"):
        stretched(tiny_llama().config, factor)


def test_stretch_refuses_a_scaled_rope():
    config = stretched(tiny_llama().config, 2)
    with pytest.raises(ValueError, match="scaled already .'yarn'."):
        stretched(config, 2)


@pytest.mark.parametrize("reachable", [True, False])
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "acme/llm-9b", "acme/smollm2-135m"])
def test_a_name_the_hub_does_not_serve_is_told_what_it_is_not(monkeypatch, name, reachable):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub")

    asked = []
    monkeypatch.setattr(models, "hub_reachable", lambda: reachable)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **kw: asked.append(kw) or offline())
    with pytest.raises(OSError, match=f"model '{name}' is not the bundled model 'smollm2-135m'") as caught:
        load_model(name)
    owned = "/" in name  # only a name with an owner can be a hub id: the hub is asked for no other
    assert bool(asked) == owned
    assert all(kw.get("local_files_only", False) == (not reachable) for kw in asked)
    served = "the hub did not serve it"
    if not reachable:
        served = "the hub cannot be reached and it is not in the local hub cache"
    told = f"{served}: We couldn't connect" if owned else "nor a hub id, which names its owner"
    assert told in str(caught.value)
    assert ("did you mean the bundled model 'smollm2-135m'" in str(caught.value)) == ("smollm2" in name)


def test_a_cached_hub_model_loads_at_once_when_the_hub_cannot_be_reached(monkeypatch, offline_hub, tiny_dir):
    """Offline, the hub client retries for a minute or two before it falls back to its cache: the
    cache is asked alone, and the model it holds loads."""
    offline_hub("acme/tiny", tiny_dir)
    asked = []
    load = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: asked.append(kw) or load(*a, **kw)
    )
    model, tokenizer = load_model("acme/tiny")
    assert asked[0]["local_files_only"] is True
    assert model.config.hidden_size == tiny_llama().config.hidden_size and len(tokenizer) > 0


def test_a_cached_hub_model_with_only_bin_weights_is_refused_in_our_words(monkeypatch, offline_hub, tiny_dir, tmp_path):
    """Its pickle is never read, and the error says why nothing loaded, not that pytorch_model.bin is missing."""
    folder = tmp_path / "bin_only"
    shutil.copytree(tiny_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"not": torch.zeros(1)}, folder / "pytorch_model.bin")
    offline_hub("acme/pickled", folder)
    unpickled = []
    monkeypatch.setattr(torch, "load", lambda *a, **kw: unpickled.append(a))
    with pytest.raises(FileNotFoundError, match="no .safetensors weights of acme/pickled in the local hub cache"):
        load_model("acme/pickled")
    assert unpickled == []


@pytest.mark.parametrize("proxy", [None, "HTTPS_PROXY", "all_proxy"])
@pytest.mark.parametrize("connects", [True, False])
def test_hub_reachable_asks_for_a_connection_unless_a_proxy_decides(monkeypatch, proxy, connects):
    import socket

    from huggingface_hub import constants

    for name in models.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if proxy:
        monkeypatch.setenv(proxy, "http://proxy.example:3128")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example")
    tried = []

    class Connection:
        def close(self):
            pass

    def connect(address, timeout):
        tried.append(address)
        if not connects:
            raise OSError("Name or service not known")
        return Connection()

    monkeypatch.setattr(socket, "create_connection", connect)
    assert models.hub_reachable() == (connects or proxy is not None)
    assert tried == ([] if proxy else [("hub.example", 443)])


def test_a_converted_copy_moves_into_place_whole_and_leaves_anothers_finished_one(tmp_path):
    from engine.models import _move_into_place

    def written(name: str, text: str):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_text(text)
        return folder

    target = tmp_path / "model"
    _move_into_place(written("first", "first"), target)  # nothing there: moved
    assert (target / "model.safetensors").read_text() == "first" and not (tmp_path / "first").exists()
    _move_into_place(written("second", "second"), target)  # another's finished copy stays
    assert (target / "model.safetensors").read_text() == "first"
    (target / "model.safetensors").unlink()  # an interrupted run's leftovers are replaced
    _move_into_place(written("third", "third"), target)
    assert (target / "model.safetensors").read_text() == "third"
