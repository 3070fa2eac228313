"""The native host side of a decode step (engine.decode.host) against its reference, the Python
selection (engine.decode.select) with the C++ gather-attend: the same host ids for the same
state and queries, the same attention, one sequence or a batch. The kernel's own rules (every
input checked, fuzzed against a plain reference) are in tests/test_fuzz.py."""

import math

import numpy as np
import pytest
import torch

from bench.speed.device_ops import OpCounter
from engine import HybridCache, OffloadConfig
from engine.decode import host
from engine.decode.host import python_selection
from engine.decode.rate import read_threshold
from engine.decode.select import select_host_ids
from engine.decode.step import batch_decode_step, decode_step
from engine.native import ops
from tests.conftest import tiny_llama

pytestmark = pytest.mark.skipif(not ops.HAS_EXT, reason="the native call needs the C++ extension")

H_KV, G, D = 2, 3, 16
SCALE = D**-0.5
MODEL = tiny_llama(n_layers=1, n_heads=H_KV * G, n_kv_heads=H_KV, head_dim=D)


def structured_kv(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V [Hkv, n, D] whose attention for queries near `direction(seed)` is peaked in runs of
    host positions (of strengths from weak to strong), away from the resident ones."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(H_KV, n, D, generator=g), torch.randn(H_KV, n, D, generator=g)
    for start in torch.randint(8, max(9, n - 80), (n // 30,), generator=g).tolist():
        strength = 0.5 + 2.5 * float(torch.rand(1, generator=g))
        k[:, start : start + int(torch.randint(1, 8, (1,), generator=g))] += strength * direction(seed)
    return k, v


def direction(seed: int) -> torch.Tensor:
    return (
        torch.nn.functional.normalize(
            torch.randn(H_KV, 1, D, generator=torch.Generator().manual_seed(seed + 7)), dim=-1
        )
        * 4
    )


def layer_with(cfg: OffloadConfig, n: int, seed: int = 0, later: int = 0):
    """A layer holding n positions, its host index built, then `later` more positions added."""
    cache = HybridCache(MODEL, cfg, progress=False)
    layer = cache.layers[0]
    k, v = structured_kv(n + later, seed)
    layer.load_kv(k[:, :n], v[:, :n])
    g = torch.Generator().manual_seed(seed + 1)
    layer.add_build_queries(direction(seed).repeat_interleave(G, 0) + torch.randn(H_KV * G, 64, D, generator=g))
    cache.build_indexes()
    if later:
        layer.load_kv(k[:, n:], v[:, n:])
    return layer


def queries(seed: int, batch: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    shape = (H_KV, G, 1, D) if not batch else (batch, H_KV, G, 1, D)
    return direction(seed).unsqueeze(1) + 0.5 * torch.randn(shape, generator=g)


def assert_same_ids(layer, native: torch.Tensor, reference: torch.Tensor, q: torch.Tensor) -> None:
    """Row by row the same set of ids, but for candidates whose rating lies within a rounding
    error of the threshold (the two round exp and the group mean differently)."""
    threshold = read_threshold(layer.cfg, layer.n_seen)
    for h in range(layer.n_kv_heads):
        mine, theirs = set(native[h][native[h] >= 0].tolist()), set(reference[h][reference[h] >= 0].tolist())
        assert len(native[h][native[h] >= 0]) == len(mine)  # each id once
        for i in mine ^ theirs:
            assert layer.cfg.budget == "adaptive", f"head {h}: id {i} differs without a rating"
            assert abs(rating(layer, q, h, i) / threshold - 1) < 1e-4, f"head {h}: id {i} differs"


def rating(layer, q, h, i) -> float:
    """The probability the adaptive budget estimates for host id i of KV head h (fp64)."""
    s = (q[h, :, 0].double() @ layer.host.keys[h, i].double()) * SCALE
    rk, rv, _ = layer.resident()
    lse = torch.logsumexp((q[h, :, 0].double() @ rk[h].double().T) * SCALE, dim=-1)
    if layer.summary is not None:
        scores = layer.summary.scores(q[:, :, 0], SCALE)
        lse = torch.logaddexp(lse, layer.summary.log_mass(scores)[h].double())
    return float(torch.exp(s - lse).mean())


def both_paths(layer, q):
    o_native = decode_step(layer, q, SCALE)
    ids_native, stats = layer.stats.read_ids.clone(), dict(gathered=layer.stats.gathered, rated=layer.stats.rated)
    o_python = decode_step(layer, q, SCALE, python_selection)
    return o_native, ids_native, stats, o_python, layer.stats.read_ids.clone()


CONFIGS = {
    "default": OffloadConfig(n_sink=4, window=32, block_size=8),
    "no estimate": OffloadConfig(n_sink=4, window=32, block_size=8, estimate=False),
    "keys only": OffloadConfig(n_sink=4, window=32, block_size=8, candidates_from="keys"),
    "mean blocks": OffloadConfig(n_sink=4, window=32, block_size=8, landmark="mean", n_blocks=4),
    "fixed": OffloadConfig.preset("fixed", n_sink=4, window=32, block_size=8),
    "block": OffloadConfig.preset("block", n_sink=4, window=32, block_size=8),
    "low threshold": OffloadConfig(n_sink=4, window=32, block_size=8, min_prob=1e-4, min_ratio=0.0, candidates=16),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("later", [0, 5, 37])
def test_native_call_reads_what_the_python_selection_reads(name, later):
    """`later` positions added after the build: the newest ones unindexed (forced), whole blocks
    of them added to the index and rated as `recent` candidates."""
    layer = layer_with(CONFIGS[name], 700, seed=len(name), later=later)
    assert host.serves(layer, select_host_ids)
    for step in range(3):
        q = queries(step + len(name))
        o_native, ids_native, stats, o_python, ids_python = both_paths(layer, q)
        assert_same_ids(layer, ids_native, ids_python, q)
        assert 0 < stats["gathered"] < H_KV * layer.host.n  # a part of the host store, not all of it
        assert stats["gathered"] == int((ids_native >= 0).sum())
        if torch.equal(ids_native.sort(dim=1).values, ids_python.sort(dim=1).values):
            torch.testing.assert_close(o_native, o_python, atol=2e-5, rtol=1e-4)


def test_the_rating_keeps_a_part_of_the_candidates_and_counts_them():
    layer = layer_with(CONFIGS["default"], 900, seed=3)
    decode_step(layer, queries(3), SCALE)
    st = layer.stats
    assert 0 < st.gathered < st.rated  # rated more than it read: the threshold bit
    assert st.estimated == H_KV * layer.summary.n_blocks * 8 - int(
        (st.read_ids[st.read_ids >= 0] < layer.summary.n_blocks * 8).sum()
    )


@pytest.mark.parametrize("lse_from_candidates", [False, True])
def test_a_unit_split_over_threads_reads_and_attends_as_on_one_thread(lse_from_candidates):
    """With fewer KV heads than twice the threads, each unit's candidates are rated and attended in
    chunks of min_chunk or more on several threads (host_step.h): the same ids read and rated as
    on one thread, the same attention up to the order of its sums, and each sequence alone what
    it gets in a batch."""
    g = torch.Generator().manual_seed(11)
    n, hkv = 3000, 1
    keys, values = [torch.randn(hkv, n, D, generator=g).bfloat16() for _ in range(2)]
    keys[:, ::7] += 3 * direction(0)[0].bfloat16()  # a seventh of the tokens stand out
    q = (direction(0)[0].expand(G, D) + torch.randn(G, D, generator=g)).reshape(1, hkv * G, D)

    def call(threads: int, min_chunk: int | None, batch: int = 1):
        return ops.host_step(
            q.expand(batch, -1, -1),
            [keys] * batch,
            [values] * batch,
            [torch.empty(hkv, 0, 1, dtype=torch.int32)] * batch,
            torch.empty(batch, hkv, 0, dtype=torch.int64),
            torch.empty(batch, hkv, 0, dtype=torch.int64),
            torch.tensor([[[0, n - 100], [0, 0], [n - 100, n]]] * batch),  # candidates, and the newest read
            torch.full((batch, hkv * G), 12.0),
            scale=SCALE,
            threshold=1e-4,
            qq_limit=0,
            qq_prefix=0,
            block_size=8,
            cap=n,
            n_count_blocks=n // 8,
            lse_from_candidates=lse_from_candidates,
            n_threads=threads,
            min_chunk=min_chunk,
        )

    one = call(1, None)
    assert 100 < int(one.n_read[0, 0]) < n // 2  # the newest tokens and a part of the candidates
    assert int(one.n_rated[0, 0]) == n - 100
    for threads, min_chunk in ((4, None), (4, 128), (8, 1)):  # 1, 8 and 16 chunks
        split = call(threads, min_chunk)
        for name in ("ids", "n_read", "n_rated", "block_reads"):
            assert torch.equal(getattr(split, name), getattr(one, name)), name
        torch.testing.assert_close(split.out, one.out, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(split.lse, one.lse, atol=1e-6, rtol=1e-6)
        batch = call(threads, min_chunk, batch=3)
        assert torch.equal(batch.out[2], split.out[0]) and torch.equal(batch.lse[2], split.lse[0])


def test_covering_budget_is_exact():
    """Every host token a candidate and every candidate read: full attention, fp32."""
    cfg = OffloadConfig(n_sink=4, window=32, block_size=8, candidates=10_000, min_prob=0.0, min_ratio=0.0)
    layer = layer_with(cfg.replace(n_blocks=1000, block_frac=1.0), 600, seed=5, later=3)
    q = queries(5)
    o = decode_step(layer, q, SCALE)
    assert layer.stats.gathered == H_KV * layer.host.n
    k, v = layer.ordered_kv()
    s = torch.einsum("hgd,hnd->hgn", q[:, :, 0].double(), k.double()) * SCALE
    expected = torch.einsum("hgn,hnd->hgd", torch.softmax(s, -1), v.double())
    torch.testing.assert_close(o[:, :, 0].double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("grown", [False, True], ids=["default", "budgets-grown-apart"])
def test_a_batch_gives_each_sequence_what_it_gets_alone(grown):
    # grown: past grow_from each sequence's list budget grows with its own context, so they differ
    cfg = CONFIGS["default"].replace(grow_from=64, candidates=1) if grown else CONFIGS["default"]
    seqs = [layer_with(cfg, n, seed=n, later=later) for n, later in ((500, 0), (800, 9), (650, 40))]
    q = queries(11, batch=3)
    together = batch_decode_step(seqs, q, SCALE)
    read_together = [s.stats.read_ids.clone() for s in seqs]
    for b, seq in enumerate(seqs):
        alone = decode_step(seq, q[b], SCALE)
        assert torch.equal(seq.stats.read_ids, read_together[b])
        torch.testing.assert_close(together[b], alone, atol=1e-6, rtol=1e-6)


def test_a_sequence_without_host_tokens_in_a_batch_reads_nothing():
    cfg = CONFIGS["default"]
    short = HybridCache(MODEL, cfg, progress=False).layers[0]
    short.load_kv(*structured_kv(20, 0))  # all resident: the host store is empty
    seqs = [short, layer_with(cfg, 600, seed=2)]
    out = batch_decode_step(seqs, queries(2, batch=2), SCALE)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], decode_step(seqs[1], queries(2, batch=2)[1], SCALE), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "changes", [dict(sketch_rank=4), dict(neighbours=2), dict(key_index="flat")], ids=["sketch", "neighbours", "flat"]
)
def test_the_python_path_serves_what_the_native_call_does_not(changes):
    layer = layer_with(CONFIGS["default"].replace(**changes), 300, seed=1)
    assert not host.serves(layer, select_host_ids)
    assert not host.serves(layer_with(CONFIGS["default"], 300), python_selection)  # an evaluation's own rule
    assert torch.isfinite(decode_step(layer, queries(1), SCALE)).all()


def test_blocks_alone_are_read_in_full_and_with_the_key_index_rated():
    # as OffloadConfig.budget says: candidates_from="blocks" builds no key index and rates nothing
    gathered = {}
    for source in ("blocks", "both"):
        for min_prob in (0.0, 0.9):
            cfg = CONFIGS["default"].replace(candidates_from=source, min_prob=min_prob, min_ratio=0.0)
            layer = layer_with(cfg, 300, seed=1)
            decode_step(layer, queries(1), SCALE)
            gathered[source, min_prob] = layer.stats.gathered
    assert gathered["blocks", 0.9] == gathered["blocks", 0.0] > 0
    assert gathered["both", 0.9] < gathered["both", 0.0]


def test_more_query_heads_a_kv_head_than_the_call_rates_take_the_python_path():
    # the native call refused them at every decode step with host tokens, fixed budgets as well
    model = tiny_llama(n_layers=1, n_heads=ops.MAX_RATE_GROUP + 8, n_kv_heads=1, head_dim=8)
    ids = torch.randint(0, 97, (1, 101), generator=torch.Generator().manual_seed(0))
    for budget in ("adaptive", "fixed"):
        cfg = OffloadConfig(n_sink=4, window=32, block_size=8, budget=budget, key_index="qq", host_threads=1)
        cache = HybridCache(model, cfg, progress=False)
        with torch.no_grad():
            model(ids[:, :100], cache=cache, use_cache=True)
            assert cache.host_tokens() == 64 and not host.serves(cache.layers[0], select_host_ids)
            assert torch.isfinite(model(ids[:, 100:], cache=cache, use_cache=True).logits).all()


def test_bad_inputs_to_the_call_raise_clear_errors():
    layer = layer_with(CONFIGS["default"], 300, seed=1)
    q = torch.randn(1, H_KV * G, D)
    keys, values = [layer.host.keys], [layer.host.values]
    lists = [torch.zeros(H_KV, 4, 8, dtype=torch.int32)]

    def call(fn=ops.host_step, **changes):
        args = (
            dict(
                q=q,
                near=torch.zeros(1, H_KV, 2, dtype=torch.int64),
                blocks=torch.full((1, H_KV, 1), -1),
                ranges=torch.zeros(1, 3, 2, dtype=torch.int64),
                lists=lists,
                lse=torch.zeros(1, H_KV * G),
                threshold=0.0,
                qq_limit=8,
                qq_prefix=32,
            )
            | changes
        )
        if fn is ops.host_step_prepared:  # one number per sequence, in the kernel's types
            for name, dtype in (("threshold", np.float32), ("qq_limit", np.int64), ("qq_prefix", np.int64)):
                if not isinstance(args[name], np.ndarray):
                    args[name] = np.full(1, args[name], dtype=dtype)
        return fn(
            args["q"],
            keys,
            values,
            args["lists"],
            args["near"],
            args["blocks"],
            args["ranges"],
            args["lse"],
            *([args["threshold"]] if fn is ops.host_step_prepared else []),
            scale=args.get("scale", SCALE),
            **({} if fn is ops.host_step_prepared else {"threshold": args["threshold"]}),
            qq_limit=args["qq_limit"],
            qq_prefix=args["qq_prefix"],
            block_size=8,
            cap=args.get("cap", 64),
            n_count_blocks=4,
            min_chunk=args.get("min_chunk"),
        )

    ok = call()  # every list holds id 0 alone; threshold 0 reads every candidate
    assert ok.n_read.tolist() == [[1, 1]] and ok.ids[0, :, 0].tolist() == [0, 0] and ok.n_rated.tolist() == [[1, 1]]
    keys[0] = layer.host.keys.clone().index_fill_(1, torch.tensor([0]), math.nan)  # a NaN key: its weight is NaN,
    assert call().n_read.tolist() == [[0, 0]]  # not >= the threshold, and the rule does not read it (the kernel did)
    keys[0] = layer.host.keys
    with pytest.raises(IndexError, match="list row 4"):
        call(near=torch.full((1, H_KV, 2), 4))
    with pytest.raises(IndexError, match="list entry"):
        call(lists=[torch.full((H_KV, 4, 8), layer.host.n, dtype=torch.int32)])
    with pytest.raises(IndexError, match="not a full block"):
        call(blocks=torch.full((1, H_KV, 1), layer.host.n // 8))
    with pytest.raises(IndexError, match="range"):
        call(ranges=torch.tensor([[[0, layer.host.n + 1], [0, 0], [0, 0]]]))
    with pytest.raises(IndexError, match="exceed cap"):
        call(ranges=torch.tensor([[[0, 0], [0, 0], [0, 100]]]))
    with pytest.raises(ValueError, match="threshold"):
        call(threshold=math.nan)
    with pytest.raises(ValueError, match="min_chunk"):
        call(min_chunk=0)
    with pytest.raises(ValueError, match="cap and n_count_blocks must be >= 0"):
        call(cap=-1)
    with pytest.raises(ValueError, match="qq_limit and qq_prefix must be >= 0"):
        call(qq_limit=-1)
    with pytest.raises(ValueError, match="qq_prefix must hold one number per sequence"):
        call(qq_prefix=[32, 32])
    with pytest.raises(ValueError, match="qq_limit must hold int64 numbers"):
        call(qq_limit=8.5)
    with pytest.raises(ValueError, match="near must be int64|ids must be an integer"):
        call(near=torch.zeros(1, H_KV, 2))
    with pytest.raises(ValueError, match="lists must hold|expected one item per sequence"):
        call(lists=lists * 2)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="q contains NaN or inf"):
            call(q=q.clone().index_fill_(2, torch.tensor([3]), bad))

    # The prepared call (a decode step's) converts and checks nothing in Python: the kernel's own
    # checks must still turn every wrong type, layout or value away, and a right call give the same.
    prepared = call(ops.host_step_prepared)
    assert all(torch.equal(a, b) for a, b in zip(prepared, ok))
    wrong = [
        (dict(q=q.double()), "q must be float32"),
        (dict(q=q.transpose(1, 2).contiguous().transpose(1, 2)), "q must be contiguous"),
        (dict(q=q.clone().index_fill_(1, torch.tensor([2]), math.inf)), "q contains NaN or inf"),
        (dict(near=torch.zeros(1, H_KV, 2, dtype=torch.int32)), "near must be int64"),
        (dict(blocks=torch.full((1, H_KV, 2), -1)[:, :, ::2]), "blocks must be contiguous"),
        (dict(ranges=torch.zeros(1, 3, 2, dtype=torch.int32)), "ranges must be int64"),
        (dict(lists=[torch.zeros(H_KV, 4, 8, dtype=torch.int64)]), "int32"),
        (dict(lse=torch.zeros(1, H_KV * G, dtype=torch.float64)), "lse must be float32"),
        (dict(threshold=np.full(1, math.nan, dtype=np.float32)), "threshold of sequence 0 is NaN"),
        (dict(threshold=np.zeros(2, dtype=np.float32)), "threshold"),
        (dict(qq_limit=np.full(1, 8, dtype=np.int32)), "qq_limit must be int64"),
        (dict(qq_prefix=np.full(2, 32, dtype=np.int64)), "qq_prefix: dimension 0 is 2, expected 1"),
        (dict(qq_limit=np.full(1, -1, dtype=np.int64)), "sequence 0: qq_limit and qq_prefix must be >= 0"),
        # a NaN lse kept every candidate (each comparison of the rating false), where the rule reads none
        (dict(lse=torch.zeros(1, H_KV * G).index_fill_(1, torch.tensor([1]), math.nan)), "lse contains NaN"),
        # no query heads: the rating's mean over G = 0 heads was 0 / 0, the scores a former call's
        (dict(q=q[:, :0].contiguous(), lse=torch.zeros(1, 0)), "no query heads"),
        (dict(scale=math.nan), "scale must be finite"),  # the prepared call passes it on unchecked
    ]
    for changes, message in wrong:
        with pytest.raises(ValueError, match=message):
            call(ops.host_step_prepared, **changes)


def test_to_host_keeps_every_tensor_as_it_was():
    tensors = [
        torch.randn(3),  # fp32 first: the int64 ones after it go first in the copy, to stay aligned
        torch.arange(6).view(2, 3),
        torch.tensor([1.5, -0.0, math.nan, -math.inf]),
        torch.empty(2, 0, dtype=torch.int64),
        torch.tensor([[True, False]]),
        torch.randn(1, 2),
    ]
    assert host.to_host(tensors) is tensors  # on the CPU already: nothing copied
    copies = []
    back = host.packed_copy(tensors, lambda flat: copies.append(flat.dtype) or flat.clone())
    assert copies == [torch.uint8]  # one copy of all their bytes
    assert [(t.dtype, t.shape) for t in back] == [(t.dtype, t.shape) for t in tensors]
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(back, tensors))  # to the bit
    if torch.cuda.is_available():
        back = host.to_host([t.cuda() for t in tensors])
        assert all(torch.equal(a, b) and a.device.type == "cpu" for a, b in zip(back, tensors))


def test_the_calls_results_reach_the_device_in_one_copy(monkeypatch):
    """out, lse and the reads per block lie end to end in one buffer, so a step takes them to its
    device in one copy (three copies for results that lie apart), each as it was, to the bit."""
    results, prepared = [], ops.host_step_prepared
    monkeypatch.setattr(ops, "host_step_prepared", lambda *a, **k: results.append(prepared(*a, **k)) or results[-1])
    decode_step(layer_with(CONFIGS["default"], 900, seed=3), queries(3), SCALE)
    res = results[0]
    parts = (res.out, res.lse, res.block_reads)
    assert res.block_reads.any() and all(a is b for a, b in zip(res.on(torch.device("cpu")), parts))

    def copies(result):
        with OpCounter() as counted:  # the operations a step dispatches (bench.speed.device_ops)
            moved = result.on(torch.device("meta"))
        assert [(t.shape, t.dtype, t.device.type) for t in moved] == [(t.shape, t.dtype, "meta") for t in parts]
        return sum(n for (_, name), n in counted.counts.items() if "copy" in name)

    assert copies(res) == 1
    assert copies(res._replace(block_reads=res.block_reads.clone())) == 3  # apart: one copy each
    flat = torch.cat([t.reshape(-1).view(torch.float32) for t in parts])  # the reads' bits as fp32
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(ops.split_like(flat, parts), parts))


def test_a_batch_mixes_sequences_with_and_without_a_key_index():
    """A short sequence, whose host store holds less than a block (no key index yet), decodes in a
    batch with indexed ones as it does alone."""
    cfg = CONFIGS["default"]
    short = HybridCache(MODEL, cfg, progress=False).layers[0]
    short.load_kv(*structured_kv(cfg.resident_tokens + 5, 4))  # 5 host tokens: fewer than a block
    seqs = [layer_with(cfg, 600, seed=2), short]
    q = queries(4, batch=2)
    together = batch_decode_step(seqs, q, SCALE)
    assert short.key_index is None and short.stats.gathered == H_KV * 5  # its host tokens, read in full
    for b, seq in enumerate(seqs):
        torch.testing.assert_close(together[b], decode_step(seq, q[b], SCALE), atol=1e-6, rtol=1e-6)


def test_lists_beyond_int32_raise_rather_than_wrap():
    layer = layer_with(CONFIGS["default"], 300, seed=1)
    with pytest.raises(ValueError, match="beyond int32"):
        ops.host_step(
            torch.randn(1, H_KV * G, D), [layer.host.keys], [layer.host.values],
            [torch.full((H_KV, 2, 4), 2**32, dtype=torch.int64)], torch.zeros(1, H_KV, 1, dtype=torch.int64),
            torch.full((1, H_KV, 1), -1), torch.zeros(1, 3, 2, dtype=torch.int64), torch.zeros(1, H_KV * G),
            scale=SCALE, threshold=0.0, qq_limit=8, qq_prefix=32, block_size=8, cap=64, n_count_blocks=4,
        )  # fmt: skip


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("name", ["default", "mean blocks", "fixed", "keys only", "block", "no estimate"])
def test_stacked_device_parts_give_each_sequence_what_it_gets_alone(name, levels, monkeypatch):
    """The device parts of a batch stacked (`native_step(stack=True)`, a GPU's default): sequences of
    different lengths (blocks, superblocks, blocks asked for) padded into one set of kernels read and
    attend as each does on its own buffers; a sequence with no full block and no key index yet runs
    apart (with blocks alone in one level, nothing else differs: then with them)."""
    from engine.decode import estimate
    from engine.decode.step import native_step

    if levels == 2:  # superblocks of 4 blocks, 3 expanded: every long sequence scores in two levels
        monkeypatch.setattr(estimate, "GROUP", 4)
        monkeypatch.setattr(estimate, "EXPAND", 3)
    cfg = CONFIGS[name]
    seqs = [layer_with(cfg, n, seed=n, later=later) for n, later in ((500, 0), (800, 9), (650, 40))]
    short = HybridCache(MODEL, cfg, progress=False).layers[0]
    short.load_kv(*structured_kv(cfg.resident_tokens + 5, 4))  # 5 host tokens: no key index, no full block
    seqs.insert(1, short)
    if cfg.estimate:
        assert [s.summary.two_level() for s in seqs] == [levels == 2, False, levels == 2, levels == 2]
    groups = host.groups(seqs, stack=True)
    assert sorted(sum(groups, [])) == [0, 1, 2, 3] and len(groups) == (1 if name == "block" and levels == 1 else 2)
    q = queries(11, batch=len(seqs))
    stacked = native_step(seqs, q, SCALE, stack=True)
    read = [(s.stats.read_ids.clone(), s.stats.gathered, s.stats.estimated, s.stats.scanned) for s in seqs]
    alone = native_step(seqs, q, SCALE, stack=False)
    for b, seq in enumerate(seqs):
        ids, gathered, estimated, scanned = read[b]
        assert torch.equal(ids, seq.stats.read_ids)
        assert (gathered, estimated, scanned) == (seq.stats.gathered, seq.stats.estimated, seq.stats.scanned)
        torch.testing.assert_close(stacked[b], alone[b], atol=1e-5, rtol=1e-5)
