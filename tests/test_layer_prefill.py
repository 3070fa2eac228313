"""The prefill layer by layer (engine.layer_prefill): the cache and logits of a chunked prefill,
nothing read back from the host store, each layer's index build handed over before the next
layer starts, and clear errors for what it cannot fill."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from engine import HybridCache, OffloadConfig
from engine.cache.store import DeviceRows, HostKV, StorePool
from engine.index.worker import IndexBuilder
from engine.models import SUPPORTED_MODEL_TYPES
from engine.plan import ModelShape, plan_memory
from engine.prefill import SteppedPrefill, chunk_bounds, prefill, prefill_prompt

# a small window and blocks: most of the 300 positions go to the host store, which later chunks attend to
CFG = OffloadConfig(device="cpu", n_sink=4, window=16, block_size=8, min_prob=1e-3, host_dtype="float32")
T, CHUNK = 300, 37


def filled(model, ids, order: str) -> tuple[HybridCache, torch.Tensor]:
    cache = HybridCache(model, CFG, progress=False)
    with torch.inference_mode():
        return cache, prefill(model, ids[:, :T], cache, CHUNK, progress=False, order=order)


def test_it_fills_the_cache_a_chunked_prefill_does_and_decodes_alike(tiny_model, tiny_ids):
    (chunked, by_chunk), (layered, by_layer) = (
        filled(tiny_model, tiny_ids, "chunks"),
        filled(tiny_model, tiny_ids, "layers"),
    )
    torch.testing.assert_close(by_layer, by_chunk, rtol=1e-6, atol=1e-6)
    for a, b in zip(chunked.layers, layered.layers):
        assert (a.n_seen, a.host.n) == (b.n_seen, b.host.n) == (T, T - CFG.resident_tokens)
        torch.testing.assert_close(b.host.keys, a.host.keys, rtol=0, atol=0)
        torch.testing.assert_close(b.host.values, a.host.values, rtol=0, atol=0)
        torch.testing.assert_close(b.resident_k, a.resident_k, rtol=0, atol=0)
        assert (b.resident_pos == a.resident_pos).all()
        assert b.device_rows is None  # dropped once the layer had the whole prompt
    steps = {}
    with torch.inference_mode():
        for name, cache in (("chunks", chunked), ("layers", layered)):
            cache.build_indexes()
            steps[name] = torch.cat(
                [tiny_model(tiny_ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(T, T + 12)]
            )
    torch.testing.assert_close(steps["layers"], steps["chunks"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_it_drives_every_supported_model_type_as_its_own_forward_does(model_type):
    """The driver calls each decoder layer itself, with the arguments the model's forward gives
    it: every supported architecture gives the chunked prefill's last logits."""
    shape = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = AutoConfig.for_model(
        model_type, vocab_size=97, num_key_value_heads=2, head_dim=16, sliding_window=None, **shape
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="hybrid").eval()
    ids = torch.randint(0, 97, (1, 200), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        logits = [
            prefill(model, ids, HybridCache(model, CFG, progress=False), CHUNK, progress=False, order=o)
            for o in ("chunks", "layers")
        ]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-6, atol=1e-6)


def test_it_reads_nothing_back_from_the_host_store(tiny_model, tiny_ids, monkeypatch):
    reads = []
    rows_for = HostKV.rows_for

    def counted(self, device, n=None):
        reads.append(n)
        return rows_for(self, device, n)

    monkeypatch.setattr(HostKV, "rows_for", counted)
    filled(tiny_model, tiny_ids, "chunks")
    assert reads  # a chunked prefill's later chunks read the earlier ones from the store
    reads.clear()
    filled(tiny_model, tiny_ids, "layers")
    assert reads == []


def test_each_layer_is_handed_to_the_builder_before_the_next_layer_starts(tiny_model, tiny_ids, monkeypatch):
    events = []
    submit = IndexBuilder.submit

    def recorded(self, layer):
        events.append(("build", layer.layer_idx))
        submit(self, layer)

    monkeypatch.setattr(IndexBuilder, "submit", recorded)
    update = HybridCache.update

    def updated(self, key_states, value_states, layer_idx, *args, **kwargs):
        events.append(("chunk", layer_idx))
        return update(self, key_states, value_states, layer_idx, *args, **kwargs)

    monkeypatch.setattr(HybridCache, "update", updated)
    with torch.inference_mode():
        cfg = CFG.replace(prefill_order="layers", prefill_chunk=CHUNK)
        done = prefill_prompt(tiny_model, tiny_ids[:, :T], cfg, 8, progress=False)
    try:
        n_chunks = len(chunk_bounds(T, CHUNK))
        assert events == [("chunk", 0)] * n_chunks + [("build", 0)] + [("chunk", 1)] * n_chunks + [("build", 1)]
        assert all(layer.key_index is not None for layer in done.cache.layers)
    finally:
        done.cache.close()


