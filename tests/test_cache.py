"""HybridCache bookkeeping: every position lives in exactly one place, with its own K/V."""

import re

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from engine import HybridCache, OffloadConfig
from engine.decode.select import select_host_ids
from engine.index.distinct import unique_rows


def reference_kv(model, ids):
    """Keys/values of every position from an ordinary DynamicCache: [L] of ([Hkv, T, D], [Hkv, T, D])."""
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def check_conservation(cache, ref):
    for layer, (rk, rv) in zip(cache.layers, ref):
        n = layer.n_seen
        where = layer.positions()
        everything = np.concatenate([where["sinks"], where["window"], where["host"]])
        assert np.array_equal(np.sort(everything), np.arange(n)), "a position is missing or held twice"
        # each place holds the K/V of the positions it claims
        slots = np.flatnonzero(layer.resident_pos >= 0)
        pos = torch.from_numpy(layer.resident_pos[slots])
        # (chunked and one-shot forwards round differently; a wrong position would differ by O(1))
        close = dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.resident_k[:, torch.from_numpy(slots)], rk[:, pos], **close)
        torch.testing.assert_close(layer.resident_v[:, torch.from_numpy(slots)], rv[:, pos], **close)
        host = torch.from_numpy(where["host"])
        torch.testing.assert_close(layer.host.keys, rk[:, host].to(layer.host.dtype), **close)
        torch.testing.assert_close(layer.host.values, rv[:, host].to(layer.host.dtype), **close)
        assert len(layer.blocks) == layer.host.n  # the block index saw every host token once


@pytest.mark.parametrize("n_sink,window", [(1, 1), (4, 16), (5, 37), (64, 8)])
@pytest.mark.parametrize("chunk", [1, 13, 64, 250])
def test_every_position_in_exactly_one_place(tiny_model, tiny_ids, n_sink, window, chunk):
    ids = tiny_ids[:, :300]
    ref = reference_kv(tiny_model, ids)
    # budgets that cover everything keep attention exact, so deeper layers see the reference keys too
    cache = HybridCache(
        tiny_model,
        OffloadConfig(
            n_sink=n_sink, window=window, candidates_from="blocks", block_size=8, n_blocks=1000, block_frac=1.0
        ),
    )
    with torch.no_grad():
        for start in range(0, 250, chunk):
            tiny_model(ids[:, start : min(start + chunk, 250)], cache=cache, use_cache=True)
            check_conservation(cache, [(k[:, : cache.get_seq_length()], v) for k, v in ref])
        for t in range(250, 300):  # decode: one eviction per step
            tiny_model(ids[:, t : t + 1], cache=cache, use_cache=True)
        check_conservation(cache, ref)
    assert cache.get_seq_length() == 300


@pytest.mark.parametrize("max_length", [0, 20, 100, 300])
def test_the_resident_set_is_sized_for_the_expected_length_and_grows_past_it(tiny_model, tiny_ids, max_length):
    """A window longer than the sequence takes no more device memory than the sequence needs; a
    sequence that goes past its expected length grows the buffers, every position in its place."""
    ids = tiny_ids[:, :300]
    ref = reference_kv(tiny_model, ids)
    cfg = OffloadConfig(n_sink=4, window=200, candidates_from="blocks", block_size=8, n_blocks=1000, block_frac=1.0)
    cache = HybridCache(tiny_model, cfg, max_length=max_length)
    sizes = []
    with torch.no_grad():
        for start in range(0, 250, 13):
            tiny_model(ids[:, start : min(start + 13, 250)], cache=cache, use_cache=True)
            sizes.append(cache.layers[0].resident_pos.shape[0])
            check_conservation(cache, [(k[:, : cache.get_seq_length()], v) for k, v in ref])
        for t in range(250, 300):
            tiny_model(ids[:, t : t + 1], cache=cache, use_cache=True)
        check_conservation(cache, ref)
    assert sizes[0] == min(204, max_length or 13)  # without a length given, the first chunk's
    assert all(n >= min(204, 13 * (i + 1)) for i, n in enumerate(sizes))  # never fewer slots than positions held
    assert cache.layers[0].resident_pos.shape[0] == 204 and cache.layers[0].resident_k.shape[1] == 204


