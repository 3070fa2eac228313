"""Input checks, result helpers and error messages shared by every index."""

import numpy as np
import pytest

from ann.base import GrowableKeys, as_vectors, check_k, rerank, topk_rows
from ann.registry import METHODS, make_index
from tests.ann_helpers import DIM, clustered


@pytest.fixture(scope="module")
def data():
    return clustered(n_keys=300, n_build=300, n_test=4)


def test_as_vectors_accepts_float16_and_1d():
    x = np.ones(DIM, np.float16)
    out = as_vectors(x, DIM, "keys")
    assert out.dtype == np.float32 and out.shape == (1, DIM) and out.flags.c_contiguous


@pytest.mark.parametrize(
    "bad, err, msg",
    [
        (np.ones((3, DIM), np.int32), TypeError, "keys must be float32 or float16, got dtype int32"),
        (np.ones((3, DIM + 1), np.float32), ValueError, r"keys must have shape \[n, 32\], got \[3, 33\]"),
        (np.full((3, DIM), np.nan, np.float32), ValueError, "keys contain NaN"),
        ([[1.0] * DIM], TypeError, "keys must be a numpy array"),
        (np.ones((0, DIM), np.float32), ValueError, "keys is empty"),
    ],
)
def test_as_vectors_errors(bad, err, msg):
    with pytest.raises(err, match=msg):
        as_vectors(bad, DIM, "keys")


def test_check_k():
    assert check_k(5, 10) == 5
    with pytest.raises(ValueError, match="k must be positive"):
        check_k(0, 10)
    with pytest.raises(ValueError, match="k = 11 exceeds the 10 keys"):
        check_k(11, 10)
    with pytest.raises(TypeError, match="k must be an int"):
        check_k(2.0, 10)
    with pytest.raises(RuntimeError, match="search before build"):
        check_k(1, 0)


def test_growable_keys_appends_in_order():
    s = GrowableKeys(4, capacity=2)
    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    for i in range(10):
        s.append(rows[i : i + 1])
    np.testing.assert_array_equal(s.data, rows)
    assert len(s) == 10


def test_topk_rows_and_rerank_match_sorting():
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((50, 8)).astype(np.float32)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    ids, sc = topk_rows(q @ keys.T, 7)
    np.testing.assert_array_equal(ids, np.argsort(-(q @ keys.T), axis=1)[:, :7])
    np.testing.assert_allclose(sc, np.take_along_axis(q @ keys.T, ids, 1))
    cand = np.concatenate([ids, ids[:, :2], np.full((3, 2), -1)], axis=1)  # duplicates and padding
    rid, rsc, scored = rerank(keys, q, cand, 9)
    np.testing.assert_array_equal(rid[:, :7], ids)
    assert (rid[:, 7:] == -1).all() and np.isneginf(rsc[:, 7:]).all()
    assert scored == 3 * 7  # distinct valid ids only


@pytest.mark.parametrize("method", METHODS)
def test_bad_input_raises_clear_errors(method, data):
    keys, bq, tq = data
    params = {"union": {"selectors": [("block", {}), ("graph", {})]}}.get(method, {})
    idx = make_index(method, DIM, **params)
    with pytest.raises(RuntimeError, match="before build"):
        idx.search(tq, 5)
    with pytest.raises(ValueError, match=r"keys must have shape \[n, 32\]"):
        idx.build(keys[:, :16], bq)
    with pytest.raises(TypeError, match="keys must be float32 or float16"):
        idx.build(keys.astype(np.int64), bq)
    nan = keys.copy()
    nan[3, 2] = np.nan
    with pytest.raises(ValueError, match="keys contain NaN"):
        idx.build(nan, bq)
    idx.build(keys.astype(np.float16), bq)
    with pytest.raises(ValueError, match="k must be positive"):
        idx.search(tq, 0)
    with pytest.raises(ValueError, match="exceeds the 300 keys"):
        idx.search(tq, 301)
    with pytest.raises(ValueError, match=r"queries must have shape \[n, 32\]"):
        idx.search(tq[:, :8], 5)
    with pytest.raises(ValueError, match=r"keys must have shape"):
        idx.add(keys[:1, :8])
