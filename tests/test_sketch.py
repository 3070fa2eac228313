"""The key sketch (engine.decode.sketch): exact at full rank, fitted to queries below it."""

import pytest
import torch

from engine.cache.store import HostKV
from engine.decode.sketch import ExactKeys, KeySketch, fit_projection, make_scorer


def correlated(H, N, D, seed):
    """Vectors with a few dominant directions, as attention keys and queries have."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -1, D)
    return (torch.randn(H, N, D, generator=g) * scales) @ torch.linalg.qr(torch.randn(D, D, generator=g))[0]


@pytest.mark.parametrize("with_queries", [False, True])
def test_full_rank_gives_exact_scores(with_queries):
    keys, queries = correlated(2, 300, 16, 0), correlated(2, 200, 16, 1)
    sketch = KeySketch(2, 16, 16)
    sketch.build(keys, queries if with_queries else None)
    q = correlated(2, 3, 16, 2)  # [H, G, D]
    ids = torch.tensor([[0, 5, 299, -1], [7, 7, 1, 2]])
    s = sketch.scores(q, ids)
    exact = torch.einsum("hgd,hcd->hgc", q, keys[torch.arange(2)[:, None], ids.clamp_min(0)])
    torch.testing.assert_close(s[0, :, :3], exact[0, :, :3], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(s[1], exact[1], atol=1e-3, rtol=1e-3)
    assert torch.isneginf(s[0, :, 3]).all()  # padding


def test_query_fitted_projection_beats_the_keys_own_directions():
    """Keys spread most along directions the queries ignore: their principal directions
    miss what decides q . k, the projection fitted to both does not."""
    g = torch.Generator().manual_seed(0)
    D, r = 32, 4
    keys = torch.randn(1, 2000, D, generator=g) * torch.cat([torch.full((16,), 5.0), torch.ones(16)])
    query_scale = torch.full((D,), 0.01)
    query_scale[16 : 16 + r] = 1.0  # queries live in r directions the keys spread little along
    queries = torch.randn(1, 500, D, generator=g) * query_scale

    def error(p_q, p_k):
        approx = (queries @ p_q) @ (keys @ p_k).transpose(1, 2)
        return float((approx - queries @ keys.transpose(1, 2)).norm())

    assert error(*fit_projection(keys, queries, r)) < 0.5 * error(*fit_projection(keys, None, r))


def test_added_keys_are_sketched_like_built_ones():
    keys = correlated(1, 100, 8, 3)
    whole, split = KeySketch(1, 8, 4), KeySketch(1, 8, 4)
    whole.build(keys, None)
    split.build(keys[:, :60], None)
    split.p_q, split.p_k = whole.p_q, whole.p_k  # the same projection, appended in pieces
    split.n = 0
    split.add(keys[:, :60])
    for _ in range(4):
        split.add(keys[:, 60:70] if split.n == 60 else keys[:, split.n : split.n + 10])
    assert len(split) == 100 and split.nbytes >= 100 * 4 * 4
    q, ids = correlated(1, 2, 8, 4), torch.arange(100)[None]
    torch.testing.assert_close(split.scores(q, ids), whole.scores(q, ids))


def test_rank_must_fit_the_head_dim():
    with pytest.raises(ValueError, match="sketch rank must lie in"):
        KeySketch(1, 8, 9)


def test_exact_keys_score_the_stores_own_keys_as_it_grows():
    store = HostKV(2, 16, torch.float32, pin=False)
    keys = correlated(2, 300, 16, 5)
    store.append(keys[:, :100], keys[:, :100])
    scorer = make_scorer(0, store)
    assert isinstance(scorer, ExactKeys) and scorer.nbytes == 0
    store.append(keys[:, 100:], keys[:, 100:])  # grows the store's capacity: the scorer follows it
    assert scorer.n == 300
    q = correlated(2, 3, 16, 6)
    ids = torch.tensor([[0, 250, 299, -1], [7, 7, 1, 2]])
    s = scorer.scores(q, ids)
    exact = torch.einsum("hgd,hcd->hgc", q, keys[torch.arange(2)[:, None], ids.clamp_min(0)])
    torch.testing.assert_close(s[0, :, :3], exact[0, :, :3])
    torch.testing.assert_close(s[1], exact[1])
    assert torch.isneginf(s[0, :, 3]).all()


def test_a_rank_below_the_head_dim_makes_a_sketch():
    store = HostKV(2, 16, torch.float32, pin=False)
    assert isinstance(make_scorer(8, store), KeySketch)
    assert isinstance(make_scorer(16, store), ExactKeys)  # no smaller than the keys: read them
