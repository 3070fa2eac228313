"""Query->query selector: lists, nearest build queries, adds entering lists."""

import numpy as np
import pytest

from ann.qq import QQIndex
from tests.ann_helpers import assert_valid, brute_topk, clustered, recall


@pytest.fixture(scope="module")
def data():
    return clustered(n_keys=2000, n_build=2000, n_test=32, seed=5)


def test_lists_are_exact_topm(data):
    keys, bq, _ = data
    idx = QQIndex(keys.shape[1], m_keys=16)
    idx.build(keys, bq)
    _, want_s = brute_topk(keys, bq[:50], 16)
    got_s = np.sort(idx.lists.list_scores[0, :50].numpy(), axis=1)[:, ::-1]
    np.testing.assert_allclose(got_s, want_s, rtol=1e-4, atol=1e-3)


def test_recall_grows_with_neighbours(data):
    keys, bq, tq = data
    truth, _ = brute_topk(keys, tq, 20)
    idx = QQIndex(keys.shape[1], m_keys=32, n_neighbors=2)
    idx.build(keys, bq)
    r = []
    for nn in (2, 8, 32):
        idx.n_neighbors = nn
        res = idx.search(tq, 20)
        assert_valid(res, len(keys), len(tq), 20)
        r.append(recall(res.ids, truth))
    assert r == sorted(r) and r[-1] >= 0.9
    assert res.scanned > res.keys_scored  # the build queries scored are counted too


def test_added_key_enters_lists_of_queries_that_want_it(data):
    keys, bq, _ = data
    idx = QQIndex(keys.shape[1], m_keys=16, n_neighbors=8)
    idx.build(keys, bq)
    new = bq[:1] * 3  # scores highest with build queries pointing its way
    idx.add(new)
    assert (idx.lists.lists == len(keys)).any()
    assert idx.search(new, 1).ids[0, 0] == len(keys)


def _enter_one_by_one(lists, n_keys: int, keys):
    """QueryLists.add's rule written plainly: key after key, head after head, each of its n_add
    nearest build queries' lists, best first, takes it where it beats the last entry: that entry drops
    out and the key goes after the entries it does not beat."""
    import torch

    from ann.qq import _unit

    ids, scores = lists.lists.clone(), lists.list_scores.clone()
    near = torch.topk(torch.bmm(_unit(keys), lists.queries.transpose(1, 2)), lists.n_add, dim=2).indices
    for i in range(keys.shape[1]):
        for h in range(keys.shape[0]):
            for r in near[h, i].tolist():
                logit = float(lists.raw[h, r] @ keys[h, i])
                if logit > scores[h, r, -1]:
                    at = int((scores[h, r] >= logit).sum())
                    ids[h, r] = torch.cat(
                        [ids[h, r, :at], torch.tensor([n_keys + i], dtype=ids.dtype), ids[h, r, at:-1]]
                    )
                    scores[h, r] = torch.cat([scores[h, r, :at], torch.tensor([logit]), scores[h, r, at:-1]])
    return ids, scores


def test_added_keys_enter_lists_one_after_another():
    """Keys added together take slots as if added one by one: on integer data, with many equal
    logits and lists with empty slots, the lists and their logits equal the plain rule's."""
    import torch

    from ann.qq import QueryLists

    g = torch.Generator().manual_seed(3)
    H, D, n_keys = 2, 8, 6  # lists of 8 slots with 6 keys: two empty (-inf) slots each
    lists = QueryLists(H, D, m_keys=8, n_add=5)
    keys, queries = (torch.randint(-2, 3, (H, n, D), generator=g).float() for n in (n_keys, 40))
    lists.build(keys, queries)
    for step in range(3):
        # few directions, so that several keys of one call aim at the same lists and tie there
        new = torch.randint(-1, 2, (H, 12, D), generator=g).float()
        want = _enter_one_by_one(lists, lists.n_keys, new)
        lists.add(new)
        assert torch.equal(lists.lists, want[0]) and torch.equal(lists.list_scores, want[1]), step
        assert (lists.list_scores[..., :-1] >= lists.list_scores[..., 1:]).all(), step  # best first
    assert (lists.lists >= n_keys + 12).any()  # later calls' keys entered too