def test_no_host_token_is_selected_twice(tiny_model, tiny_ids):
    cfg = OffloadConfig(
        n_sink=4,
        window=16,
        block_size=8,
        n_blocks=6,
        top_k=24,
        candidates_from="both",
        key_index="flat",
        budget="fixed",
    )
    cache = HybridCache(tiny_model, cfg)
    with torch.no_grad():
        tiny_model(tiny_ids[:, :300], cache=cache, use_cache=True)
    layer = cache.layers[0]
    q = torch.randn(layer.n_kv_heads, layer.group, layer.head_dim)
    resident_lse = torch.zeros(layer.n_kv_heads, layer.group)
    ids = select_host_ids(layer, q, q.reshape(-1, layer.head_dim).numpy(), 0.25, resident_lse)
    for row in ids:
        valid = row[row >= 0]
        assert len(valid) == len(torch.unique(valid)) > 0
        assert int(valid.max()) < layer.host.n  # host ids only: resident tokens are never among them


def test_unique_rows_pads_repeats():
    ids = torch.tensor([[5, 3, 5, -1, 3, 9], [1, 1, 1, 1, 1, 1]])
    out = unique_rows(ids)
    assert out.tolist() == [[3, 5, 9], [1, -1, -1]]  # ascending, padded to the longest row
    assert unique_rows(torch.full((2, 4), -1)).shape == (2, 0)


def test_distinct_rows_kernel_matches_the_torch_sorts():
    """numba's linear pass and the torch fallback (no `ann` extra) keep the same ids."""
    from engine.index.distinct import _distinct_rows_torch, distinct_rows

    g = torch.Generator().manual_seed(1)
    for width, high in ((1, 3), (50, 20), (300, 1000)):
        ids = torch.randint(-1, high, (4, width), generator=g)
        ids[1] = -1  # a row with nothing
        for limit in (1, 5, width):
            assert distinct_rows(ids, limit).tolist() == _distinct_rows_torch(ids, limit).tolist()
    assert distinct_rows(torch.empty(3, 0, dtype=torch.int64), 4).shape == (3, 0)
    assert distinct_rows(torch.tensor([[4, 9, 4]]), 0).shape == (1, 0)


def test_reset_starts_over(tiny_model, tiny_ids):
    cache = HybridCache(tiny_model, OffloadConfig(n_sink=4, window=16))
    with torch.no_grad():
        tiny_model(tiny_ids[:, :100], cache=cache, use_cache=True)
        cache.reset()
        assert cache.get_seq_length() == 0
        tiny_model(tiny_ids[:, :50], cache=cache, use_cache=True)
    assert cache.get_seq_length() == 50 and cache.layers[0].host.n == 50 - 20


def test_a_reset_batch_cache_takes_a_batch_of_any_size(tiny_model, tiny_ids):
    # it kept the batch's layers, and refused every other batch size than the last
    cache = HybridCache(tiny_model, OffloadConfig(n_sink=4, window=16))
    with torch.no_grad():
        tiny_model(tiny_ids[:, :40].repeat(2, 1), cache=cache, use_cache=True)
        for batch in (1, 3):
            cache.reset()
            tiny_model(tiny_ids[:, :40].repeat(batch, 1), cache=cache, use_cache=True)
            assert cache.get_seq_length() == 40
            assert [cache.host_tokens(row) for row in range(batch)] == [40 - 20] * batch
    with pytest.raises(IndexError, match="row 3 is not a sequence of this cache's batch of 3"):
        cache.host_tokens(3)
    with pytest.raises(IndexError, match="row -1 is not a sequence"):
        cache.step_stats(-1)


def test_a_released_batch_cache_starts_over_with_a_batch_of_any_size(tiny_model, tiny_ids):
    # release kept the batch's layers: its timeline (positions after it shifted by the old length, wrong
    # tokens) and its size (another refused)
    cache = HybridCache(tiny_model, OffloadConfig(n_sink=4, window=16))
    with torch.no_grad():
        tiny_model(tiny_ids[:, :60].repeat(2, 1), cache=cache, use_cache=True)
        for batch in (2, 1):
            cache.release()
            assert cache.get_seq_length() == 0
            got = tiny_model(tiny_ids[:, :40].repeat(batch, 1), cache=cache, use_cache=True).logits
            fresh = tiny_model(tiny_ids[:, :40].repeat(batch, 1), cache=HybridCache(tiny_model), use_cache=True)
            assert cache.get_seq_length() == 40 and torch.equal(got, fresh.logits)


