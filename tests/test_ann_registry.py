"""The protocol contract, checked on every index method the factory builds."""

import numpy as np
import pytest

from ann.base import KeyIndex
from ann.registry import METHODS, make_index
from ann.selector import search_group
from tests.ann_helpers import DIM, assert_exact, assert_valid, brute_topk, clustered, recall

# generous settings: every method must then return the exact top-k
EXACT = {
    "flat": {},
    "ivf": {"nlist": 16, "nprobe": 16},
    "hnsw": {"M": 16, "ef": 600},
    "graph": {"ef": 600},
    "qq": {"m_keys": 600, "n_neighbors": 600},
    "block": {"frac": 1.0},
    "union": {"selectors": [("block", {"frac": 0.1}), ("graph", {"ef": 600})]},
    "hybrid": {"block": {"frac": 1.0}},
}


@pytest.fixture(scope="module")
def data():
    return clustered(n_keys=600, n_build=600, n_test=16)


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown index method 'annoy'.*flat, ivf, hnsw, graph, qq"):
        make_index("annoy", 8)
    with pytest.raises(ValueError, match="dim"):
        make_index("flat", 0)
    with pytest.raises(TypeError, match="dim must be an int, got bool"):
        make_index("flat", True)
    assert make_index("flat", np.int64(8)).dim == 8  # numpy ints are counts as everywhere else


@pytest.mark.parametrize(
    "method, params, err, msg",
    [
        ("flat", {"chunk": 0}, ValueError, "chunk must be positive, got 0"),
        ("ivf", {"nlist": 2.5}, TypeError, "nlist must be an int, got float 2.5"),
        ("ivf", {"nprobe": True}, TypeError, "nprobe must be an int, got bool"),
        ("hnsw", {"ef": 1.5}, TypeError, "ef must be an int"),
        ("graph", {"window": -1}, ValueError, "window must be non-negative, got -1"),
        ("graph", {"n_hubs": -2}, ValueError, "n_hubs must be non-negative"),
        ("graph", {"n_add_links": -1}, ValueError, "n_add_links must be non-negative"),
        ("qq", {"n_add": -1}, ValueError, "n_add must be non-negative"),
        ("qq", {"m_keys": 2.0}, TypeError, "m_keys must be an int"),
        ("block", {"n_blocks": 0}, ValueError, "n_blocks must be positive"),
        ("block", {"frac": 0.0}, ValueError, r"frac must be a share in \(0, 1\], got 0.0"),
        ("block", {"frac": float("nan")}, ValueError, "frac must be a share"),
        ("block", {"frac": np.float32(1.5)}, ValueError, "frac must be a share"),
        ("block", {"block_size": 2.5}, TypeError, "block_size must be an int"),
        ("graph", {"seed": -1}, ValueError, "seed must be non-negative, got -1"),
        ("graph", {"seed": 1.5}, TypeError, "seed must be an int"),
        ("ivf", {"seed": 2**31}, ValueError, r"seed must be below 2\*\*31"),
        ("union", {"selectors": [("annoy", {})]}, ValueError, "union selector must be one of"),
    ],
)
def test_bad_parameters_are_refused_when_the_index_is_made(method, params, err, msg):
    # before, these failed at build or search with numpy's or faiss's words, or searched nothing (n_blocks=0)
    with pytest.raises(err, match=msg):
        make_index(method, 8, **params)


@pytest.mark.parametrize("method", METHODS)
def test_exact_with_generous_settings(method, data):
    keys, bq, tq = data
    idx = make_index(method, DIM, **EXACT[method])
    assert isinstance(idx, KeyIndex)
    idx.build(keys, bq)
    assert len(idx) == len(keys)
    res = idx.search(tq, 10)
    assert_valid(res, len(keys), len(tq), 10)
    assert_exact(res, keys, tq, 10)
    # HNSW also scores the nodes of its upper layers (a key can be scored once per
    # layer it is on), so with ef >= N its count passes N by that small share; a
    # union reranks what its graph selector already scored, so a key counts twice
    slack = {"hnsw": 1.1, "union": 2.0}.get(method, 1.0)
    assert res.keys_scored <= slack * len(tq) * len(keys)


