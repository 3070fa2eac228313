"""A prefix saved to a file and loaded by another HybridLLM (engine.prefix_file): the loaded cache holds
the saved state to the bit, and the prompts after it decode as after the original (tokens, reads and
re-checks); a file of another model, configuration or document, or a damaged one, is refused by name."""

import copy
import json
import logging
import os
import struct
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine import OffloadConfig
from engine.api import HybridLLM
from engine.prefix_file import STALE_PARTIAL_S, PrefixFolder, layer_state
from tests.conftest import tiny_llama
from tests.test_prefix import DEFAULT_SMALL, answer, same, state


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 5000, (460,), generator=torch.Generator().manual_seed(3))


def saved_state(cache) -> list:
    """Every tensor of every layer's saved state, copied."""
    return [{name: t.clone() for name, t in layer_state(layer).items()} for layer in cache.layers]


def same_states(a: list, b: list) -> bool:
    return all(x.keys() == y.keys() and all(same(x[k].cpu(), y[k].cpu()) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "changes,length",
    [
        ({}, 400),  # the default's parts: query lists, Quest's blocks, summaries, scorer on the exact keys
        (dict(sketch_rank=8), 400),  # candidates rated on a key sketch
        (dict(host_dtype="bfloat16"), 400),  # a host store in another dtype than the model's
        (dict(candidates_from="blocks", landmark="mean"), 400),  # no key index
        (dict(estimate=False), 400),  # blocks without summaries
        ({}, 25),  # too few host tokens for the key index: its build waits, with its query sample
    ],
    ids=["default", "sketch", "bf16-host", "blocks-alone", "no-estimate", "build-waiting"],
)
def test_a_loaded_prefix_answers_as_the_saved_one(model, bundled_tokenizer, ids, tmp_path, changes, length):
    cfg = DEFAULT_SMALL.replace(**changes)
    llm = HybridLLM(model, bundled_tokenizer, cfg)
    prefix = llm.prefix(ids[:length], progress=False)
    want = [answer(llm, q, prefix) for q in (ids[400:430], ids[430:460])]
    before = saved_state(prefix.cache)
    size = prefix.save(tmp_path / "doc.prefix", progress=False)
    assert size == (tmp_path / "doc.prefix").stat().st_size and not list(tmp_path.glob("*.partial"))
    prefix.release()

    other = HybridLLM(model, bundled_tokenizer, cfg)  # another engine, as another process would have
    loaded = other.load_prefix(tmp_path / "doc.prefix", document=ids[:length], progress=False)
    assert loaded.tokens == length and torch.equal(loaded.ids[0], ids[:length])
    assert same_states(saved_state(loaded.cache), before)
    if not changes and length == 400:  # read apart from the saving code: positions, rows, landmarks, lists
        fresh = llm.prefix(ids[:length], progress=False)
        assert same(state(loaded.cache), state(fresh.cache))
        fresh.release()
    assert [answer(other, q, loaded) for q in (ids[400:430], ids[430:460])] == want
    loaded.release()


def test_an_extended_prefix_saves_what_it_was_extended_by(model, bundled_tokenizer, ids, tmp_path):
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    prefix = llm.prefix(ids[:300], progress=False)
    prefix.extend(ids[None, 300:400], progress=False)
    want = answer(llm, ids[400:430], prefix)
    prefix.save(tmp_path / "doc.prefix", progress=False)
    prefix.release()
    loaded = llm.load_prefix(tmp_path / "doc.prefix", progress=False)
    assert loaded.tokens == 400 and answer(llm, ids[400:430], loaded) == want
    loaded.release()


def test_settings_of_the_steps_may_differ_from_the_saved_ones(model, bundled_tokenizer, ids, tmp_path):
    """What a step reads is the loader's to choose: a prefix loads under a configuration equal to its own
    only in the fields that shape the cache, and answers as a prefix made under that configuration."""
    prefix = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL).prefix(ids[:400], progress=False)
    prefix.save(tmp_path / "doc.prefix", progress=False)
    prefix.release()
    steps = DEFAULT_SMALL.replace(min_prob=1e-3, candidates=64, recheck_margin=0.0, prefill_chunk=32)
    llm = HybridLLM(model, bundled_tokenizer, steps)
    loaded, made = llm.load_prefix(tmp_path / "doc.prefix", progress=False), llm.prefix(ids[:400], progress=False)
    assert answer(llm, ids[400:430], loaded) == answer(llm, ids[400:430], made)
    loaded.release()
    made.release()


