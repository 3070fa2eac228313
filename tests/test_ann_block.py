"""Device landmark index: landmarks against a plain reference, odd lengths, the tail rule, GQA batching."""

import numpy as np
import pytest
import torch

from ann.block import LANDMARKS, BlockIndex, BlockKeyIndex
from tests.ann_helpers import assert_exact, assert_valid, clustered


def ref_landmarks(keys: torch.Tensor, b: int):
    """keys [H, n, D] -> mean, min, max of each full block [H, n // b, D]."""
    nb = keys.shape[1] // b
    blk = keys[:, : nb * b].reshape(keys.shape[0], nb, b, keys.shape[2])
    return blk.mean(2), blk.amin(2), blk.amax(2)


@pytest.mark.parametrize("n", [5, 16, 27, 61, 97])
@pytest.mark.parametrize("landmark", ["mean", "minmax"])
def test_piecewise_adds_equal_reference(n, landmark):
    g = torch.Generator().manual_seed(n)
    keys = torch.randn(3, n, 8, generator=g)
    idx = BlockIndex(3, 8, block_size=16, landmark=landmark, capacity=16)  # forces growth
    s = 0
    for step in [1, 2, 13, 1, 40, 100]:  # uneven pieces across block borders
        if s >= n:
            break
        idx.add(keys[:, s : s + step])
        s += step
    assert len(idx) == n and idx.n_blocks == n // 16
    mean, lo, hi = ref_landmarks(keys, 16)
    if landmark == "mean":
        torch.testing.assert_close(idx._lm[0, :, : idx.n_blocks], mean)
    else:
        torch.testing.assert_close(idx._lm[0, :, : idx.n_blocks], lo)
        torch.testing.assert_close(idx._lm[1, :, : idx.n_blocks], hi)
    one_by_one = BlockIndex(3, 8, block_size=16, landmark=landmark, capacity=16)  # as decode steps add them
    for i in range(n):
        one_by_one.add(keys[:, i : i + 1])
    assert len(one_by_one) == n and torch.equal(one_by_one.landmarks, idx.landmarks)
    assert torch.equal(one_by_one._tail[:, : n % 16], keys[:, n - n % 16 :])  # the block still filling
    # with room for every block: laid out anew within one allocation, each add moving the heads' rows
    roomy = BlockIndex(3, 8, block_size=16, landmark=landmark, capacity=n)
    nbytes = roomy.nbytes
    for i in range(n):
        roomy.add(keys[:, i : i + 1])
        assert roomy.landmarks.is_contiguous() and roomy.nbytes == nbytes  # packed heads, no new allocation
    assert torch.equal(roomy.landmarks, idx.landmarks) and idx.landmarks.is_contiguous()


