"""What the scripts write: JSON that carries the run's environment, and their plots."""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import subprocess
from collections.abc import Callable, Hashable
from pathlib import Path

import torch

from bench.common.options import thread_counts
from engine.cli.options import write_output


def write_json(path: Path, payload: dict) -> None:
    """`payload` as indented JSON at `path` (folders made), after an "environment" entry
    (`environment()`) unless the payload brings its own: a result file says where it was measured."""
    write_output(path, json.dumps(finite({"environment": environment(), **payload}), indent=1, allow_nan=False))


def finite(value):
    """`value` with its infinite and NaN floats as None (JSON's null: JSON has no infinity, which an interval
    of one prompt has), in its dicts, lists and tuples however deep."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def save_run(args, config: dict, cases: list[dict], plot=None) -> None:
    """A speed benchmark's results: {"config", "cases"} to `--json` and `plot(cases, path)` to
    `--plot`, each where given; the run's thread count joins its config."""
    if args.json:
        write_json(args.json, {"config": {"threads": args.threads, **config}, "cases": cases})
    if plot is not None and args.plot:
        plot(cases, args.plot)


def environment() -> dict:
    """The machine, the versions, the thread pools, the date and the commit a run was made with."""
    import transformers

    commit, dirty = git_commit()
    return {
        "machine": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": memory_gib(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": thread_counts(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
    }


# vector extensions that decide how fast the CPU's bf16 products run (a virtual machine's model
# name often leaves out the generation)
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name and which of CPU_FEATURES it has (Linux: `cpuinfo`), else what
    `platform` knows: a shared machine is not always the same model from one session to the
    next, and timings differ with it."""
    name, flags = None, set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name is None:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if name is None:
        return platform.processor() or platform.machine()
    have = [f for f in CPU_FEATURES if f in flags]
    return f"{name} ({', '.join(have)})" if have else name


def memory_gib() -> float | None:
    """The machine's memory, GiB (None where the system does not say)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


@functools.cache
def git_commit() -> tuple[str | None, bool | None]:
    """(commit, whether tracked files differ from it) of the source checkout these scripts run
    from; (None, None) where they were installed from a wheel or git is missing. Only a
    checkout whose top folder holds this `bench` counts: an installed copy may sit inside
    some other repository."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode or Path(top.stdout.strip()).resolve() != root:
            return None, None
        head = git("rev-parse", "HEAD").stdout.strip() or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
    return head, dirty


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)


def method_panels(
    rows: list[dict],
    path: Path,
    *,
    panel: Callable[[dict], Hashable],
    title: Callable[[Hashable], str],
    x: str,
    y: str,
    xlabel: str,
    ylabel: str,
    size: tuple[float, float] = (5, 4),
) -> None:
    """Log-log panels side by side, one per value of `panel(row)`, each with a line per
    "method" of `y` against `x`; rows that carry an "error" are left out."""
    plt = pyplot()
    rows = [r for r in rows if "error" not in r]
    panels = sorted({panel(r) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(size[0] * len(panels), size[1]), squeeze=False)
    for ax, key in zip(axes[0], panels):
        mine = [r for r in rows if panel(r) == key]
        for method in sorted({r["method"] for r in mine}):
            ax.plot(*zip(*sorted((r[x], r[y]) for r in mine if r["method"] == method)), marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel)
        ax.set_title(title(key), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)
