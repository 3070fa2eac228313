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
