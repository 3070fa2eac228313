"""Index factory: one name per method, parameters passed through."""

from __future__ import annotations

from ann.base import GrowableKeys, check_counts

METHODS = ("flat", "ivf", "hnsw", "graph", "qq", "block", "union", "hybrid")

# the default hybrid: mean-key blocks (top 2.5% of blocks) and query->query lists
HYBRID_SELECTORS = (("block", {"landmark": "mean", "frac": 0.025}), ("qq", {}))


_CLASSES = {
    "flat": ("ann.flat", "FlatIndex"),
    "ivf": ("ann.ivf", "IVFIndex"),
    "hnsw": ("ann.hnsw", "HNSWIndex"),
    "graph": ("ann.graph", "GraphIndex"),
    "qq": ("ann.qq", "QQIndex"),
    "block": ("ann.block", "BlockKeyIndex"),
}


def index_class(method: str):
    """The class of a method, imported on demand: flat needs numpy only, the
    others faiss and/or numba (the `ann` extra)."""
    import importlib

    module, name = _CLASSES[method]
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ImportError(f"index method {method!r} needs {e.name}: pip install 'hybridattn[ann]'") from e


def make_index(method: str, dim: int, **params):
    """Build an empty index: flat | ivf | hnsw | graph | qq | block | union | hybrid.

    union takes `selectors=[(method, params), ...]` (selectors that can share
    keys get the union's store); hybrid is a union of HYBRID_SELECTORS, whose
    params can be overridden with `block={...}` and `qq={...}`."""
    if method not in METHODS:
        raise ValueError(f"unknown index method {method!r}; known methods: {', '.join(METHODS)}")
    check_counts(positive={"dim": dim})
    if method in ("union", "hybrid"):
        from ann.union import UnionIndex

        specs = _selectors(method, params)
        store = GrowableKeys(dim)
        sels = []
        for name, p in specs:
            shares = name in ("qq", "block", "graph")
            sels.append(index_class(name)(dim, **p, **({"store": store} if shares else {})))
        return UnionIndex(dim, sels, store=store)
    return index_class(method)(dim, **params)


def estimate_index_bytes(method: str, n_keys: int, dim: int, n_queries: int = 0, **params) -> int:
    """Host bytes an index of `method` is expected to hold for n_keys keys of `dim`
    floats built with n_queries build queries (the memory plan uses this)."""
    if method not in METHODS:
        raise ValueError(f"unknown index method {method!r}; known methods: {', '.join(METHODS)}")
    if method in ("union", "hybrid"):
        specs = _selectors(method, dict(params))
        shared = GrowableKeys(dim, capacity=1)  # stands for the union's one key store
        return 4 * n_keys * dim + sum(
            index_class(name).estimate_bytes(n_keys, dim, n_queries, **{**p, "store": shared}) for name, p in specs
        )
    return index_class(method).estimate_bytes(n_keys, dim, n_queries, **params)


def _selectors(method: str, params: dict) -> list[tuple[str, dict]]:
    """A union's or a hybrid's selectors as (method, params): the union's `selectors`, or HYBRID_SELECTORS
    with the `block={...}` and `qq={...}` overrides (taken out of params)."""
    if method == "hybrid":
        over = {name: params.pop(name, {}) for name, _ in HYBRID_SELECTORS}
        if params:
            raise TypeError(f"hybrid takes only {', '.join(over)} overrides, got {', '.join(params)}")
        return [(name, {**p, **over[name]}) for name, p in HYBRID_SELECTORS]
    specs = params.pop("selectors", None)
    if not specs or params:
        raise TypeError("union takes exactly selectors=[(method, params), ...]")
    for name, _ in specs:
        if name in ("union", "hybrid") or name not in METHODS:
            raise ValueError(f"union selector must be one of flat, ivf, hnsw, graph, qq, block; got {name!r}")
    return list(specs)
