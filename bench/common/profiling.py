"""Profiles for the benchmarks' `--profile`: cProfile's costliest calls, and torch.profiler's
tables of operators, CUDA kernels and the decode step's phases."""

from __future__ import annotations

import contextlib
import cProfile
import pstats
from pathlib import Path
from unittest import mock

import torch

from engine.cache.store import SideStreamCopies
from engine.decode import host as decode_host
from engine.decode import step as decode_steps
from engine.native import ops as native_ops


@contextlib.contextmanager
def profiled(folder: Path | None, name: str, on: bool = True):
    """cProfile the block into folder/name.txt (the 45 costliest calls, cumulative)."""
    if folder is None or not on:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{name}.txt", "w") as f:
            pstats.Stats(profile, stream=f).sort_stats("cumulative").print_stats(45)


# The decode step's phases, each timed as a torch.profiler range while `torch_profiled` runs:
# (label, module or class, function). Wrapped only then, so the engine's step carries no ranges.
STEP_PHASES = (
    ("hybridattn.resident", decode_steps, "resident_parts"),
    ("hybridattn.block_scores", decode_steps, "stacked_scores"),
    ("hybridattn.prepare", decode_host, "prepare"),
    ("hybridattn.read", decode_host, "read"),
    ("hybridattn.to_host", decode_host, "to_host"),
    ("hybridattn.store_wait", SideStreamCopies, "host_wait"),
    ("hybridattn.native_call", native_ops, "host_step_prepared"),
    ("hybridattn.estimate", decode_steps, "stacked_estimate"),
    ("hybridattn.merge", decode_steps, "merge_all"),
)


@contextlib.contextmanager
def phase_ranges():
    """Every function of STEP_PHASES runs inside a torch.profiler range named by its label."""

    def ranged(label, fn):
        def call(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)

        return call

    with contextlib.ExitStack() as stack:
        for label, owner, name in STEP_PHASES:
            stack.enter_context(mock.patch.object(owner, name, ranged(label, getattr(owner, name))))
        yield


@contextlib.contextmanager
def torch_profiled(folder: Path, name: str, device):
    """torch.profiler over the block into folder/name-torch.txt: the operators by their own time, with the
    CUDA kernels on a GPU (where the device waits, and how long each kernel takes); then by the host's
    time, with the decode step's phases (`STEP_PHASES`) and, on a GPU, the runtime's calls (its
    synchronisations: where the host waits for the device)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof, phase_ranges():
        yield
    averages = prof.key_averages()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    folder.mkdir(parents=True, exist_ok=True)
    tables = [
        "By the operators' own time:",
        averages.table(sort_by=key, row_limit=40),
        "By the host's time (the phases' ranges include what they call):",
        averages.table(sort_by="cpu_time_total", row_limit=40),
    ]
    (folder / f"{name}-torch.txt").write_text("\n".join(tables))