def test_state_fields_are_those_that_shape_the_cache():
    fields = set(OffloadConfig.state_fields())
    assert {"n_sink", "window", "block_size", "key_index", "host_dtype", "estimate"} <= fields
    assert not fields & {"min_prob", "candidates", "recheck_margin", "device", "prefill_chunk", "host_threads"}


@pytest.fixture
def saved(model, bundled_tokenizer, ids, tmp_path):
    prefix = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL).prefix(ids[:200], progress=False)
    prefix.save(tmp_path / "doc.prefix", progress=False)
    prefix.release()
    return tmp_path / "doc.prefix"


def test_a_file_of_another_model_configuration_or_document_is_refused(model, bundled_tokenizer, ids, saved):
    other_weights = HybridLLM(tiny_llama(vocab=len(bundled_tokenizer), seed=1), bundled_tokenizer, DEFAULT_SMALL)
    with pytest.raises(ValueError, match="another model"):
        other_weights.load_prefix(saved, progress=False)
    tuned = copy.deepcopy(model)  # a fine-tune of the first layer's MLP alone: its K/V projections as they were
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(ValueError, match="another model"):
        HybridLLM(tuned, bundled_tokenizer, DEFAULT_SMALL).load_prefix(saved, progress=False)
    for field, value in (("rms_norm_eps", 0.1), ("hidden_act", "gelu")):  # the same weights, other K/V
        other = copy.deepcopy(model)
        setattr(other.config, field, value)
        with pytest.raises(ValueError, match="another model"):
            HybridLLM(other, bundled_tokenizer, DEFAULT_SMALL).load_prefix(saved, progress=False)
    moved = copy.deepcopy(model)  # what does not shape the K/V: where the model was loaded from, its token ids
    moved.config._name_or_path, moved.config.pad_token_id = "elsewhere", 7
    HybridLLM(moved, bundled_tokenizer, DEFAULT_SMALL).load_prefix(saved, progress=False).release()
    older = saved.with_name("older.prefix")  # a file of the format before, whose fingerprint read less
    older.write_bytes(saved.read_bytes().replace(b"hybridattn-prefix/3", b"hybridattn-prefix/2"))
    with pytest.raises(ValueError, match="not a prefix file of this engine \\(format 'hybridattn-prefix/2'"):
        HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL).load_prefix(older, progress=False)
    with pytest.raises(ValueError, match="another configuration: load it with window=16, block_size=8"):
        HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL.replace(window=32, block_size=16)).load_prefix(saved)
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    with pytest.raises(ValueError, match=r"another document \(200 tokens\)"):
        llm.load_prefix(saved, document=ids[:199], progress=False)
    with pytest.raises(FileNotFoundError, match="no prefix file"):
        llm.load_prefix(saved.with_name("none.prefix"))


def test_a_damaged_file_is_refused_and_nothing_is_kept(model, bundled_tokenizer, saved):
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    data = saved.read_bytes()
    cut = saved.with_name("cut.prefix")
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable prefix file"):
        llm.load_prefix(cut, progress=False)
    garbage = saved.with_name("garbage.prefix")
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable prefix file"):
        llm.load_prefix(garbage, progress=False)

    # the same header with a query list entry past the keys it indexes (the host kernel would read past
    # them), or a layer's count of positions changed
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    for name, value, error in [
        ("layers.0.key_index.lists", struct.pack("<i", 10**6), "query lists of other keys"),
        ("layers.1.counts", struct.pack("<q", 7), "counts do not add up"),
        ("layers.1.resident_pos", struct.pack("<q", 10**12), "positions are not its document's"),
        ("document", struct.pack("<q", 10**9), "token ids outside the vocabulary"),
    ]:
        begin, _ = header[name]["data_offsets"]
        body = bytearray(data[8 + n :])
        body[begin : begin + len(value)] = value
        bad = saved.with_name("bad.prefix")
        bad.write_bytes(data[: 8 + n] + bytes(body))
        with pytest.raises(ValueError, match=error):
            llm.load_prefix(bad, progress=False)
    # a part of a layer missing (its summary's values): named as damage, as every other
    with safe_open(str(saved), framework="pt") as f:
        meta = f.metadata()
    kept = {name: t for name, t in load_file(saved).items() if not name.startswith("layers.1.summary.values")}
    assert len(kept) < len(header) - 1  # (the header also holds the metadata)
    save_file(kept, saved.with_name("lacking.prefix"), metadata=meta)
    with pytest.raises(ValueError, match="lacking.prefix is damaged: its layer 1 does not load"):
        llm.load_prefix(saved.with_name("lacking.prefix"), progress=False)
    loaded = llm.load_prefix(saved, progress=False)
    assert loaded.tokens == 200
    loaded.release()


