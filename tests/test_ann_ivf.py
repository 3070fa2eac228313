import faiss

from ann.ivf import IVFIndex
from tests.ann_helpers import assert_exact, brute_topk, clustered, recall


def test_full_probe_is_exact_and_counts_centroids():
    keys, _, tq = clustered(n_keys=800, n_test=8)
    idx = IVFIndex(keys.shape[1], nlist=20, nprobe=20)
    idx.build(keys)
    res = idx.search(tq, 10)
    assert_exact(res, keys, tq, 10)
    assert res.keys_scored == 8 * 800  # every list probed
    assert res.scanned == 8 * (800 + 20)


def test_fewer_probes_scan_less_and_recall_grows():
    keys, _, tq = clustered(n_keys=3000, n_test=32)
    truth, _ = brute_topk(keys, tq, 20)
    idx = IVFIndex(keys.shape[1], nlist=64, nprobe=1)
    idx.build(keys)
    recalls, scans = [], []
    for p in (1, 4, 16, 64):
        idx.nprobe = p
        res = idx.search(tq, 20)
        recalls.append(recall(res.ids, truth))
        scans.append(res.keys_scored)
    assert recalls == sorted(recalls) and recalls[-1] == 1.0
    assert scans == sorted(scans) and scans[0] < 0.2 * scans[-1]


def test_nlist_capped_at_n_keys():
    keys, _, tq = clustered(n_keys=27, n_test=2)
    idx = IVFIndex(keys.shape[1], nlist=256, nprobe=256)
    idx.build(keys)
    assert idx.index.nlist == 27
    assert_exact(idx.search(tq, 5), keys, tq, 5)
    assert faiss.cvar.indexIVF_stats.ndis == 2 * 27
