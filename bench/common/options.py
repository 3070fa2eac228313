"""Command-line options the scripts share, and the thread pools pinned to `--threads`."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from engine import cli
from engine.cli.options import OneLineParser, non_negative_int, positive_int  # noqa: F401  (the command line's own, re-exported)
from engine.models import BUNDLED_NAME
from engine.native import ops


def parser(doc: str, spec=None) -> argparse.ArgumentParser:
    """A script's parser, described by the first paragraph of its module docstring `doc` (whose
    first line may end mid-sentence), its usage line starting as the script was run (`prog`)."""
    return OneLineParser(prog=prog(spec), description=" ".join(doc.split("\n\n")[0].split()))


def prog(spec) -> str | None:
    """A script's usage name from its module's `__spec__`: the `hybridattn` command running it, else
    `python -m MODULE` (a run as `python -m` reports the module's file, `decode.py`); None (argparse's
    own) for a script run by its path."""
    return cli.script_command() or (f"python -m {spec.name}" if spec is not None else None)


def add_output_args(p: argparse.ArgumentParser, *, quick: str | None = None, plot: str | None = None) -> None:
    """--quick where a script has a short run (`quick` says what it runs), --json PATH and,
    where a picture helps, --plot PATH (`plot` says what it draws)."""
    if quick is not None:
        p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--json", type=cli.output_file, help="write the results here as JSON")
    if plot is not None:
        p.add_argument("--plot", type=cli.output_file, help=plot)


def quick_defaults(args: argparse.Namespace, **defaults: tuple) -> None:
    """Give each option `name` left unset (None) its default from the pair `name=(quick, full)`:
    the first in a --quick run, else the second. A value given on the command line stays."""
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


def distinct(args: argparse.Namespace, *names: str) -> None:
    """Each list option `names` (unset: None) names each value once: a value twice was run twice, its
    rows written twice (the tables keep the last)."""
    for name in names:
        values = getattr(args, name) or []
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            raise ValueError(f"--{name.replace('_', '-')} names {', '.join(twice)} more than once")


def add_threads_arg(p: argparse.ArgumentParser, default: int | None = None) -> None:
    """--threads N (default: torch's own count), for `pin_threads`."""
    p.add_argument(
        "--threads",
        type=positive_int,
        default=default or torch.get_num_threads(),
        help="threads of the torch (OpenMP), faiss and numba pools, pinned and printed",
    )


def add_model_args(p: argparse.ArgumentParser, *, chunk: int | None = 1024, rope_scale: bool = False) -> None:
    """--model NAME (default: the bundled model), with `rope_scale` --rope-scale FACTOR
    (engine.models.stretched), as the command line has them, and unless `chunk` is None --chunk N."""
    cli.add_model_args(p, BUNDLED_NAME, rope_scale=rope_scale)
    if chunk is not None:
        p.add_argument("--chunk", type=positive_int, default=chunk, help="prefill chunk")


def pin_threads(n: int) -> dict[str, int | None]:
    """Pin torch's intra-op pool (torch sets its OpenMP pool with it), and faiss's OpenMP pool
    and numba's pool where they are installed, to n threads; print the counts as one JSON line and
    return them. Pinned, because every pool left at its default takes every core, and pools that
    compete time each other's waits. (torch and faiss share one OpenMP count: one for both.)"""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be an int >= 1, got {n!r}")
    try:  # first: numba's OpenMP pool, launched here, sets the shared OpenMP count to its own size
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass
    counts = thread_counts()
    print(json.dumps({"threads": counts}), flush=True)
    return counts


def thread_counts() -> dict[str, int | None]:
    """The threads each pool runs now (None: the library is not loaded); `kernel` is the
    most the host kernel takes when a call leaves its count at 0."""
    faiss, numba = sys.modules.get("faiss"), sys.modules.get("numba")
    return {
        "torch": torch.get_num_threads(),
        "faiss": faiss.omp_get_max_threads() if faiss is not None else None,
        "numba": numba.get_num_threads() if numba is not None else None,
        "kernel": ops._C.max_threads() if ops.HAS_EXT else None,
    }