def test_damaged_metadata_and_counts_of_another_dtype_are_refused_as_damage(model, bundled_tokenizer, saved):
    # an AttributeError and an OverflowError before, which a prefix folder did not take for damage: its
    # document failed on every request rather than being prefilled again
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    with safe_open(str(saved), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(saved)
    save_file(tensors, saved.with_name("config.prefix"), metadata={**meta, "config": "null"})
    with pytest.raises(ValueError, match="config.prefix is damaged: its configuration is not a map"):
        llm.load_prefix(saved.with_name("config.prefix"), progress=False)
    counts = {**tensors, "layers.1.counts": torch.full((4,), float("inf"), dtype=torch.float64)}
    save_file(counts, saved.with_name("counts.prefix"), metadata=meta)
    with pytest.raises(ValueError, match="counts.prefix is damaged: its layer 1 does not load"):
        llm.load_prefix(saved.with_name("counts.prefix"), progress=False)


def test_a_document_longer_than_the_rows_its_file_holds_is_refused_before_a_cache_is_sized(
    model, bundled_tokenizer, saved, monkeypatch
):
    # a cache of the document's length was allocated (pinned host memory on a GPU machine) before any layer
    # was read: a small file naming a long document had it all
    import engine.prefix_file

    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    with safe_open(str(saved), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(saved)
    tensors["document"] = tensors["document"].repeat(50)  # 10,000 tokens, the rows of 200
    save_file(tensors, saved.with_name("long.prefix"), metadata=meta)
    monkeypatch.setattr(engine.prefix_file, "HybridCache", lambda *a, **k: pytest.fail("a cache was sized"))
    with pytest.raises(ValueError, match="long.prefix is damaged: its layer 0 holds fewer rows than its document"):
        llm.load_prefix(saved.with_name("long.prefix"), progress=False)


def test_a_loaded_prefix_does_not_change_with_its_file(model, bundled_tokenizer, ids, saved):
    # the loaded tensors were the file's memory mapping: written over in place after the load (same inode),
    # the file changed the cache that had been loaded from it (cut short, it ended the process)
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    loaded = llm.load_prefix(saved, progress=False)
    want = answer(llm, ids[400:430], loaded)
    before = saved_state(loaded.cache)
    with open(saved, "r+b") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(0)
        f.write(b"\x00" * size)
    assert same_states(saved_state(loaded.cache), before)
    assert answer(llm, ids[400:430], loaded) == want
    loaded.release()


def test_extra_metadata_is_refused_unless_strings_before_anything_is_written(model, bundled_tokenizer, ids, tmp_path):
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    prefix = llm.prefix(ids[:200], progress=False)
    for extra in ({"turns": 3}, ["turns"]):  # written, then read back by saved_extra as a damaged file's
        with pytest.raises(TypeError, match="extra must be a dict of strings"):
            prefix.save(tmp_path / "doc.prefix", extra=extra, progress=False)
    assert not list(tmp_path.iterdir())
    prefix.release()


def test_a_long_file_name_the_file_system_takes_is_saved(model, bundled_tokenizer, ids, tmp_path):
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    prefix = llm.prefix(ids[:200], progress=False)
    path = tmp_path / ("d" * 240 + ".prefix")  # 247 bytes; its temporary file's name was 272: refused
    prefix.save(path, progress=False)
    loaded = llm.load_prefix(path, document=ids[:200], progress=False)
    assert loaded.tokens == prefix.tokens and not list(tmp_path.glob("*.partial"))
    for p in (prefix, loaded):
        p.release()


def test_a_prefix_whose_index_cannot_be_saved_is_refused_and_writes_nothing(model, bundled_tokenizer, ids, tmp_path):
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL.replace(key_index="flat", budget="fixed", top_k=8))
    prefix = llm.prefix(ids[:200], progress=False)
    with pytest.raises(ValueError, match="key index 'qq'"):
        prefix.save(tmp_path / "doc.prefix")
    assert not list(tmp_path.iterdir())
    assert answer(llm, ids[400:430], prefix)  # the prefix goes on serving
    prefix.release()


def test_a_prefix_folder_keeps_the_documents_used_last_within_its_size(model, bundled_tokenizer, tmp_path, caplog):
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    documents = ["Alice keeps the red key. " * 30, "Bob keeps the blue key. " * 30]
    one = PrefixFolder(llm, tmp_path / "probe", 2**30)
    prefix, loaded = one.prefix(documents[0], progress=False)
    size = one.path(documents[0]).stat().st_size
    prefix.release()
    folder = PrefixFolder(llm, tmp_path / "kept", size + size // 2)  # room for one such file, not two
    for text, want_loaded in zip([*documents, documents[1], documents[0]], [False, False, True, False]):
        prefix, loaded = folder.prefix(text, progress=False)
        assert loaded == want_loaded and prefix.tokens == len(llm.encode(text)[0])
        prefix.release()
        assert [f.name for f in (tmp_path / "kept").iterdir()] == [folder.path(text).name]  # the other one went
    wider = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL.replace(window=32))
    other_config = PrefixFolder(wider, tmp_path / "kept", 2**30)
    assert other_config.path(documents[0]) != folder.path(documents[0])  # a file per model and configuration

    folder.path(documents[0]).write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING, logger="engine.prefix_file"):
        prefix, loaded = folder.prefix(documents[0], progress=False)
    assert not loaded and "was not loaded" in caplog.text and folder.path(documents[0]).stat().st_size == size
    prefix.release()


