import numpy as np

from ann.flat import FlatIndex
from tests.ann_helpers import assert_exact, assert_valid, clustered


def test_flat_is_exact_and_scans_everything():
    keys, _, tq = clustered(n_keys=257, n_test=5)
    idx = FlatIndex(keys.shape[1])
    idx.build(keys)
    res = idx.search(tq, 17)
    assert_valid(res, 257, 5, 17)
    assert_exact(res, keys, tq, 17)
    assert res.scanned == 5 * 257
    one = idx.search(tq[:1], 17)
    assert one.scanned == 257


def test_chunked_scoring_matches_one_pass():
    keys, _, tq = clustered(n_keys=1000, n_test=6)
    whole, parts = FlatIndex(keys.shape[1]), FlatIndex(keys.shape[1], chunk=97)
    whole.build(keys)
    parts.build(keys)
    a, b = whole.search(tq, 25), parts.search(tq, 25)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
    assert_exact(b, keys, tq, 25)


def test_k_equal_n_returns_all_keys():
    keys, _, tq = clustered(n_keys=61, n_test=2)
    idx = FlatIndex(keys.shape[1])
    idx.build(keys[:30])
    idx.add(keys[30:])
    res = idx.search(tq, 61)
    assert sorted(res.ids[0].tolist()) == list(range(61))
