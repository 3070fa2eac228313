"""The host store (engine.cache.store): its capacity and memory, the copies that fill it and what
a reader waits for (the side-stream ordering with stand-in CUDA streams), and the pool that hands
stores from one generation to the next."""

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

import engine.cache.store as store_module
from engine import HybridCache
from engine.api import HybridLLM
from engine.cache.store import HostKV, SideStreamCopies, StorePool
from tests.conftest import tiny_llama
from tests.test_generation import CFG, LENGTHS


def rows(n, start=0, heads=2, dim=4):
    return torch.arange(start, start + heads * n * dim, dtype=torch.float32).view(heads, n, dim)


class RecordedCopies:
    """A store's copies, done at once, with what a reader waited for."""

    def __init__(self):
        self.log = []

    def copy(self, pairs):
        self.log.append(("copy", len(pairs)))
        for dst, src in pairs:
            dst.copy_(src)

    def host_wait(self):
        self.log.append(("host_wait",))

    def device_wait(self, device):
        self.log.append(("device_wait", device.type))


def test_reserve_keeps_the_rows_and_the_memory_it_can():
    s = HostKV(2, 4, torch.float32, pin=False, capacity=8)
    s.append(rows(5), rows(5, 100))
    s.clear()
    assert (s.n, s.capacity, s.nbytes) == (0, 0, 0)
    memory = s.k_memory.data_ptr()
    s.reserve(6)  # within the memory it holds: a view of it, exactly this capacity
    assert s.capacity == 6 and s.k.data_ptr() == memory and s.nbytes == 2 * 2 * 6 * 4 * 4
    s.append(rows(6), rows(6, 100))
    s.reserve(20)  # beyond: new memory, the rows carried over
    assert s.capacity == 20 and s.k.data_ptr() != memory
    assert torch.equal(s.keys, rows(6)) and torch.equal(s.values, rows(6, 100))
    s.append(rows(20, 7)[:, :3], rows(3, 9))  # appends past the old capacity land after the old rows
    assert torch.equal(s.keys[:, 6:], rows(20, 7)[:, :3])


def test_truncate_waits_for_the_copies_in_flight_and_keeps_the_first_rows():
    log = RecordedCopies()
    s = HostKV(2, 4, torch.float32, pin=False, capacity=8, copies=log)
    s.append(rows(6), rows(6, 100))
    log.log.clear()
    s.truncate(4)
    assert log.log == [("host_wait",)] and s.n == 4 and torch.equal(s.keys, rows(6)[:, :4])
    s.append(rows(2, 50), rows(2, 60))  # the next rows land where the dropped ones were
    assert torch.equal(s.keys[:, 4:], rows(2, 50))
    for n in (-1, 7):
        with pytest.raises(ValueError, match="keeps 0 to 6 of them"):
            s.truncate(n)


def test_readers_wait_for_copies_on_the_host_or_on_their_device():
    copies = RecordedCopies()
    s = HostKV(2, 4, torch.float32, pin=False, capacity=4, copies=copies)
    s.append(rows(3), rows(3, 50))
    assert copies.log == [("copy", 2)]  # keys and values in one submission
    copies.log.clear()
    assert torch.equal(s.keys, rows(3)) and torch.equal(s.values, rows(3, 50))
    assert copies.log == [("host_wait",), ("host_wait",)]
    copies.log.clear()
    k, v = s.rows_for(torch.device("cuda"), 2)  # a device reader: its stream waits, the host does not
    assert copies.log == [("device_wait", "cuda")] and k.shape == (2, 2, 4)
    copies.log.clear()
    s.rows_for(torch.device("cpu"))
    assert copies.log == [("host_wait",)]
    copies.log.clear()
    s.append(rows(5), rows(5))  # growth reads the old rows on the host: after their copies
    assert copies.log[0] == ("host_wait",) and copies.log[-1] == ("copy", 2)
    copies.log.clear()
    s.clear()  # memory handed on only once nothing is copied into it
    assert copies.log == [("host_wait",)]