@pytest.mark.parametrize("start_over", ["release", "reset"])
def test_a_cache_started_over_forgets_its_prompt_length(tiny_model, tiny_ids, start_over):
    # the next prompt kept the last one's length: its index was built mid-prompt (at the old length), or of
    # build queries spaced for a longer prompt
    cfg = OffloadConfig(n_sink=4, window=16, block_size=8, max_build_queries=16, build_workers=1)

    def decoded(cache, length):
        with torch.no_grad():
            for start in range(0, length, 100):
                tiny_model(tiny_ids[:, start : min(length, start + 100)], cache=cache, use_cache=True)
            cache.build_indexes()
            steps = range(length, length + 6)
            return torch.cat([tiny_model(tiny_ids[:, t : t + 1], cache=cache).logits for t in steps])

    for first, then in ((100, 300), (390, 100)):
        cache = HybridCache(tiny_model, cfg, prompt_length=first, progress=False)
        decoded(cache, first)
        getattr(cache, start_over)()
        fresh = HybridCache(tiny_model, cfg, progress=False)  # a length not told
        assert torch.equal(decoded(cache, then), decoded(fresh, then))
        assert cache.layers[0].n_built == fresh.layers[0].n_built == then - 20
        cache.close()
        fresh.close()


def test_cache_calls_the_engine_does_not_serve_are_refused_by_name(tiny_model, tiny_ids):
    # crop and batch_repeat_interleave were AttributeErrors; a row kept twice shared one layer, which took
    # each token twice
    one, batch = HybridCache(tiny_model), HybridCache(tiny_model)
    with torch.no_grad():
        tiny_model(tiny_ids[:, :40], cache=one, use_cache=True)
        tiny_model(tiny_ids[:, :40].repeat(3, 1), cache=batch, use_cache=True)
    for cache in (one, batch):
        with pytest.raises(NotImplementedError, match="does not crop its positions: rewind it to a mark"):
            cache.crop(20)
        with pytest.raises(NotImplementedError, match="does not copy a sequence"):
            cache.batch_repeat_interleave(2)
        with pytest.raises(NotImplementedError, match="beam search"):
            cache.reorder_cache(torch.tensor([0]))
    one.batch_select_indices(torch.tensor([0]))  # nothing to leave
    assert one.get_seq_length() == 40
    with pytest.raises(ValueError, match="keeps its row 0 alone, got rows \\[1\\]"):
        one.batch_select_indices(torch.tensor([1]))
    for rows in ([1, 1], [0, 3], [-1]):
        with pytest.raises(ValueError, match=f"a batch keeps distinct rows of its 3 .*got {re.escape(str(rows))}"):
            batch.batch_select_indices(torch.tensor(rows))
    batch.batch_select_indices(torch.tensor([2, 0]))
    assert [cache_row.n_seen for cache_row in batch.layers[0].seqs] == [40, 40] and len(batch.layers[0].left) == 1


def test_a_prefill_chunk_is_released_once_attended(tiny_model, tiny_ids):
    """No layer keeps its chunk's K/V after the chunk's attention: on a GPU every layer
    holding one would add up to a whole chunk's K/V per layer on the device."""
    cache = HybridCache(tiny_model, OffloadConfig(n_sink=4, window=16))
    with torch.no_grad():
        tiny_model(tiny_ids[:, :100], cache=cache, use_cache=True)
    assert all(layer.last_added is None for layer in cache.layers)


def test_ordered_kv_is_every_position_in_order(tiny_model, tiny_ids):
    ids = tiny_ids[:, :150]
    ref = reference_kv(tiny_model, ids)
    cfg = OffloadConfig(n_sink=3, window=20, candidates_from="blocks", block_size=8, n_blocks=1000, block_frac=1.0)
    cache = HybridCache(tiny_model, cfg)
    with torch.no_grad():
        tiny_model(ids[:, :120], cache=cache, use_cache=True)
        for t in range(120, 150):
            tiny_model(ids[:, t : t + 1], cache=cache, use_cache=True)
    for layer, (rk, rv) in zip(cache.layers, ref):
        k, v = layer.ordered_kv()
        torch.testing.assert_close(k, rk, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v, rv, atol=1e-4, rtol=1e-4)


def test_first_distinct_keeps_the_order_of_first_appearance():
    from engine.index.heads import first_distinct

    ids = np.array([7, 3, 7, -1, 9, 3, 1, 9, 5])
    assert first_distinct(ids, 10).tolist() == [7, 3, 9, 1, 5]
    assert first_distinct(ids, 3).tolist() == [7, 3, 9]
    assert first_distinct(np.array([-1, -1]), 4).tolist() == []


