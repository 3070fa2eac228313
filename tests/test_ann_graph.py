"""Attention-aware graph: recall against brute force at a small scan, links, incremental adds."""

import numpy as np
import pytest

from ann._kernels import beam_search
from ann.graph import GraphIndex, key_neighbors
from tests.ann_helpers import assert_exact, assert_valid, brute_topk, clustered, recall


@pytest.fixture(scope="module")
def data():
    return clustered(n_keys=3000, n_build=3000, n_test=32, seed=3)


def test_recall_at_a_fraction_of_the_keys(data):
    keys, bq, tq = data
    truth, _ = brute_topk(keys, tq, 20)
    idx = GraphIndex(keys.shape[1], ef=64, n_centroids=32, n_probe=4)
    idx.build(keys, bq)
    res = idx.search(tq, 20)
    assert_valid(res, len(keys), len(tq), 20)
    assert recall(res.ids, truth) >= 0.9
    assert res.keys_scored < 0.3 * len(tq) * len(keys)
    assert res.scanned == res.keys_scored + len(tq) * len(idx.centroids)


def test_graph_structure(data):
    keys, bq, _ = data
    idx = GraphIndex(keys.shape[1], degree=24, spare=4)
    idx.build(keys, bq)
    n = len(keys)
    adj, deg = idx.adj[:n], idx.deg[:n]
    assert (deg <= 24 - 4).all() and (deg > 0).all()
    for u in range(0, n, 97):
        row = adj[u, : deg[u]]
        assert (row >= 0).all() and (row < n).all() and u not in row
        assert len(np.unique(row)) == len(row)
        assert (adj[u, deg[u] :] == -1).all()
        # position links are always kept
        assert (u == 0 or u - 1 in row) and (u == n - 1 or u + 1 in row)


def test_beam_as_wide_as_the_index_is_exact(data):
    keys, bq, tq = data
    idx = GraphIndex(keys.shape[1], ef=len(keys))
    idx.build(keys, bq)
    assert_exact(idx.search(tq, 10), keys, tq, 10)


def test_without_build_queries_keys_stand_in():
    keys, _, tq = clustered(n_keys=500, n_test=8)
    idx = GraphIndex(keys.shape[1], ef=500)
    idx.build(keys)
    assert_exact(idx.search(tq, 5), keys, tq, 5)


def test_many_single_adds_grow_and_stay_searchable(data):
    keys, bq, tq = data
    idx = GraphIndex(keys.shape[1], ef=128, n_centroids=32)
    idx.build(keys[:1000], bq)
    for i in range(1000, 3000, 1):  # the engine adds one evicted key per step
        idx.add(keys[i : i + 1])
    assert len(idx) == 3000 and len(idx.deg) >= 3000
    n = len(idx)
    assert (idx.adj[:n][idx.adj[:n] >= 0] < n).all()
    truth, _ = brute_topk(keys, tq, 20)
    assert recall(idx.search(tq, 20).ids, truth) >= 0.85


def test_key_neighbors_ivf_path_agrees_with_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    approx = key_neighbors(x, 5)
    exact = np.argsort(-(x[:200] @ x.T), axis=1)[:, :5]
    agree = np.mean([len(np.intersect1d(a, b)) / 5 for a, b in zip(approx[:200], exact)])
    assert agree >= 0.7


def test_beam_search_kernel_counts_each_key_once():
    keys = np.eye(4, dtype=np.float32)
    adj = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]], np.int32)  # complete graph
    deg = np.full(4, 3, np.int32)
    stamp = np.zeros(4, np.int32)
    q = np.array([[0, 0, 1, 0.5]], np.float32)
    ids, scores, scored = beam_search(keys, adj, deg, q, np.array([[0, 0]], np.int64), 4, 2, stamp, 1)
    assert ids.tolist() == [[2, 3]] and scored == 4
    np.testing.assert_allclose(scores, [[1.0, 0.5]])


def test_parameter_errors():
    with pytest.raises(ValueError, match="degree > spare"):
        GraphIndex(8, degree=8, spare=8)
    with pytest.raises(ValueError, match="ef must be positive"):
        GraphIndex(8, ef=0)
