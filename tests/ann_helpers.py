"""Shared data and checks for the ann tests: seeded synthetic keys/queries and a brute-force oracle."""

from __future__ import annotations

import numpy as np

DIM = 32


def clustered(n_keys: int = 1500, n_build: int = 1500, n_test: int = 24, dim: int = DIM, seed: int = 0):
    """Keys in clusters along a random walk of positions (as in a text), and
    queries that point at clusters from outside them (decode queries are far
    from their keys). Returns keys [N, dim], build queries, test queries float32."""
    rng = np.random.default_rng(seed)
    n_c = 24
    centers = rng.standard_normal((n_c, dim)).astype(np.float32) * 2.0
    runs = np.repeat(rng.integers(0, n_c, size=n_keys // 10 + 1), 10)[:n_keys]  # topics last ~10 tokens
    keys = centers[runs] + rng.standard_normal((n_keys, dim)).astype(np.float32)
    shift = rng.standard_normal(dim).astype(np.float32) * 3.0  # the query/key distribution gap

    def queries(n):
        c = rng.integers(0, n_c, size=n)
        return (centers[c] * 1.5 + shift + rng.standard_normal((n, dim)).astype(np.float32)).astype(np.float32)

    return keys.astype(np.float32), queries(n_build), queries(n_test)


def brute_topk(keys: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product in float64: ids [n_q, k], scores [n_q, k]."""
    s = q.astype(np.float64) @ keys.astype(np.float64).T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(s, ids, 1)


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(a[a >= 0], b)) / k for a, b in zip(ids, truth)]))


def assert_exact(res, keys: np.ndarray, q: np.ndarray, k: int) -> None:
    """res equals brute force, compared by score so that ties may pick either id."""
    _, want = brute_topk(keys, q, k)
    got = np.take_along_axis(q.astype(np.float64) @ keys.astype(np.float64).T, res.ids, 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(res.scores, want, rtol=1e-4, atol=1e-3)


def assert_valid(res, n_keys: int, n_q: int, k: int) -> None:
    """ids int64 [n_q, k] in range, unique per row, -1 only as trailing padding; scores sorted."""
    assert res.ids.dtype == np.int64 and res.ids.shape == (n_q, k)
    assert res.scores.dtype == np.float32 and res.scores.shape == (n_q, k)
    for row, sc in zip(res.ids, res.scores):
        valid = row >= 0
        m = int(valid.sum())
        assert valid[:m].all() and not valid[m:].any(), "padding must trail"
        assert (row[:m] < n_keys).all()
        assert len(np.unique(row[:m])) == m, "ids must be unique"
        assert np.all(np.diff(sc[:m]) <= 1e-6), "scores must be sorted best first"
        assert np.all(np.isneginf(sc[m:]))
    assert 0 < res.keys_scored <= res.scanned
