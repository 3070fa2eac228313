"""Union of selectors: shared keys, deduplicated candidates, exact rerank, GQA groups."""

import numpy as np
import pytest

from ann.registry import make_index
from ann.selector import search_group
from tests.ann_helpers import assert_exact, assert_valid, brute_topk, clustered, recall


def test_selectors_share_the_union_store():
    keys, bq, tq = clustered(n_keys=500, n_build=500)
    u = make_index("union", keys.shape[1], selectors=[("block", {}), ("qq", {}), ("graph", {})])
    u.build(keys, bq)
    assert all(s.store is u.store for s in u.selectors)
    u.add(tq[:3])
    assert len(u) == 503 and all(len(s) == 503 for s in u.selectors)


def test_union_is_at_least_as_good_as_each_part_and_exact_on_its_candidates():
    keys, bq, tq = clustered(n_keys=2000, n_build=2000, n_test=24, seed=7)
    truth, _ = brute_topk(keys, tq, 20)
    parts = {"block": {"frac": 0.05}, "qq": {"n_neighbors": 4}}
    u = make_index("union", keys.shape[1], selectors=list(parts.items()))
    u.build(keys, bq)
    ru = u.search(tq, 20)
    assert_valid(ru, len(keys), len(tq), 20)
    for name, p in parts.items():
        one = make_index(name, keys.shape[1], **p)
        one.build(keys, bq)
        assert recall(ru.ids, truth) >= recall(one.search(tq, 20).ids, truth)
    cand, _, _ = u.candidates(tq[:1])
    cand = np.unique(cand[cand >= 0])
    assert ru.keys_scored >= len(cand)  # first query alone scored at least its distinct candidates
    sub = keys[cand]
    want = cand[np.argsort(-(sub @ tq[0]))[:20]]
    np.testing.assert_array_equal(np.sort(ru.ids[0]), np.sort(want))


def test_group_search_shares_one_candidate_set():
    keys, bq, tq = clustered(n_keys=1000, n_build=1000, n_test=3)
    h = make_index("hybrid", keys.shape[1], block={"frac": 1.0})
    h.build(keys, bq)
    res = search_group(h, tq, 10)  # G = 3 query heads of one KV head
    assert_exact(res, keys, tq, 10)
    cand, aux, found = h.candidates(tq)
    assert found == 0  # block and qq score no keys to find candidates
    n_c = len(np.unique(cand[cand >= 0]))
    assert res.keys_scored == 3 * n_c and res.scanned == res.keys_scored + aux


def test_keys_a_graph_selector_scores_are_counted():
    keys, bq, tq = clustered(n_keys=1000, n_build=1000, n_test=3)
    u = make_index("union", keys.shape[1], selectors=[("block", {"frac": 0.05}), ("graph", {"ef": 50})])
    u.build(keys, bq)
    g = u.selectors[1].search(tq, 10)
    cand, aux, found = u.candidates(tq, 10)
    assert found == g.keys_scored and aux == g.scanned - g.keys_scored + u.selectors[0].blocks.scanned
    res = search_group(u, tq, 10)
    n_c = len(np.unique(cand[cand >= 0]))
    assert res.keys_scored == 3 * n_c + found


def test_a_build_a_selector_refuses_leaves_no_ids_past_the_keys():
    keys, bq, tq = clustered(n_keys=600, n_build=300)
    u = make_index("hybrid", keys.shape[1])
    u.build(keys, bq)
    with pytest.raises(ValueError, match="needs build queries"):
        u.build(keys[:100])  # the block selector built on the 100 keys, the qq one refused and kept the 600
    # before, the union searched its 100 keys with lists of the 600: ids past the store's end, scores read beyond it
    for call in (lambda: u.search(tq, 10), lambda: u.candidates(tq[:3], 10)):
        with pytest.raises(RuntimeError, match="before build"):
            call()
    with pytest.raises(RuntimeError, match="add before build"):
        u.add(tq[:1])
    u.build(keys[:100], bq)
    fresh = make_index("hybrid", keys.shape[1])
    fresh.build(keys[:100], bq)
    assert_valid(u.search(tq, 10), 100, len(tq), 10)
    assert np.array_equal(u.search(tq, 10).ids, fresh.search(tq, 10).ids)
