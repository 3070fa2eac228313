"""Compile ahead, into numba's cache on disk, the numba kernel a host key index build runs on the
CPU (`python -m ann.precompile`; `make` runs it when it sets up .venv). Otherwise the first build
after an install compiles it (about 12 s on two cores), and the first generation reports that as
its index build."""

from __future__ import annotations

import time

import torch

from ann.qq import topk_keys


def precompile() -> float:
    """Compile the build's ranking kernel (or load it from numba's cache) for the argument types
    every CPU build passes it, through the build's own code; seconds taken."""
    start = time.perf_counter()
    topk_keys(torch.zeros(1, 8, 4), torch.zeros(1, 16, 4), 2)
    return time.perf_counter() - start


def main() -> None:
    print(f"numba kernel of the host index build compiled (or loaded from its cache) in {precompile():.1f} s")


if __name__ == "__main__":
    main()
