"""Compile ahead, into numba's cache on disk, the numba kernels of the host key index: the one
its build runs on the CPU and the one that enters the keys added after the build into its lists
(`python -m ann.precompile`; `make` runs it when it sets up .venv). Otherwise the first build after
an install compiles the first (about 12 s on two cores), which the first generation reports as its
index build, and the first decode step that adds keys to the index the second."""

from __future__ import annotations

import time

import torch

from ann.qq import QueryLists


def precompile() -> float:
    """Compile the build's ranking kernel and the adds' kernel (or load them from numba's cache)
    for the argument types the engine passes them, through the index's own code; seconds taken."""
    start = time.perf_counter()
    lists = QueryLists(1, 4, m_keys=2, n_add=1, dtype=torch.bfloat16)  # the model's dtype, as the engine builds
    lists.build(torch.zeros(1, 16, 4, dtype=torch.bfloat16), torch.zeros(1, 8, 4, dtype=torch.bfloat16))
    lists.add(torch.zeros(1, 1, 4, dtype=torch.bfloat16))
    return time.perf_counter() - start


def main() -> None:
    print(f"numba kernels of the host key index compiled (or loaded from its cache) in {precompile():.1f} s")


if __name__ == "__main__":
    main()