def test_a_key_added_stands_first_in_the_lists_whose_entries_it_beats():
    """The proposals' cut to a budget takes a prefix of each list: a key added that beats a list's every
    entry comes first in it, and first among the candidates of a query nearest that list."""
    import torch

    from ann.qq import QueryLists

    g = torch.Generator().manual_seed(0)
    keys, queries = torch.randn(1, 200, 16, generator=g), torch.randn(1, 6, 16, generator=g)
    lists = QueryLists(1, 16, m_keys=8, n_add=6)
    lists.build(keys, queries)
    lists.add(10 * queries[:, :1])  # by far the best key of build query 0's list
    assert lists.lists[0, 0, 0] == 200 and (lists.list_scores[..., :-1] >= lists.list_scores[..., 1:]).all()
    assert lists.candidates(queries[:, :1], n_neighbors=1)[0, 0] == 200


def test_needs_build_queries(data):
    keys, _, _ = data
    with pytest.raises(ValueError, match="needs build queries"):
        QQIndex(keys.shape[1]).build(keys)


def test_batched_heads_match_single_heads():
    import torch

    from ann.qq import QueryLists

    heads = [clustered(n_keys=500, n_build=300, n_test=4, seed=s) for s in range(3)]
    keys = torch.stack([torch.from_numpy(h[0]) for h in heads])  # [3, 500, D]
    bq = torch.stack([torch.from_numpy(h[1]) for h in heads])
    q = torch.stack([torch.from_numpy(h[2][:2]) for h in heads])  # [3, G=2, D]
    batched = QueryLists(3, keys.shape[2], m_keys=8, n_neighbors=4)
    batched.build(keys, bq)
    batched.add(keys[:, :5] * 2)  # five new keys per head
    got = batched.candidates(q)
    for h in range(3):
        one = QQIndex(keys.shape[2], m_keys=8, n_neighbors=4)
        one.build(heads[h][0], heads[h][1])
        one.add(heads[h][0][:5] * 2)
        ids, scanned, _ = one.candidates(heads[h][2][:2])
        assert ids.tolist() == got[h].tolist()
    assert batched.scanned == 3 * 2 * 300


def test_bad_shapes_are_refused():
    import torch

    from ann.qq import QueryLists

    lists = QueryLists(2, 8)
    with pytest.raises(ValueError, match=r"keys must have shape \[2, N, 8\]"):
        lists.build(torch.zeros(3, 10, 8), torch.zeros(2, 5, 8))
    with pytest.raises(ValueError, match="needs build queries"):
        lists.build(torch.zeros(2, 10, 8), torch.zeros(2, 0, 8))
    with pytest.raises(RuntimeError, match="search before build"):
        lists.candidates(torch.zeros(2, 1, 8))


def test_exact_topm_paths_agree():
    """The CPU path (numba row selection) and the path every other device takes (torch.topk)
    give the same lists."""
    import torch

    from ann.qq import topk_keys

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 300, 16, generator=g), torch.randn(2, 700, 16, generator=g)
    s_cpu, i_cpu = topk_keys(q, k, 10)
    sim = torch.bmm(q, k.transpose(1, 2))
    top = torch.topk(sim, 10, dim=2)
    torch.testing.assert_close(s_cpu, top.values, atol=1e-4, rtol=1e-4)
    assert (i_cpu == top.indices).float().mean() > 0.999  # ties may order differently
    s_chunks, i_chunks = topk_keys(q, k, 10, chunk=7)  # chunks that do not divide the queries: the same lists
    assert torch.equal(i_chunks, i_cpu)
    torch.testing.assert_close(s_chunks, s_cpu)  # the BLAS may block a product of another shape differently


