import pytest
import torch

import engine  # noqa: F401  (registers the "hybrid" attention)


def tiny_llama(n_layers=2, n_heads=6, n_kv_heads=2, head_dim=16, vocab=97, seed=0, **extra):
    """A random-weight Llama with GQA, built from a config (nothing downloaded). Its query and
    key weights are scaled by 8: larger attention logits make attention peaked, as in trained
    models, so that retrieving the wrong tokens would visibly change the logits."""
    from bench.common.models import random_llama

    shape = dict(
        vocab_size=vocab,
        hidden_size=n_heads * head_dim,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
    )
    return random_llama(shape, seed=seed, qk_scale=8.0, max_position_embeddings=8192, **extra)


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_ids():
    return torch.randint(0, 97, (1, 400), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def tiny_full_logits(tiny_model, tiny_ids):
    """Full attention logits of every position (sdpa, no cache)."""
    with torch.no_grad():
        return tiny_model(tiny_ids, use_cache=False).logits


@pytest.fixture(scope="module")
def model(bundled_tokenizer):
    """A tiny random Llama with the bundled tokenizer's vocabulary, so that text prompts run on it."""
    return tiny_llama(vocab=len(bundled_tokenizer))


@pytest.fixture(scope="session")
def bundled_tokenizer():
    """The bundled model's tokenizer (the model converted once, as `load_model` does)."""
    from transformers import AutoTokenizer

    from engine.models import _bundled_safetensors_dir

    return AutoTokenizer.from_pretrained(_bundled_safetensors_dir())


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """A local hub cache under tmp_path that the engine reads as if the hub could not be reached;
    `offline_hub(repo_id, folder)` puts the folder's files there as that repository's snapshot."""
    import shutil

    from huggingface_hub import constants

    from engine import models

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models, "hub_reachable", lambda: False)

    def put(repo_id: str, folder) -> None:
        repo = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)

    return put