@pytest.mark.parametrize("landmark", ["mean", "minmax"])
def test_select_returns_best_blocks_then_tail(landmark):
    g = torch.Generator().manual_seed(0)
    h, gq, d, b, n = 2, 3, 8, 4, 45  # 11 full blocks, a tail of 1
    keys = torch.randn(h, n, d, generator=g)
    q = torch.randn(h, gq, d, generator=g)
    idx = BlockIndex(h, d, block_size=b, landmark=landmark)
    idx.add(keys)
    ids = idx.select(q, 3)
    assert ids.dtype == torch.int64 and ids.shape == (h, 3 * b + 1)
    assert (ids[:, -1] == 44).all(), "the tail token is always a candidate"
    assert idx.scanned == h * gq * 11
    mean, lo, hi = ref_landmarks(keys, b)
    for head in range(h):
        if landmark == "mean":
            s = q[head] @ mean[head].T  # [G, nb]
        else:
            s = torch.maximum(q[head][:, None] * lo[head][None], q[head][:, None] * hi[head][None]).sum(-1)
        s = (s - s.amax(1, keepdim=True)).amax(0)
        want = set(torch.topk(s, 3).indices.tolist())
        got = set((ids[head, : 3 * b] // b).tolist())
        assert got == want
        blocks = ids[head, : 3 * b].reshape(3, b)
        assert (blocks == blocks[:, :1] + torch.arange(b)).all(), "whole blocks of consecutive tokens"


@pytest.mark.parametrize("landmark", ["mean", "minmax"])
def test_select_among_some_blocks_scores_only_those(landmark):
    g = torch.Generator().manual_seed(3)
    h, gq, d, b = 2, 3, 8, 4
    keys, q = torch.randn(h, 80, d, generator=g), torch.randn(h, gq, d, generator=g)  # 20 full blocks
    idx = BlockIndex(h, d, block_size=b, landmark=landmark)
    idx.add(keys)
    scored = torch.stack([torch.randperm(20, generator=g)[:7] for _ in range(h)])  # each head its own 7 blocks
    ids = idx.select(q, 2, scored=scored)
    assert ids.shape == (h, 2 * b) and idx.scanned == h * gq * 7
    mean, lo, hi = ref_landmarks(keys, b)
    for head in range(h):
        blocks = scored[head]
        if landmark == "mean":
            s = q[head] @ mean[head, blocks].T  # [G, 7]
        else:
            qe = q[head][:, None]
            s = torch.maximum(qe * lo[head, blocks][None], qe * hi[head, blocks][None]).sum(-1)
        want = set(blocks[torch.topk((s - s.amax(1, keepdim=True)).amax(0), 2).indices].tolist())
        assert set((ids[head] // b).tolist()) == want


def test_minmax_bound_holds_for_every_key():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 64, 8, generator=g)
    q = torch.randn(1, 1, 8, generator=g)
    idx = BlockIndex(1, 8, block_size=8, landmark="minmax")
    idx.add(keys)
    idx_bound = idx.block_scores(q)  # shifted by the best block's bound
    lo, hi = ref_landmarks(keys, 8)[1:]
    bound = torch.maximum(q[0] * lo[0], q[0] * hi[0]).sum(-1)  # [nb]
    true_max = (keys[0] @ q[0, 0]).reshape(8, 8).amax(1)
    assert (bound >= true_max - 1e-5).all()
    torch.testing.assert_close(idx_bound[0], bound - bound.max())


def test_heads_are_independent():
    g = torch.Generator().manual_seed(2)
    keys, q = torch.randn(3, 50, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    both = BlockIndex(3, 8, block_size=8)
    both.add(keys)
    ids = both.select(q, 2)
    for h in range(3):
        one = BlockIndex(1, 8, block_size=8)
        one.add(keys[h : h + 1])
        torch.testing.assert_close(one.select(q[h : h + 1], 2)[0], ids[h])


def test_short_context_and_errors():
    idx = BlockIndex(2, 4, block_size=16)
    idx.add(torch.randn(2, 5, 4))
    ids = idx.select(torch.randn(2, 1, 4), 10)  # no full block yet: the tail is everything
    assert ids.tolist() == [list(range(5))] * 2
    with pytest.raises(ValueError, match=r"keys must have shape \[2, n, 4\]"):
        idx.add(torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match=r"q must have shape \[2, G, 4\]"):
        idx.select(torch.randn(2, 1, 5), 1)
    with pytest.raises(TypeError, match="floating point"):
        idx.add(torch.ones(2, 1, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown landmark 'median'"):
        BlockIndex(1, 4, landmark="median")


def test_key_index_wrapper_reranks_exactly():
    keys, _, tq = clustered(n_keys=97, n_test=4)
    idx = BlockKeyIndex(keys.shape[1], block_size=16, frac=1.0)
    idx.build(keys)
    res = idx.search(tq, 10)
    assert_valid(res, 97, 4, 10)
    assert_exact(res, keys, tq, 10)
    part = BlockKeyIndex(keys.shape[1], block_size=16, n_blocks=1)
    part.build(keys)
    res = part.search(tq, 10)
    assert res.keys_scored == 4 * (16 + 1)  # one block and the tail token, per query
    assert res.scanned == res.keys_scored + 4 * 6  # plus the 6 landmarks each query scored
    np.testing.assert_array_equal(np.sort(res.ids[0]) >= 0, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_head_matmul_takes_packed_and_strided_heads(dtype):
    """Heads with spare capacity between them (packed first in half precision, head by head in
    fp32) and packed ones (batched) give the same products, as keys [H, D, n] and as values [H, n, D]."""
    from ann.block import _pack, _packed, head_matmul

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 16, generator=g).to(dtype)
    weights = torch.randn(3, 4, 20, generator=g).to(dtype)
    buffer = torch.randn(3, 50, 16, generator=g).to(dtype)
    strided, packed = buffer[:, :20], buffer[:, :20].contiguous()
    assert not _packed(strided.transpose(1, 2)) and _packed(packed.transpose(1, 2)) and _packed(q)
    assert _packed(_pack(strided.transpose(1, 2))) and _pack(strided.transpose(1, 2)).stride(1) == 1  # still transposed
    expected = torch.bmm(q.double(), packed.double().transpose(1, 2))
    expected_values = torch.bmm(weights.double(), packed.double())
    for rows in (strided, packed):
        torch.testing.assert_close(head_matmul(q, rows.transpose(1, 2)).double(), expected, atol=0.05, rtol=0.02)
        torch.testing.assert_close(head_matmul(weights, rows).double(), expected_values, atol=0.05, rtol=0.02)
    assert torch.equal(strided, packed)  # the operands are not written


@pytest.mark.parametrize("landmark", ["mean", "minmax"])
def test_blocks_chosen_together_are_each_index_its_own(landmark):
    """Indexes with different numbers of blocks and blocks asked for, chosen in one set of
    products (padded and masked): each gets what it chooses alone, -1 after it; with `scored`
    the same among the blocks each one lists. (The order among ties may differ: each query
    head's best block scores 0 for its group.)"""
    from ann.block import choose_blocks

    g = torch.Generator().manual_seed(1)
    H, G, D, B = 2, 3, 8, 4
    indexes = []
    for n in (40, 97, 64):
        index = BlockIndex(H, D, block_size=B, landmark=landmark, capacity=16)
        index.add(torch.randn(H, n, D, generator=g))
        indexes.append(index)
    q = torch.randn(3, H, G, D, generator=g)
    counts = [3, 7, 30]  # the last asks for more than it holds
    chosen = choose_blocks(indexes, q, counts)
    for b, index in enumerate(indexes):
        alone = index.choose(q[b], counts[b])
        assert torch.equal(chosen[b, :, : alone.shape[1]].sort().values, alone.sort().values)
        assert bool((chosen[b, :, alone.shape[1] :] == -1).all())
    n_scored = [5, 9, 2]
    scored = torch.stack([torch.randperm(9, generator=g)[:9].expand(H, -1) for _ in indexes])  # [3, H, 9]
    chosen = choose_blocks(indexes, q, counts, scored=scored, n_scored=n_scored)
    for b, index in enumerate(indexes):
        alone = index.choose(q[b], counts[b], scored=scored[b, :, : n_scored[b]])
        assert torch.equal(chosen[b, :, : alone.shape[1]].sort().values, alone.sort().values)
        assert bool((chosen[b, :, alone.shape[1] :] == -1).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_head_rows_copies_each_heads_rows_and_shares_ids_across_leading_dims(dtype):
    """head_rows against indexing row by row, to the bit and in the buffer's dtype: a buffer with
    spare rows, -1 reading row 0, and ids [B, H, M] broadcast over a leading dim of the buffer
    (both landmarks of minmax in one gather)."""
    from ann.block import head_rows

    g = torch.Generator().manual_seed(3)
    L, B, H, N, D, M = 2, 3, 4, 11, 5, 6
    buffer = torch.randn(L, B, H, N + 7, D, generator=g)[..., :N, :].to(dtype).contiguous()  # rows contiguous
    spare = torch.randn(L, B, H, N + 7, D, generator=g).to(dtype)  # spare rows past N: still each head's own
    buffer[0, 0, 0, 1, 0] = float("nan")  # a NaN and a negative zero keep their bits
    buffer[0, 0, 0, 2, 1] = -0.0
    ids = torch.randint(-1, N, (B, H, M), generator=g)
    ids[0, 0, :2] = torch.tensor([1, 2])
    for buf in (buffer, spare):
        rows = head_rows(buf, ids)
        assert rows.shape == (L, B, H, M, D) and rows.dtype == dtype
        bits = rows.view(torch.int16 if dtype != torch.float32 else torch.int32)
        for lm, b, h, m in np.ndindex(L, B, H, M):
            assert torch.equal(bits[lm, b, h, m], buf[lm, b, h, max(0, int(ids[b, h, m]))].view(bits.dtype))
        assert torch.equal(head_rows(buf[1], ids), rows[1])  # ids of the buffer's own shape


def test_columns_beyond_each_sequences_length():
    from ann.block import beyond, masked

    expected = torch.tensor([[False, False, True], [True, True, True], [False, False, False]])
    assert torch.equal(beyond([2, 0, 3], 3, torch.device("cpu"), 2), expected)
    assert beyond([2, 0, 3], 3, torch.device("cpu"), 4).shape == (3, 1, 1, 3)
    scores = torch.zeros(3, 2, 3)
    assert torch.equal(torch.isinf(masked(scores, [2, 0, 3])), expected[:, None].expand(3, 2, 3))
    assert masked(scores, [3, 3, 3]) is scores  # nothing past any length: no operation


def test_host_values_reach_the_device_as_they_are():
    from ann.block import to_device

    cpu = torch.device("cpu")
    assert torch.equal(to_device([3, 1, 2], cpu), torch.tensor([3, 1, 2]))
    ids = to_device(np.array([5, 7], dtype=np.int64), cpu)
    assert ids.dtype == torch.int64 and ids.tolist() == [5, 7]
    mask = torch.tensor([True, False, True])
    assert torch.equal(to_device(mask.nonzero()[:, 0], cpu), torch.tensor([0, 2]))


def test_the_decode_step_and_the_prefill_make_no_device_tensor_from_host_values():
    """On a GPU, `torch.tensor(values, device=...)` or `torch.from_numpy(values).to(device)` copies
    from pageable memory, and that copy first waits for every kernel queued before it: a sync in
    the middle of a step, which no run on a CPU shows. The modules a decode step or a prefill chunk
    runs through send such values through `to_device` (pinned memory, a non-blocking copy) instead."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    step = ("step", "host", "select", "estimate", "merge", "rate")
    cache = ("layer", "batch", "store")
    modules = ["ann/block.py", "ann/qq.py", "engine/attention.py"]
    modules += [*(f"engine/decode/{name}.py" for name in step), *(f"engine/cache/{name}.py" for name in cache)]
    pattern = re.compile(r"torch\.(tensor|as_tensor)\(.*device=|torch\.from_numpy\(.*\)\.to\(")
    found = [
        f"{module}:{i}"
        for module in modules
        for i, line in enumerate((root / module).read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []


@pytest.mark.parametrize("landmark", ["mean", "minmax"])
@pytest.mark.parametrize("at", [0, 8, 29])
def test_rewind_takes_the_index_back_to_its_mark(landmark, at):
    """Tokens added after a mark (blocks filled, storage grown) are dropped: the index is the one that
    only ever held the first `at`, landmarks and filling block alike, and takes the same tokens again."""
    keys = torch.randn(3, 200, 8, generator=torch.Generator().manual_seed(at))
    index = BlockIndex(3, 8, block_size=8, landmark=landmark, capacity=16)
    index.add(keys[:, :at])
    mark = index.mark()
    for _ in range(2):
        index.add(keys[:, at:170])
        index.rewind(mark)
        fresh = BlockIndex(3, 8, block_size=8, landmark=landmark, capacity=16)
        fresh.add(keys[:, :at])
        assert index.n == at and torch.equal(index.landmarks, fresh.landmarks)
        index.add(keys[:, at:101])
        fresh.add(keys[:, at:101])
        assert torch.equal(index.landmarks, fresh.landmarks) and index.landmarks.is_contiguous()
        index.rewind(mark)
    index.add(keys[:, at : at + 1])
    with pytest.raises(ValueError, match="cannot go back to"):
        BlockIndex(3, 8, block_size=8, landmark=landmark).rewind(index.mark())


@pytest.mark.parametrize("landmark", LANDMARKS)
def test_an_index_scores_with_the_product_it_is_given(landmark):
    """A BlockIndex given `dots` scores its landmarks with it (an engine passes one faster on its CPU):
    the product of the default scaled by 2 chooses the same blocks, and the scores double; among
    blocks scored alone, the product is handed the landmarks as they lie and the blocks' ids."""
    from ann.block import row_dots

    calls = []

    def doubled(q, rows, ids=None):
        calls.append((rows.shape, None if ids is None else ids.shape))
        return 2 * row_dots(q, rows, ids)

    g = torch.Generator().manual_seed(3)
    keys, q = torch.randn(2, 80, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    plain, given = BlockIndex(2, 8, block_size=8, landmark=landmark), BlockIndex(2, 8, 8, landmark, dots=doubled)
    plain.add(keys)
    given.add(keys)
    torch.testing.assert_close(given.block_scores(q), 2 * plain.block_scores(q))
    assert torch.equal(given.choose(q, 4), plain.choose(q, 4))
    products = 2 if landmark == "minmax" else 1
    assert len(calls) == 2 * products and calls[0] == ((1, 2, 10, 8), None)
    scored = torch.tensor([[7, 1, 4], [0, 9, 2]])
    assert torch.equal(given.choose(q, 2, scored=scored), plain.choose(q, 2, scored=scored))
    assert calls[2 * products :] == [((1, 2, 10, 8), (1, 2, 3))] * products