@pytest.mark.parametrize("method", METHODS)
def test_add_then_search_finds_added_keys(method, data):
    keys, bq, tq = data
    idx = make_index(method, DIM, **EXACT[method])
    idx.build(keys, bq)
    new = tq[:5] * 4.0  # each new key is the best match for its own direction
    for i in range(len(new)):  # one key at a time, as the engine evicts them
        idx.add(new[i : i + 1])
    assert len(idx) == len(keys) + len(new)
    res = idx.search(new, 1)
    np.testing.assert_array_equal(res.ids[:, 0], np.arange(len(keys), len(keys) + len(new)))


@pytest.mark.parametrize("method", METHODS)
def test_reproducible(method, data):
    keys, bq, tq = data
    params = {
        "ivf": {"nlist": 16, "nprobe": 2},
        "graph": {"ef": 20, "n_centroids": 8, "n_probe": 2},
        "hnsw": {"ef": 16},
        "qq": {"n_neighbors": 4},
        "block": {"frac": 0.05},
    }.get(method, EXACT[method])
    runs = []
    for _ in range(2):
        idx = make_index(method, DIM, **params)
        idx.build(keys, bq)
        runs.append(idx.search(tq, 10))
    np.testing.assert_array_equal(runs[0].ids, runs[1].ids)
    assert runs[0].scanned == runs[1].scanned


@pytest.mark.parametrize("method", METHODS)
def test_search_group_gives_each_head_its_topk(method, data):
    keys, bq, tq = data
    idx = make_index(method, DIM, **EXACT[method])
    idx.build(keys, bq)
    res = search_group(idx, tq[:3], 10)  # a group of G = 3 query heads
    assert_valid(res, len(keys), 3, 10)
    assert_exact(res, keys, tq[:3], 10)


def test_fast_settings_still_find_most(data):
    keys, bq, tq = data
    truth, _ = brute_topk(keys, tq, 10)
    for method, params in {"graph": {"ef": 40}, "hnsw": {"ef": 40}, "hybrid": {}}.items():
        idx = make_index(method, DIM, **params)
        idx.build(keys, bq)
        res = idx.search(tq, 10)
        assert recall(res.ids, truth) >= 0.8, method
        assert res.keys_scored < len(tq) * len(keys), method


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("flat", {}),
        ("ivf", {}),
        ("hnsw", {}),
        ("graph", {}),
        ("qq", {}),
        ("hybrid", {}),
        ("hybrid", {"qq": {"m_keys": 512}}),
    ],
)
def test_estimated_bytes_match_what_a_built_index_holds(method, params):
    from ann import estimate_index_bytes

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((3000, 32)).astype(np.float32)
    queries = rng.standard_normal((2000, 32)).astype(np.float32)
    index = make_index(method, 32, **params)
    index.build(keys, queries)
    assert index.nbytes == pytest.approx(estimate_index_bytes(method, 3000, 32, 2000, **params), rel=0.02)


def test_estimate_refuses_an_unknown_method():
    from ann import estimate_index_bytes

    with pytest.raises(ValueError, match="unknown index method 'lsh'"):
        estimate_index_bytes("lsh", 10, 4)
    with pytest.raises(ValueError, match="union selector must be one of"):  # was a KeyError
        estimate_index_bytes("union", 10, 4, selectors=[("annoy", {})])


@pytest.mark.parametrize(("method", "params"), [("ivf", {"nlist": 64, "nprobe": 8}), ("hnsw", {"ef": 64})])
def test_searches_of_two_indexes_on_two_threads_count_their_own_scans(method, params):
    """faiss counts a search's scans in counters of the process: two threads searching two indexes at once
    each count what their own search scanned, as alone."""
    import threading

    rng = np.random.default_rng(7)
    indexes, queries = [], []
    for _ in range(2):
        indexes.append(make_index(method, 32, **params))
        indexes[-1].build(rng.standard_normal((5000, 32)).astype(np.float32))
        queries.append(rng.standard_normal((8, 32)).astype(np.float32))
    alone = [index.search(q, 10).scanned for index, q in zip(indexes, queries)]
    counted = [[], []]

    def search(t: int) -> None:
        counted[t] = [indexes[t].search(queries[t], 10).scanned for _ in range(300)]

    threads = [threading.Thread(target=search, args=(t,)) for t in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [set(c) for c in counted] == [{alone[0]}, {alone[1]}]