def test_cpu_build_products_take_many_queries_at_once_within_the_score_buffer():
    """A product reads every key: at long contexts it takes CPU_PRODUCT_ROWS build queries at
    once (where a fixed score budget left 8 at 131K keys and 16 at 32K), its scores still within
    SCORE_BUFFER; at few keys, as many as CPU_SCORE_CHUNK scores hold."""
    from ann.qq import CPU_PRODUCT_ROWS, CPU_SCORE_CHUNK, SCORE_BUFFER, cpu_query_rows

    for n in (32768, 131072, 1 << 20):
        rows = cpu_query_rows(n)
        assert rows >= min(CPU_PRODUCT_ROWS, SCORE_BUFFER // n) and rows * n <= SCORE_BUFFER
    assert cpu_query_rows(131072) >= 64 and cpu_query_rows(32768) >= 64
    assert cpu_query_rows(300) == CPU_SCORE_CHUNK // 300 and cpu_query_rows(1 << 30) == 8


def test_top_rows_matches_sort():
    """Rows with trends, -inf, NaN, repeated values and k == N: the k largest, best first."""
    import numpy as np

    from ann._kernels import top_rows

    rng = np.random.default_rng(0)
    n = 300
    rows = [
        rng.standard_normal(n),
        np.arange(n, dtype=float),  # increasing: every entry beats the last bound
        -np.arange(n, dtype=float),
        np.where(rng.random(n) < 0.5, -np.inf, rng.standard_normal(n)),
        np.full(n, -np.inf),
        np.round(rng.standard_normal(n)),  # many ties
    ]
    scores = np.stack(rows).astype(np.float32)
    for k in (1, 7, 64, n):
        out_s = np.empty((len(rows), k), np.float32)
        out_i = np.empty((len(rows), k), np.int64)
        top_rows(scores, k, out_s, out_i)
        expected = -np.sort(-scores, axis=1)[:, :k]
        np.testing.assert_array_equal(out_s, expected)
        np.testing.assert_array_equal(np.take_along_axis(scores, out_i, 1), out_s)  # ids point at their scores
        assert all(len(set(row)) == k for row in out_i)  # distinct ids

    nan_row = rng.standard_normal((1, n)).astype(np.float32)
    nan_row[0, ::3] = np.nan
    out_s, out_i = np.empty((1, 10), np.float32), np.empty((1, 10), np.int64)
    top_rows(nan_row, 10, out_s, out_i)
    np.testing.assert_array_equal(out_s[0], -np.sort(-nan_row[0][~np.isnan(nan_row[0])])[:10])


def test_precompile_compiles_the_kernels_a_build_and_its_adds_call(monkeypatch):
    """What set-up compiles ahead (ann.precompile) is what a real build and a real add call,
    argument types included: for any other types numba would compile again at the first use."""
    import numba
    import torch

    import ann._kernels as kernels
    from ann.precompile import precompile
    from ann.qq import QueryLists

    seen = []
    for name in ("top_rows", "enter_lists"):
        real = getattr(kernels, name)

        def recording(*args, name=name, real=real):
            seen.append((name, *(numba.typeof(a) for a in args)))
            return real(*args)

        monkeypatch.setattr(kernels, name, recording)
    precompile()
    ahead = set(seen)
    seen.clear()
    lists = QueryLists(2, 16, m_keys=8)  # a model's half-precision keys and queries, as the engine builds
    lists.build(torch.randn(2, 300, 16, dtype=torch.bfloat16), torch.randn(2, 40, 16, dtype=torch.bfloat16))
    store = torch.randn(2, 400, 16, dtype=torch.bfloat16)  # the engine adds a slice of its host store
    lists.add(store[:, 300:332])
    assert len(ahead) == 2 and set(seen) == ahead


def test_cpu_build_keeps_torch_thread_count():
    """numba's OpenMP pool resets the process's thread count; the build puts torch's back."""
    import torch

    from ann.qq import topk_keys

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        topk_keys(torch.randn(2, 50, 8), torch.randn(2, 300, 8), 16)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_stacked_search_gives_each_sequence_its_own_rows():
    """Sequences with different numbers of build queries and of lists to merge, searched in one
    product: each gets the rows it gets alone, -1 after them."""
    import torch

    from ann.qq import QueryLists, stacked_nearest

    g = torch.Generator().manual_seed(0)
    H, G, D = 2, 3, 8
    lists = []
    for n_queries in (40, 25, 40):
        one = QueryLists(H, D, m_keys=4, n_neighbors=6)
        one.build(torch.randn(H, 50, D, generator=g), torch.randn(H, n_queries, D, generator=g))
        lists.append(one)
    q = torch.randn(3, H, G, D, generator=g)
    wanted = [6, 2, 4]
    rows = stacked_nearest(lists, q, wanted)
    assert rows.shape == (3, H, 6 * G)
    for b, one in enumerate(lists):
        alone = one.nearest(q[b], wanted[b])
        assert torch.equal(rows[b, :, : wanted[b] * G], alone)
        assert bool((rows[b, :, wanted[b] * G :] == -1).all())
        assert one.scanned == G * one.n_queries * H


def test_lists_too_large_to_allocate_name_m_keys():
    """The allocator's own error names no option: the lists' size and m_keys are named instead."""
    import torch

    from ann.qq import QueryLists

    lists = QueryLists(2, 8, m_keys=10**12)
    with pytest.raises(ValueError, match=r"m_keys = 1000000000000 keys for 5 build queries x 2 heads"):
        lists.build(torch.zeros(2, 10, 8), torch.zeros(2, 5, 8))


def test_rewind_takes_the_lists_back_to_their_mark(data):
    keys, bq, _ = data
    idx = QQIndex(keys.shape[1], m_keys=16)
    idx.build(keys[:1000], bq)
    lists = idx.lists
    before = lists.lists.clone(), lists.list_scores.clone(), lists.n_keys
    mark = lists.mark()
    for _ in range(2):
        idx.add(keys[1000:])
        assert not np.array_equal(lists.lists.numpy(), before[0].numpy())  # the added keys entered lists
        lists.rewind(mark)
        assert np.array_equal(lists.lists.numpy(), before[0].numpy()) and lists.n_keys == before[2]
        assert np.array_equal(lists.list_scores.numpy(), before[1].numpy())


def test_the_lists_keep_their_own_copy_of_the_build_queries(data):
    keys, bq, _ = data
    mine, theirs = QQIndex(keys.shape[1], n_add=4), QQIndex(keys.shape[1], n_add=4)
    queries = bq[:200].copy()
    mine.build(keys, queries)
    theirs.build(keys, queries.copy())
    queries[:] = 0  # the caller's array, changed after the build: the logits of added keys came from it
    mine.add(2 * keys[:8])
    theirs.add(2 * keys[:8])
    assert np.array_equal(mine.lists.lists.numpy(), theirs.lists.lists.numpy())


def test_a_build_the_lists_refuse_leaves_the_index_as_it_was(data):
    keys, bq, tq = data
    index = QQIndex(keys.shape[1], m_keys=2**40)
    with pytest.raises(ValueError, match="could not be allocated"):
        index.build(keys, bq)
    assert len(index) == 0 and index.lists.n_queries == 0  # not the new keys' store beside no lists
    index = QQIndex(keys.shape[1])
    index.build(keys, bq)
    before = index.search(tq, 10)
    index.lists.m_keys = 2**40
    with pytest.raises(ValueError, match="could not be allocated"):
        index.build(keys[:50], bq)
    assert len(index) == len(keys) and np.array_equal(index.search(tq, 10).ids, before.ids)


def test_n_neighbors_set_later_is_checked(data):
    index = QQIndex(data[0].shape[1])
    with pytest.raises(ValueError, match="n_neighbors must be positive"):
        index.n_neighbors = 0  # searched nothing: every id -1