def test_rows_from_the_host_are_copied_by_the_host_after_the_copies_in_flight():
    """A prefix file's rows (engine.prefix_file) are in host memory already: the host copies them, after the
    copies in flight, which may write the rows before them, and not through the device's copies."""
    copies = RecordedCopies()
    s = HostKV(2, 4, torch.float32, pin=False, capacity=4, copies=copies)
    s.append(rows(3), rows(3, 50))
    copies.log.clear()
    s.append_from_host(rows(5, 7), rows(5, 9))  # past the capacity: it grows
    assert copies.log[-1] == ("host_wait",) and ("copy", 2) not in copies.log
    assert torch.equal(s.keys, torch.cat([rows(3), rows(5, 7)], dim=1)) and s.n == 8 and s.capacity >= 8


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append((self.name, "waits for", other.name))

    def wait_event(self, event):
        self.log.append((self.name, "waits for event", event.n))

    events = 0  # events recorded, by every stream

    def record_event(self):
        event = FakeEvent(FakeStream.events, self.log)
        FakeStream.events += 1
        self.log.append((self.name, "records", event.n))
        return event


class FakeEvent:
    def __init__(self, n, log):
        self.n, self.log = n, log

    def synchronize(self):
        self.log.append(("host", "synchronizes", self.n))


@pytest.fixture
def fake_cuda(monkeypatch):
    """Stand-ins for CUDA's streams and events where engine.cache.store uses them: (the log they
    write, {"stream": the current stream}, the "compute" stream to start with)."""
    log = []
    monkeypatch.setattr(FakeStream, "events", 0)
    current = {"stream": FakeStream("compute", log)}

    @contextmanager
    def on(stream):
        log.append((stream.name, "enter"))
        yield
        log.append((stream.name, "exit"))

    monkeypatch.setattr(store_module.torch.cuda, "Stream", lambda device: FakeStream("side", log))
    monkeypatch.setattr(store_module.torch.cuda, "current_stream", lambda device=None: current["stream"])
    monkeypatch.setattr(store_module.torch.cuda, "stream", on)
    monkeypatch.setattr(SideStreamCopies, "_streams", {})
    monkeypatch.setattr(store_module, "copy_rows", lambda dst, src: log.append(("side", "copies")) or dst.copy_(src))
    return log, current


def test_side_stream_copies_are_ordered_after_their_producer_and_before_their_readers(monkeypatch, fake_cuda):
    """The decision logic of SideStreamCopies, with stand-ins for CUDA's streams and events."""
    log, current = fake_cuda
    compute, reader = current["stream"], FakeStream("reader", log)
    copies = SideStreamCopies(torch.device("cuda", 5))
    assert SideStreamCopies(torch.device("cuda", 5)).stream is copies.stream  # one side stream per device

    monkeypatch.setattr(SideStreamCopies, "MIN_ROWS", 2)
    dst, src = torch.zeros(2, 3, 4), rows(3)
    copies.copy([(dst[:, :2], src[:, :2]), (dst[:, 2:], src[:, 2:])])
    assert log == [
        ("side", "waits for", "compute"),  # after the work that produced the rows
        ("side", "enter"),
        ("side", "copies"),
        ("side", "copies"),
        ("side", "records", 0),  # the event readers wait for, after both copies
        ("side", "exit"),
    ]
    assert torch.equal(dst, src)
    log.clear()
    current["stream"] = reader
    copies.device_wait(torch.device("cuda", 5))
    assert log == [("reader", "waits for event", 0)]  # on the device: no host stall
    log.clear()
    copies.host_wait()
    copies.host_wait()  # once waited for, the host does not wait again
    assert log == [("host", "synchronizes", 0)]
    log.clear()
    copies.device_wait(torch.device("cuda", 5))
    assert log == []  # nothing in flight any more
    current["stream"] = compute
    copies.copy([(dst[:, :1], src[:, :1])])  # a decode step's eviction: on the producer's stream, still waited for
    assert log == [("compute", "enter"), ("side", "copies"), ("compute", "records", 1), ("compute", "exit")]
    log.clear()
    copies.host_wait()
    assert log == [("host", "synchronizes", 1)]
    log.clear()
    copies.copy([(dst[:, :2], src[:, :2])])  # on the side stream, not waited for...
    copies.copy([(dst[:, 2:], src[:, 2:])])  # ... when a small copy follows on the producer's stream
    assert log[-5:] == [
        ("compute", "waits for event", 2),  # the side copy first: the next event covers both
        ("compute", "enter"),
        ("side", "copies"),
        ("compute", "records", 3),
        ("compute", "exit"),
    ]