def test_first_distinct_rows_matches_the_per_row_version():
    import torch

    from engine.index.heads import OVERSAMPLE, first_distinct, first_distinct_rows

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 40, (5, 200), generator=g)
    for limit in (1, 7, 30, 100):
        kept = first_distinct_rows(ids, limit)
        for row, out in zip(ids, kept):
            expected = first_distinct(row[: OVERSAMPLE * limit].numpy(), limit)
            assert out[out >= 0].tolist() == sorted(expected.tolist())  # the same set, ascending
            assert (out[len(expected) :] == -1).all()


def test_load_kv_places_positions_as_a_prefill_does_and_keeps_no_chunk(tiny_model, tiny_ids):
    """K/V given directly, in chunks of odd sizes, land where a prefill puts them, and no
    layer keeps a chunk for a prefill attention that never runs."""
    ids = tiny_ids[:, :150]
    ref = reference_kv(tiny_model, ids)
    cache = HybridCache(tiny_model, OffloadConfig(n_sink=4, window=16, block_size=8))
    for layer, (k, v) in zip(cache.layers, ref):
        for start, stop in ((0, 3), (3, 64), (64, 150)):
            layer.load_kv(k[:, start:stop], v[:, start:stop])
    check_conservation(cache, ref)
    assert all(layer.last_added is None for layer in cache.layers)
    assert cache.get_seq_length() == 150
    with pytest.raises(ValueError, match="one shape"):
        cache.layers[0].load_kv(ref[0][0][:, :5], ref[0][1][:, :4])
    with pytest.raises(ValueError, match="layer 0: expected 2 KV heads of dim 16, got 1 of dim 16"):
        cache.layers[0].load_kv(ref[0][0][:1, :5], ref[0][1][:1, :5])  # broadcast over the heads before


def test_loaded_positions_are_exact_one_at_a_time_as_well(tiny_model, tiny_ids):
    # a last chunk of one position was taken for a decode step's: approximate, so a re-check ran it again
    ref = reference_kv(tiny_model, tiny_ids[:, :41])
    cache = HybridCache(tiny_model, OffloadConfig(n_sink=4, window=16))
    for layer, (k, v) in zip(cache.layers, ref):
        layer.load_kv(k[:, :40], v[:, :40])
        layer.load_kv(k[:, 40:], v[:, 40:])
    assert cache.approximate_newest() == 0 and cache.host_tokens() == 41 - 20


def test_build_queries_spread_over_the_loaded_positions_and_feed_the_index_build(tiny_model, tiny_ids):
    ref = reference_kv(tiny_model, tiny_ids[:, :300])
    cache = HybridCache(tiny_model, OffloadConfig(n_sink=4, window=16, block_size=8), progress=False)
    layer = cache.layers[0]
    with pytest.raises(ValueError, match="holds positions"):
        layer.add_build_queries(torch.zeros(6, 10, 16))
    layer.load_kv(*ref[0])
    Hq, D = layer.n_kv_heads * layer.group, layer.head_dim
    with pytest.raises(ValueError, match=r"queries \[6, n, 16\]"):
        layer.add_build_queries(torch.zeros(Hq, 10, D + 1))
    layer.add_build_queries(torch.randn(Hq, 7, D))
    assert len(layer.query_sample) == 7
    assert torch.cat(layer.query_sample.pos).tolist() == [0, 49, 99, 149, 199, 249, 299]
    cache.build_indexes()
    assert layer.key_index is not None and len(layer.query_sample) == 0  # the build took them
    with pytest.raises(ValueError, match="no host key index yet"):
        layer.add_build_queries(torch.randn(Hq, 7, D))


