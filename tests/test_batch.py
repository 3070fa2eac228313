"""Batches of sequences of different lengths (engine.cache.batch): each sequence decodes in the
batch exactly as it does alone, through model.generate, a direct forward with a padding
mask, and caches prefilled alone and stacked."""

import pytest
import torch
from transformers import DynamicCache

from engine import HybridCache, OffloadConfig
from engine.cache.batch import BatchLayer
from tests.test_attention import COVER_ALL_HYBRID

LENGTHS = (150, 231, 197)
CONFIGS = {
    "cover-all": OffloadConfig(**COVER_ALL_HYBRID),
    "default": OffloadConfig(n_sink=4, window=16, block_size=8),
}


@pytest.fixture(scope="module")
def prompts(tiny_ids):
    return [tiny_ids[0, 7 * i : 7 * i + n] for i, n in enumerate(LENGTHS)]


def left_padded(prompts, pad=0):
    """ids [B, T], attention mask [B, T], position ids [B, T] of left-padded prompts."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :], mask[b, T - len(p) :] = p, 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def forced_alone(model, prompt, cfg, forced, build=False):
    """Logits [1 + len(forced), vocab] of one sequence alone: after its prompt, then after each
    forced token. The host index is built at the first decode step (which adds its query to
    the build's), or with `build` right after the prompt."""
    cache = HybridCache(model, cfg)
    with torch.no_grad():
        out = [model(prompt[None], cache=cache, use_cache=True).logits[0, -1]]
        if build:
            cache.build_indexes()
        for token in forced[:-1]:
            out.append(model(torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_padded_batch_gives_each_sequence_its_logits_alone(tiny_model, prompts, name):
    cfg, steps = CONFIGS[name], 12
    forced = torch.randint(0, 97, (len(prompts), steps), generator=torch.Generator().manual_seed(3))
    ids, mask, pos = left_padded(prompts)
    cache = HybridCache(tiny_model, cfg)
    with torch.no_grad():
        batch = [tiny_model(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits[:, -1]]
        lengths = mask.sum(1, keepdim=True)
        for t in range(steps - 1):
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
            out = tiny_model(
                forced[:, t : t + 1], attention_mask=mask, position_ids=lengths + t, cache=cache, use_cache=True
            )
            batch.append(out.logits[:, -1])
    batch = torch.stack(batch, dim=1)  # [B, steps, vocab]
    assert isinstance(cache.layers[0], BatchLayer) and cache.get_seq_length() == ids.shape[1] + steps - 1
    for b, prompt in enumerate(prompts):
        alone = forced_alone(tiny_model, prompt, cfg, forced[b].tolist())
        assert (batch[b] - alone).abs().max() <= 1e-4, f"sequence {b}"
        assert cache.layers[0].seqs[b].n_seen == len(prompt) + steps - 1  # no padding column reached it
    stats = cache.step_stats()
    if name == "cover-all":
        assert stats["gathered"] == stats["host_tokens"] > 0


def test_generate_greedy_batch_matches_each_sequence_alone_and_full_attention(tiny_model, prompts):
    ids, mask, _ = left_padded(prompts)
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batch = tiny_model.generate(
            ids, attention_mask=mask, cache=HybridCache(tiny_model, CONFIGS["default"]), **kwargs
        )
        full = tiny_model.generate(ids, attention_mask=mask, cache=DynamicCache(), **kwargs)  # sdpa with the mask
        for b, prompt in enumerate(prompts):
            alone = tiny_model.generate(
                prompt[None],
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                cache=HybridCache(tiny_model, CONFIGS["default"]),
                **kwargs,
            )
            assert torch.equal(batch[b, ids.shape[1] :], alone[0, len(prompt) :]), f"sequence {b}"
    cover = HybridCache(tiny_model, CONFIGS["cover-all"])
    with torch.no_grad():
        exact = tiny_model.generate(ids, attention_mask=mask, cache=cover, **kwargs)
    assert torch.equal(exact, full)


def test_generate_samples_a_batch(tiny_model, prompts):
    ids, mask, _ = left_padded(prompts)
    torch.manual_seed(0)
    with torch.no_grad():
        out = tiny_model.generate(
            ids,
            attention_mask=mask,
            cache=HybridCache(tiny_model, CONFIGS["default"]),
            max_new_tokens=10,
            do_sample=True,
            temperature=1.5,
            pad_token_id=0,
        )
    assert out.shape == (len(prompts), ids.shape[1] + 10)
    assert len({tuple(row[ids.shape[1] :].tolist()) for row in out}) > 1  # rows sample their own tokens


def prefilled(model, prompts, cfg):
    caches, logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            cache = HybridCache(model, cfg)
            logits.append(model(prompt[None], cache=cache, use_cache=True).logits[0, -1])
            cache.build_indexes()
            caches.append(cache)
    return caches, torch.stack(logits)


def test_stacked_caches_decode_as_each_alone_and_drop_finished_sequences(tiny_model, prompts):
    cfg, steps = CONFIGS["default"], 10
    forced = torch.randint(0, 97, (len(prompts), steps), generator=torch.Generator().manual_seed(4))
    caches, first = prefilled(tiny_model, prompts, cfg)
    cache = HybridCache.stack(caches)
    assert cache.get_seq_length() == max(LENGTHS) and caches[0].layers == []
    lengths = torch.tensor([[n] for n in LENGTHS])
    rows, logits = list(range(len(prompts))), {b: [first[b]] for b in range(len(prompts))}
    with torch.no_grad():
        for t in range(steps - 1):
            if t == 4:  # sequence 1 finishes: the others go on without it
                rows = [0, 2]
                cache.batch_select_indices(torch.tensor([0, 2]))
            out = tiny_model(
                forced[rows, t : t + 1], position_ids=lengths[rows] + t, cache=cache, use_cache=True
            ).logits[:, -1]
            for i, b in enumerate(rows):
                logits[b].append(out[i])
    for b, prompt in enumerate(prompts):
        got = torch.stack(logits[b])
        alone = forced_alone(tiny_model, prompt, cfg, forced[b].tolist(), build=True)[: len(got)]
        assert (got - alone).abs().max() <= 1e-4, f"sequence {b}"
    assert len(logits[1]) == 5 and len(logits[0]) == steps


def test_stack_refuses_mismatched_or_unprefilled_caches(tiny_model, prompts):
    caches, _ = prefilled(tiny_model, prompts[:1], CONFIGS["default"])
    with pytest.raises(ValueError, match="share the model and the offload configuration"):
        HybridCache.stack([caches[0], prefilled(tiny_model, prompts[:1], CONFIGS["cover-all"])[0][0]])
    with pytest.raises(ValueError, match="prefilled"):
        HybridCache.stack([HybridCache(tiny_model, CONFIGS["default"])])
    with pytest.raises(TypeError, match="non-empty list"):
        HybridCache.stack([])
    with pytest.raises(ValueError, match="distinct caches: one is listed twice"):
        HybridCache.stack([caches[0], caches[0]])  # both rows updated one layer: each token counted twice


def test_a_batch_keeps_its_size(tiny_model, prompts):
    ids, mask, pos = left_padded(prompts)
    cache = HybridCache(tiny_model, CONFIGS["default"])
    with torch.no_grad():
        tiny_model(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="holds 3 sequences, got a batch of 2"):
            tiny_model(ids[:2, -1:], cache=cache, use_cache=True)


def test_the_padding_mask_reaches_the_host_once_a_forward_pass(monkeypatch):
    """Every layer reads which columns of its chunk are real; on a GPU a copy to the host in each
    layer would wait for every kernel queued before it, so the mask is copied once, when made."""
    from engine.attention import hybrid_mask

    padding = hybrid_mask(attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    copies = []
    to_host = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: copies.append(t.shape) or to_host(t, *a, **k))
    for _ in range(3):  # three layers
        columns = padding.chunk_columns(2)
    assert columns.tolist() == [[True, True], [True, True]] and copies == []
    assert padding.chunk_columns(3).tolist() == [[False, True, True], [True, True, True]]