@pytest.mark.parametrize("call", ["accelerator", "older"])
def test_a_cleared_pool_gives_cached_pinned_memory_back(monkeypatch, call):
    """torch keeps freed pinned blocks for reuse: clearing the pool empties that cache too (through
    torch.accelerator.empty_host_cache, or the older private call), once CUDA has started."""
    emptied = []
    started = {"yes": False}
    monkeypatch.setattr(store_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(store_module.torch.cuda, "is_initialized", lambda: started["yes"])
    if call == "accelerator":
        monkeypatch.setattr(store_module.torch.accelerator, "empty_host_cache", lambda: emptied.append(call))
    else:
        monkeypatch.delattr(store_module.torch.accelerator, "empty_host_cache", raising=False)
        monkeypatch.setattr(store_module.torch._C, "_host_emptyCache", lambda: emptied.append(call), raising=False)
    pool = StorePool()
    pool.give([pool.take(2, 4, torch.float32, pin=False, capacity=10)])
    pool.clear()
    assert emptied == [] and pool.nbytes == 0  # CUDA not started: no pinned memory to give back
    started["yes"] = True
    pool.clear()
    assert emptied == [call]


def test_pool_hands_the_same_memory_on_and_grows_the_smallest_need():
    pool = StorePool()
    a = pool.take(2, 4, torch.float32, pin=False, capacity=10)
    b = pool.take(2, 4, torch.float32, pin=False, capacity=30)
    a.append(rows(4), rows(4))
    pool.give([a, b])
    assert a.n == 0 and pool.nbytes == a.memory_nbytes + b.memory_nbytes
    c = pool.take(2, 4, torch.float32, pin=False, capacity=8)  # the smallest that holds 8 rows: a's
    assert c is a and c.capacity == 8 and c.nbytes == 2 * 2 * 8 * 4 * 4
    d = pool.take(2, 4, torch.float32, pin=False, capacity=50)  # none holds 50: the largest, grown
    assert d is b and d.capacity == 50
    e = pool.take(2, 4, torch.float64, pin=False, capacity=8)  # another dtype: a new store
    assert e.dtype == torch.float64 and e is not a
    pool.give([c, c])  # given twice, kept once
    assert pool.take(2, 4, torch.float32, pin=False, capacity=1) is c
    assert pool.take(2, 4, torch.float32, pin=False, capacity=1) is not c
    pool.give([d])
    pool.clear()
    assert pool.nbytes == 0 and pool.take(2, 4, torch.float32, pin=False, capacity=4) is not d


def test_pool_allocates_ahead_on_its_own_thread(monkeypatch):
    made_in = []
    real = HostKV.__init__

    def recording(self, *args, **kwargs):
        made_in.append(threading.current_thread().name)
        real(self, *args, **kwargs)

    monkeypatch.setattr(HostKV, "__init__", recording)
    pool = StorePool()
    pool.prepare(3, 2, 4, torch.float32, pin=False, capacity=16)
    pool.prepare(3, 2, 4, torch.float32, pin=False, capacity=16)  # already under way: nothing more
    stores = [pool.take(2, 4, torch.float32, pin=False, capacity=16) for _ in range(3)]
    assert len(made_in) == 3 and all(name.startswith("hybridattn-store") for name in made_in)
    assert len({id(s) for s in stores}) == 3 and all(s.capacity == 16 and s.n == 0 for s in stores)
    assert not any(t.name == "hybridattn-store" for t in threading.enumerate())  # its work done, it ended
    pool.take(2, 4, torch.float32, pin=False, capacity=16)  # none left ahead: made by the caller
    assert made_in[-1] == threading.current_thread().name


def test_generations_reuse_the_host_stores_and_give_the_same_tokens(bundled_tokenizer):
    """A HybridLLM's second generation fills the memory of its first's stores (rows of the first
    prompt left in them are never read: the same tokens as a fresh engine), and reports the bytes
    its own cache uses."""
    model = tiny_llama(vocab=len(bundled_tokenizer))
    prompts = [
        torch.randint(0, len(bundled_tokenizer), (n,), generator=torch.Generator().manual_seed(n)) for n in LENGTHS
    ]
    llm = HybridLLM(model, bundled_tokenizer, CFG)
    first = llm.generate(prompts[0], 6, stop_at_eos=False, progress=False)
    held = {s.k_memory.data_ptr() for stores in llm.stores._free.values() for s in stores}
    assert len(held) == model.config.num_hidden_layers and llm.stores.nbytes > 0
    second = llm.generate(prompts[1], 6, stop_at_eos=False, progress=False)  # shorter: fits in the same memory
    assert {s.k_memory.data_ptr() for stores in llm.stores._free.values() for s in stores} == held
    fresh = HybridLLM(model, bundled_tokenizer, CFG).generate(prompts[1], 6, stop_at_eos=False, progress=False)
    assert second.token_ids == fresh.token_ids and second.report.host_bytes == fresh.report.host_bytes
    assert first.report.host_bytes["kv_store"] > second.report.host_bytes["kv_store"]
    llm.free_host_memory()
    assert llm.stores.nbytes == 0


def test_released_cache_starts_over(bundled_tokenizer):
    model = tiny_llama(vocab=len(bundled_tokenizer))
    pool = StorePool()
    cache = HybridCache(model, CFG, max_length=200, stores=pool)
    with torch.inference_mode():
        model(input_ids=torch.arange(150)[None], cache=cache, use_cache=True)
    assert all(layer.host.n > 0 for layer in cache.layers)
    cache.release()
    assert all(not layer.is_initialized and layer.host is None for layer in cache.layers)
    assert pool.nbytes > 0 and cache.get_seq_length() == 0


def test_a_reset_cache_gives_its_stores_back_and_takes_them_again(bundled_tokenizer):
    """transformers' `Cache.reset` empties the cache for another prompt: its host stores go back to the
    pool, and the next prompt takes them again, not new ones."""
    model = tiny_llama(vocab=len(bundled_tokenizer))
    pool = StorePool()
    cache = HybridCache(model, CFG, max_length=200, stores=pool)
    with torch.inference_mode():
        model(input_ids=torch.arange(150)[None], cache=cache, use_cache=True)
        first = [layer.host for layer in cache.layers]
        cache.reset()
        assert cache.get_seq_length() == 0 and all(layer.host is None for layer in cache.layers)
        model(input_ids=torch.arange(120)[None], cache=cache, use_cache=True)
    assert {id(layer.host) for layer in cache.layers} == {id(store) for store in first}
    assert cache.get_seq_length() == 120
    assert all(layer.host.n == 120 - CFG.n_sink - CFG.window for layer in cache.layers)
    cache.release()
    assert len([s for stores in pool._free.values() for s in stores]) == len(first)


def test_a_sequence_that_leaves_a_batch_gives_its_stores_back_at_release(bundled_tokenizer):
    """A batch drops its finished sequences (batch_select_indices); their host stores still go
    back to the pool when the cache is released, emptied, with every other sequence's."""
    model = tiny_llama(vocab=len(bundled_tokenizer))
    pool = StorePool()
    cache = HybridCache(model, CFG, max_length=200, stores=pool)
    with torch.inference_mode():
        model(input_ids=torch.arange(300).view(2, 150), cache=cache, use_cache=True)
    leaving = [layer.seqs[0].host for layer in cache.layers]
    cache.batch_select_indices(torch.tensor([1]))
    assert all(len(layer.seqs) == 1 for layer in cache.layers)
    cache.release()
    free = [s for stores in pool._free.values() for s in stores]
    assert len(free) == 2 * model.config.num_hidden_layers
    assert all(any(s is store for s in free) and store.n == 0 for store in leaving)
    cache.release()  # once more: nothing given twice
    assert len([s for stores in pool._free.values() for s in stores]) == len(free)


def test_query_sample_with_the_prompt_length_keeps_what_the_doubling_keeps_without_thinning():
    from engine.cache.store import QuerySample

    for length, limit, chunk in ((1000, 64, 100), (1024, 64, 128), (777, 1000, 50), (5000, 7, 333)):
        grown, known = QuerySample(limit), QuerySample(limit, expected=length)
        strides = set()
        for start in range(0, length, chunk):
            positions = torch.arange(start, min(length, start + chunk))
            q = torch.randn(3, len(positions), 4)
            grown.add(q, positions)
            known.add(q, positions)
            strides.add(known.stride)
        assert len(strides) == 1  # the stride it started with: nothing dropped on the way
        assert torch.equal(torch.cat(known.pos), torch.cat(grown.pos)) and len(known) <= limit
        assert torch.equal(known.queries(), grown.queries())


def test_a_decode_steps_rows_are_staged_and_reach_the_store_when_a_reader_waits(monkeypatch, fake_cuda):
    """Rows too few for the side stream, bound for store rows whose heads lie apart: one copy per
    tensor into pinned staging on the producer's stream (not one per head), put into the store on
    the host after the event, whether the reader is the host or a device; a staged copy before a
    side-stream copy is covered by the later event."""
    log, current = fake_cuda
    compute, reader = current["stream"], FakeStream("reader", log)
    monkeypatch.setattr(SideStreamCopies, "MIN_ROWS", 4)
    monkeypatch.setattr(SideStreamCopies, "stages", staticmethod(lambda dst, src: not dst.is_contiguous()))
    copies = SideStreamCopies(torch.device("cuda", 0))
    store = HostKV(2, 4, torch.float32, pin=False, capacity=16, copies=copies)
    store.k.zero_()

    def staging(shape, dtype, pin):
        log.append(("staging", pin))
        return torch.empty(shape, dtype=dtype)

    monkeypatch.setattr(store_module, "host_empty", staging)
    k, v = rows(1), rows(1, 50)
    store.append(k, v)
    assert log == [  # no copy per head
        ("compute", "enter"),
        ("staging", True),
        ("staging", True),
        ("compute", "records", 0),
        ("compute", "exit"),
    ]
    assert not store.k[:, :1].any()  # not in the store until a reader waits
    log.clear()
    assert torch.equal(store.keys, k) and torch.equal(store.values, v)
    assert log == [("host", "synchronizes", 0)]
    log.clear()
    store.append(rows(1, 7), rows(1, 9))
    current["stream"] = reader
    got_k, got_v = store.rows_for(torch.device("cuda", 0))  # a device reader: the host puts them in first
    assert log[-1] == ("host", "synchronizes", 1) and ("reader", "waits for event", 1) not in log
    assert torch.equal(got_k[:, 1:], rows(1, 7)) and torch.equal(got_v[:, 1:], rows(1, 9))
    log.clear()
    current["stream"] = compute
    store.append(rows(1, 3), rows(1, 4))  # staged, then a prefill chunk's rows on the side stream
    store.append(rows(5, 11), rows(5, 12))
    assert ("compute", "records", 2) in log and ("side", "records", 3) in log
    log.clear()
    keys, values = store.keys, store.values
    assert log == [("host", "synchronizes", 3)]  # the last event covers the staged copy before it
    assert torch.equal(keys[:, 2:3], rows(1, 3)) and torch.equal(values[:, 3:], rows(5, 12))


def test_staged_rows_reach_a_store_made_in_inference_mode_from_a_thread_outside_it(monkeypatch, fake_cuda):
    """A generation allocates its stores and stages a step's rows under torch.inference_mode; the
    reader that waits for them may be the index build's thread, outside that mode, where an
    in-place write into an inference tensor raises."""
    monkeypatch.setattr(SideStreamCopies, "stages", staticmethod(lambda dst, src: not dst.is_contiguous()))
    monkeypatch.setattr(store_module, "host_empty", lambda shape, dtype, pin: torch.empty(shape, dtype=dtype))
    with torch.inference_mode():
        store = HostKV(2, 4, torch.float32, pin=False, capacity=16, copies=SideStreamCopies(torch.device("cuda", 0)))
        store.append(rows(3), rows(3, 30))
    assert store.k.is_inference() and store.copies.staged
    with ThreadPoolExecutor(1) as reader:  # its failure is raised here
        k, v = reader.submit(lambda: (store.keys.clone(), store.values.clone())).result()
    assert torch.equal(k, rows(3)) and torch.equal(v, rows(3, 30))
