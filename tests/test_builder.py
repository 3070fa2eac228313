"""Index builds on a worker thread during the prefill (engine.index.worker): the same result as
building after it, no thread left behind, errors raised in the caller."""

import contextlib
import threading

import pytest
import torch

from engine import HybridCache, OffloadConfig
from engine.api import HybridLLM, prefill


def index_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("hybridattn-index")]


@pytest.fixture(scope="module")
def llm(bundled_tokenizer):
    from tests.conftest import tiny_llama

    return HybridLLM(tiny_llama(vocab=len(bundled_tokenizer)), bundled_tokenizer, OffloadConfig(device="cpu"))


def test_builds_start_during_the_prefill_and_match_building_after_it(tiny_model, tiny_ids):
    cfg = OffloadConfig(n_sink=4, window=16, block_size=8, min_prob=1e-3)
    logits = {}
    for workers in (1, 0):
        cache = HybridCache(tiny_model, cfg.replace(build_workers=workers), prompt_length=300, progress=False)
        with torch.no_grad():
            prefill(tiny_model, tiny_ids[:, :300], cache, 64, progress=False)
            assert (cache.builder is not None) == (workers > 0)
            if workers:  # every layer was handed to the builder at its last prompt token
                assert set(cache.builder._pending) == {0, 1}
            cache.build_indexes()
            assert all(layer.key_index is not None for layer in cache.layers)
            logits[workers] = torch.cat(
                [tiny_model(tiny_ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(300, 320)]
            )
        cache.close()
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)
    assert index_threads() == []


def test_builds_held_during_a_prefill_start_after_it_and_match(tiny_model, tiny_ids):
    """A prompt prefilled between a batch's steps hands its layers to the builder after its last chunk, not
    beside it (HybridCache.builds_after); the indexes are the ones built during the prefill."""
    cfg = OffloadConfig(n_sink=4, window=16, block_size=8, min_prob=1e-3, build_workers=1)
    logits = []
    for held in (True, False):
        cache = HybridCache(tiny_model, cfg, prompt_length=300, progress=False)
        with torch.no_grad():
            prefill(tiny_model, tiny_ids[:, :200], cache, 64, progress=False)
            with cache.builds_after() if held else contextlib.nullcontext():
                prefill(tiny_model, tiny_ids[:, 200:300], cache, 64, progress=False)
                assert set(cache.builder._pending) == (set() if held else {0, 1})
            assert set(cache.builder._pending) == {0, 1}
            cache.build_indexes()
            assert cache.builds_done() and all(layer.key_index is not None for layer in cache.layers)
            logits.append(tiny_model(tiny_ids[:, 300:310], cache=cache, use_cache=True).logits)
        cache.close()
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    cache = HybridCache(tiny_model, cfg, prompt_length=300, progress=False)
    with torch.no_grad(), cache.builds_after():  # the prompt not all in: nothing to build yet
        prefill(tiny_model, tiny_ids[:, :200], cache, 64, progress=False)
    assert cache.builder._pending == {} and cache.builds_done()
    cache.close()


def test_an_interrupted_stream_leaves_no_build_thread_and_the_model_usable(llm):
    prompt = torch.arange(1, 900) % 5000
    fresh = llm.generate(prompt, 12, stop_at_eos=False, progress=False).token_ids
    with pytest.raises(KeyError):
        for i, _ in enumerate(llm.stream(prompt, 12, stop_at_eos=False, progress=False)):
            if i == 3:
                raise KeyError("consumer stops")
    assert index_threads() == []
    assert llm.generate(prompt, 12, stop_at_eos=False, progress=False).token_ids == fresh


def test_a_failing_build_raises_in_the_caller(llm, monkeypatch):
    import engine.index.build

    def broken(layer):
        raise RuntimeError("build failed")

    monkeypatch.setattr(engine.index.build, "build_key_index", broken)
    with pytest.raises(RuntimeError, match="build failed"):
        llm.generate(torch.arange(1, 900) % 5000, 4, progress=False)
    assert index_threads() == []


def test_a_build_failing_in_a_decode_step_names_its_layer_and_no_step_follows(tiny_model, tiny_ids, monkeypatch):
    # it surfaced after the layers before it had taken the step's position: a retry went on with the layers
    # out of step (their lengths 302, 301, 301), and the error named no layer
    from engine.index import heads

    build, calls = heads.ListSelector.build, []

    def failing_once(self, keys, queries):
        calls.append(1)
        if len(calls) == 2:  # layer 1's
            raise MemoryError("no room")
        return build(self, keys, queries)

    monkeypatch.setattr(heads.ListSelector, "build", failing_once)
    cfg = OffloadConfig(n_sink=4, window=16, block_size=8, build_workers=1)
    cache = HybridCache(tiny_model, cfg, prompt_length=300, progress=False)
    with torch.inference_mode():
        for start in range(0, 300, 100):
            tiny_model(tiny_ids[:, start : start + 100], cache=cache, use_cache=True)
        with pytest.raises(MemoryError, match="no room") as raised:
            tiny_model(tiny_ids[:, 300:301], cache=cache, use_cache=True)
        assert "in the host index build of layer 1" in "".join(raised.value.__notes__)
        for _ in range(2):  # the step again: refused, every time
            with pytest.raises(RuntimeError, match="layer 1's host index build failed") as again:
                tiny_model(tiny_ids[:, 300:301], cache=cache, use_cache=True)
            assert again.value.__cause__ is raised.value
        cache.release()  # started over, it serves again
        tiny_model(tiny_ids[:, :50], cache=cache, use_cache=True)
    assert [layer.n_seen for layer in cache.layers] == [50] * len(cache.layers)
    assert index_threads() == []


def test_the_build_bar_shows_only_once_a_layer_builds(monkeypatch):
    """Layers waiting for a block of host keys are counted, silently: a short prompt shows no bar
    of builds that did not happen; once one builds, the bar counts the waiting ones too."""
    from engine.index import build
    from tests.conftest import tiny_llama

    bars = []

    class Bar:
        def __init__(self, total, initial, **kwargs):
            self.total, self.n, self.closed = total, initial, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(build, "tqdm", Bar)
    progress = build.BuildProgress(3)
    for _ in range(3):
        progress.done(0.0, built=False)
    assert bars == []
    progress.done(0.0, built=False)  # the next generation's layers, counted from zero again
    progress.done(1.5)
    progress.done(0.5)
    assert len(bars) == 1 and bars[0].n == bars[0].total == 3 and bars[0].closed
    assert progress.counted == 0 and progress.bar is None

    # a cache started over with builds it dropped (never counted): its count starts from none, its bar closed
    # (the next sequence's count started at the last one's, and closed early; a bar stayed open at its end)
    cache = HybridCache(tiny_llama(n_layers=3), OffloadConfig(), progress=False)
    for start_over in (cache.release, cache.reset):
        cache.build_progress.done(0.5)
        bar = cache.build_progress.bar
        start_over()
        assert bar.closed and cache.build_progress.counted == 0 and cache.build_progress.bar is None
