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
    got_s = np.sort(idx.list_scores[:50], axis=1)[:, ::-1]
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
    assert (idx.lists == len(keys)).any()
    assert idx.search(new, 1).ids[0, 0] == len(keys)


def test_needs_build_queries(data):
    keys, _, _ = data
    with pytest.raises(ValueError, match="needs build queries"):
        QQIndex(keys.shape[1]).build(keys)