def test_a_failed_prefill_gives_its_host_stores_back(tiny_model, tiny_ids):
    # only a prefill given up (PrefillLeft) did: any other failure kept them out of the pool
    pool, cfg = StorePool(), CFG.replace(prefill_chunk=CHUNK)
    with torch.inference_mode():
        prefill_prompt(tiny_model, tiny_ids[:, :T], cfg, 8, progress=False, stores=pool).cache.release()
        free = pool.nbytes
        calls = []

        def failing() -> bool:
            calls.append(1)
            if len(calls) == 3:  # in a layer of the first chunk, the stores taken already
                raise torch.OutOfMemoryError("no room")
            return False

        with pytest.raises(torch.OutOfMemoryError):
            prefill_prompt(tiny_model, tiny_ids[:, :T], cfg, 8, progress=False, stores=pool, leave=failing)
    assert free > 0 and pool.nbytes == free


@pytest.mark.parametrize("shape", [(2, 40), (40,), (1, 0)])
def test_a_prompt_s_ids_are_checked_before_its_cache_is_made(tiny_model, tiny_ids, shape):
    ids = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=r"a prefill takes the ids of one prompt \[1, T\]"):
        prefill_prompt(tiny_model, ids, CFG, 8, progress=False)
    with pytest.raises(ValueError, match=r"a prefill takes the ids of one prompt \[1, T\]"):
        SteppedPrefill(tiny_model, ids, CFG, 8)


def test_it_turns_away_what_it_cannot_fill(tiny_model, tiny_ids):
    with torch.inference_mode():
        with pytest.raises(TypeError, match="HybridCache"):
            prefill(tiny_model, tiny_ids[:, :T], DynamicCache(), CHUNK, progress=False, order="layers")
        cache, _ = filled(tiny_model, tiny_ids, "chunks")
        with pytest.raises(ValueError, match="empty"):  # a second prompt into a filled cache
            prefill(tiny_model, tiny_ids[:, :T], cache, CHUNK, progress=False, order="layers")
        with pytest.raises(ValueError, match="'chunks' or 'layers'"):
            prefill(tiny_model, tiny_ids[:, :T], HybridCache(tiny_model, CFG), CHUNK, progress=False, order="rows")
        for order in ("chunks", "layers"):  # one prompt of one token or more, in either order
            for ids in (tiny_ids[:, :0], tiny_ids[:, :T].repeat(2, 1), tiny_ids[0, :T]):
                with pytest.raises(ValueError, match=r"the ids of one prompt \[1, T\]"):
                    prefill(tiny_model, ids, HybridCache(tiny_model, CFG), CHUNK, progress=False, order=order)
    with pytest.raises(ValueError, match="prefill_order"):
        OffloadConfig(prefill_order="rows")
    rows = DeviceRows(4, torch.float32)
    rows.append(torch.zeros(2, 3, 8), torch.zeros(2, 3, 8))
    assert rows.first(3)[0].shape == (2, 3, 8) and rows.k.shape == (2, 4, 8)
    with pytest.raises(ValueError, match="holds 4 host rows"):
        rows.append(torch.zeros(2, 2, 8), torch.zeros(2, 2, 8))
    with pytest.raises(ValueError, match="3 host rows, 4 asked for"):
        rows.first(4)


def test_the_plan_counts_what_it_keeps_on_the_device():
    """Layer by layer, the prompt's hidden states and a layer's host rows stay on the device, and a
    layer's index build runs beside the next layer's chunks: more workspace than in chunks."""
    context = 131072
    chunks, layers = (plan_memory("llama-3-8b", context, OffloadConfig(prefill_order=o)) for o in ("chunks", "layers"))
    m = ModelShape.of("llama-3-8b")
    held = (
        context * m.hidden_size * 2
        + 2 * m.num_key_value_heads * (context - OffloadConfig().resident_tokens) * m.head_dim * 2
    )
    assert layers.device["workspace"] >= chunks.device["workspace"] + held
    assert {k: v for k, v in layers.device.items() if k != "workspace"} == {
        k: v for k, v in chunks.device.items() if k != "workspace"
    }
    assert layers.host == chunks.host
