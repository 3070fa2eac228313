import copy

import faiss
import numpy as np

from ann.hnsw import HNSWIndex
from tests.ann_helpers import brute_topk, clustered, recall


def test_recall_and_measured_scan():
    keys, _, tq = clustered(n_keys=4000, n_test=32)
    truth, _ = brute_topk(keys, tq, 10)
    idx = HNSWIndex(keys.shape[1], M=16, ef=64)
    idx.build(keys)
    res = idx.search(tq, 10)
    assert recall(res.ids, truth) >= 0.9
    assert 0 < res.scanned < 0.5 * 32 * 4000


def test_incremental_adds_equal_batch_build_results():
    keys, _, tq = clustered(n_keys=500, n_test=8)
    a, b = HNSWIndex(keys.shape[1], ef=500), HNSWIndex(keys.shape[1], ef=500)
    a.build(keys)
    b.build(keys[:100])
    for s in range(100, 500, 7):
        b.add(keys[s : s + 7])
    np.testing.assert_allclose(a.search(tq, 10).scores, b.search(tq, 10).scores, rtol=1e-5)


def test_bad_parameters():
    import pytest

    with pytest.raises(ValueError, match="M > 1"):
        HNSWIndex(8, M=1)


def test_a_copy_adds_keys_as_the_original_does():
    """A prefix's mark and rewind copy the index: keys added to the copy take the levels, so the graph and
    the results, that they take in the original (faiss's level generator is not part of a copy)."""
    rng = np.random.default_rng(13)
    keys, more = (rng.standard_normal((n, 16)).astype(np.float32) for n in (3000, 2000))
    queries = rng.standard_normal((50, 16)).astype(np.float32)
    original = HNSWIndex(16, M=8, ef=16)
    original.build(keys)
    copied = copy.deepcopy(original)
    original.add(more)
    copied.add(more)
    levels = [faiss.vector_to_array(index.index.hnsw.levels) for index in (original, copied)]
    assert np.array_equal(*levels)
    got, want = copied.search(queries, 10), original.search(queries, 10)
    assert np.array_equal(got.ids, want.ids) and got.scanned == want.scanned
    other_seed = HNSWIndex(16, M=8, ef=16, seed=1)
    other_seed.build(keys)
    assert not np.array_equal(faiss.vector_to_array(other_seed.index.hnsw.levels), levels[0][: len(keys)])