def test_copied_host_indexes_decode_as_the_source_and_take_the_tokens_a_shorter_window_leaves(tiny_model, tiny_ids):
    cfg = OffloadConfig(n_sink=4, window=32, block_size=8)
    source = HybridCache(tiny_model, cfg, progress=False)
    with torch.no_grad():
        tiny_model(tiny_ids[:, :300], cache=source, use_cache=True)
    source.build_indexes()

    def copy_of(config):
        dst = HybridCache(tiny_model, config, progress=False)
        for layer, mine in zip(source.layers, dst.layers):
            mine.load_kv(*layer.ordered_kv())
            mine.copy_indexes_from(layer)
        return dst

    same, shorter = copy_of(cfg), copy_of(cfg.replace(window=16))
    for layer, mine in zip(source.layers, shorter.layers):
        assert mine.key_index is not layer.key_index and mine.sketch.host is mine.host  # its own store's keys
        assert mine.n_built == layer.n_built and mine.n_indexed == mine.host.n == layer.host.n + 16
        assert len(mine.key_index) == mine.host.n
    with torch.no_grad():  # the same state decodes the next token to the same logits
        step = tiny_ids[:, 300:301]
        expected = tiny_model(step, cache=source, use_cache=True).logits
        assert torch.equal(tiny_model(step, cache=same, use_cache=True).logits, expected)
    for other in (cfg.replace(n_sink=2), cfg.replace(window=40)):  # the same positions, placed otherwise
        layer = HybridCache(tiny_model, other).layers[0]
        layer.load_kv(*source.layers[0].ordered_kv())
        with pytest.raises(ValueError, match="same sinks"):
            layer.copy_indexes_from(source.layers[0])


def test_decode_steps_add_the_newest_host_keys_to_the_index_once_a_block(tiny_model, tiny_ids, monkeypatch):
    """One host token a step: each layer's key index takes the newest keys once every block_size
    steps, never between (what a benchmark's mean over one block of steps counts once)."""
    from engine.cache.layer import HybridLayer

    cfg = OffloadConfig(n_sink=4, window=16, block_size=8)
    cache = HybridCache(tiny_model, cfg, progress=False)
    with torch.no_grad():
        tiny_model(tiny_ids[:, :200], cache=cache, use_cache=True)
        tiny_model(tiny_ids[:, 200:201], cache=cache, use_cache=True)  # the first step builds the index
    assert all(layer.key_index is not None for layer in cache.layers)
    adds, real = [], HybridLayer.index_new_keys

    def counted(layer):
        adds.append((layer.layer_idx, layer.host.n - layer.n_indexed))
        real(layer)

    monkeypatch.setattr(HybridLayer, "index_new_keys", counted)
    per_step = []
    with torch.no_grad():
        for i in range(201, 201 + 3 * cfg.block_size):
            before = len(adds)
            tiny_model(tiny_ids[:, i : i + 1], cache=cache, use_cache=True)
            per_step.append(len(adds) - before)
    n_layers = len(cache.layers)
    assert sorted(per_step) == [0] * (3 * cfg.block_size - 3) + [n_layers] * 3  # three steps of the 24 add
    assert all(n == cfg.block_size for _, n in adds)  # a block's keys each time


def test_a_resident_set_that_cannot_grow_says_so(tiny_model, tiny_ids, monkeypatch):
    cache = HybridCache(tiny_model, OffloadConfig(n_sink=4, window=200), max_length=20)
    with torch.no_grad():
        tiny_model(tiny_ids[:, :20], cache=cache, use_cache=True)

        def refused(*args, **kwargs):
            raise RuntimeError("can't allocate memory")

        monkeypatch.setattr(torch.Tensor, "new_zeros", refused)
        with pytest.raises(ValueError, match="n_sink \\+ window = 204 tokens.* could not grow to 40 slots"):
            tiny_model(tiny_ids[:, 20:21], cache=cache, use_cache=True)


def test_a_prefill_without_a_key_index_hands_nothing_to_the_build_worker(tiny_model, tiny_ids):
    """The block preset has no host key index: a prompt prefilled as HybridLLM prefills it (its length
    known, a build worker asked for) decodes without one, from its blocks."""
    cfg = OffloadConfig.preset("block", n_sink=4, window=16, block_size=8, build_workers=1)
    prompt = tiny_ids[:, :200]
    cache = HybridCache(tiny_model, cfg, max_length=210, prompt_length=prompt.shape[1], progress=False)
    with torch.no_grad():
        for start in range(0, 200, 64):
            tiny_model(prompt[:, start : start + 64], cache=cache, use_cache=True)
        logits = tiny_model(tiny_ids[:, 200:201], cache=cache, use_cache=True).logits
    assert torch.isfinite(logits).all() and cache.builder is None
    assert all(layer.key_index is None and layer.host.n > 0 for layer in cache.layers)
    assert cache.step_stats()["gathered"] > 0  # the chosen blocks were read