def test_a_file_another_server_removes_meanwhile_is_served_all_the_same(model, bundled_tokenizer, tmp_path):
    # another server's trim removing the file between the folder's look and its load, or between the load
    # and the mark of its use: a FileNotFoundError reached the request (in the second case with the loaded
    # prefix never released)
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    folder, text = PrefixFolder(llm, tmp_path, 2**30), "Alice keeps the red key. " * 30
    folder.prefix(text, progress=False)[0].release()
    load = llm.load_prefix
    for removed_after_load, want_loaded in ((False, False), (True, True)):

        def removing(path, removed_after_load=removed_after_load, **kwargs):
            if removed_after_load:
                prefix = load(path, **kwargs)
                path.unlink()
                return prefix
            path.unlink()
            return load(path, **kwargs)

        llm.load_prefix = removing
        prefix, loaded = folder.prefix(text, progress=False)
        llm.load_prefix = load
        assert loaded == want_loaded and prefix.tokens == len(llm.encode(text)[0])
        prefix.release()
        if removed_after_load:
            assert not folder.path(text).exists()


def test_two_saves_to_one_path_at_once_each_write_a_file_of_their_own(model, bundled_tokenizer, ids, tmp_path):
    # they shared one temporary file: the second's truncation left zeros inside the first's, which the
    # first renamed into place after the second, whose rename had taken the name away (FileNotFoundError)
    import engine.prefix_file

    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    first, second = llm.prefix(ids[:200], progress=False), llm.prefix(ids[:150], progress=False)
    path, real = tmp_path / "doc.prefix", engine.prefix_file.tqdm

    class SecondSaveMidway:
        """The first save's progress bar: at its first update, the second save runs to its end."""

        def __init__(self, *args, **kwargs):
            self.updates = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.updates += 1
            if self.updates == 1:
                engine.prefix_file.tqdm = real
                second.save(path, progress=False)

    engine.prefix_file.tqdm = SecondSaveMidway
    try:
        first.save(path, progress=False)
    finally:
        engine.prefix_file.tqdm = real
    loaded = llm.load_prefix(path, document=ids[:200], progress=False)  # the last renamed: the first's
    assert torch.equal(loaded.cache.layers[0].host.keys, first.cache.layers[0].host.keys)
    assert not list(tmp_path.glob("*.partial"))
    for p in (first, second, loaded):
        p.release()


def test_a_prefix_folder_removes_the_temporary_files_a_killed_save_left(model, bundled_tokenizer, tmp_path):
    llm = HybridLLM(model, bundled_tokenizer, DEFAULT_SMALL)
    folder = PrefixFolder(llm, tmp_path, 2**30)
    left, writing = tmp_path / "a.prefix.0123abcd.partial", tmp_path / "b.prefix.4567ef01.partial"
    left.write_bytes(b"x" * 100)
    writing.write_bytes(b"y" * 100)
    long_ago = time.time() - STALE_PARTIAL_S - 60
    os.utime(left, (long_ago, long_ago))
    prefix, loaded = folder.prefix("Alice keeps the red key. " * 30, progress=False)
    prefix.release()
    assert not left.exists() and writing.exists()  # the one still being written stays
