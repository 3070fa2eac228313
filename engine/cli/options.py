"""The command line's options: a model, the offload configuration (one option per field), how an
answer is decoded, a prompt to read, a file to write; each checked before anything slow runs."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

# Flags that name a field otherwise than `--field-name`, kept from earlier versions.
FLAG_ALIASES = {"n_sink": ("--sinks",)}


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, its errors one line (`PROG: error: ...`, exit status 2) rather than its usage
    and then the error, as every other bad input of the command line is answered."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """argparse type of a count: an int >= 1 (argparse names the option when it is not)."""
    return _int_from(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type of an offset: an int >= 0 (argparse names the option when it is not)."""
    return _int_from(text, 0)


def _int_from(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}")
    return value


def _json_object(text: str) -> dict:
    """A JSON object given on the command line (keyword arguments of the key index)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({exc})") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _offload_args(p: argparse.ArgumentParser) -> None:
    """One option per OffloadConfig field, with the field's description, grouped by section."""
    from engine.config import KEY_INDEXES, OLD_CANDIDATE_SOURCES, PRESETS, SECTIONS, OffloadConfig

    p.add_argument(
        "--preset", default="default", choices=list(PRESETS), help="named offload configuration the options override"
    )
    groups = {name: p.add_argument_group(f"offload: {title}") for name, title in SECTIONS.items()}
    for item in OffloadConfig.described():
        flags = [_flag(item.name), *FLAG_ALIASES.get(item.name, ())]
        text = item.help.replace("%", "%%")  # argparse formats help with %
        if item.type is bool:
            groups[item.section].add_argument(*flags, dest=item.name, action=argparse.BooleanOptionalAction, help=text)
            continue
        kind = _json_object if item.type is dict else item.type
        groups[item.section].add_argument(*flags, dest=item.name, type=kind, choices=item.choices, help=text)
    old = p.add_argument_group("offload: deprecated spellings")
    old.add_argument("--mode", choices=list(OLD_CANDIDATE_SOURCES), help="use --candidates-from (keys, blocks, both)")
    old.add_argument("--method", choices=KEY_INDEXES, help="use --key-index")


def _sampling_args(p: argparse.ArgumentParser, *, max_new_tokens: int, seed_help: str = "the sampling's seed") -> None:
    """How an answer is decoded: its length, greedy or sampled, and where it stops."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above it, sampled")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    # (--top-k is the fixed budget's, an offload field)
    p.add_argument("--sample-top-k", type=int, default=0, help="sample among this many most likely tokens (0: all)")
    p.add_argument(
        "--sample-top-p", type=float, default=1.0, help="sample among the fewest whose probabilities reach this"
    )
    p.add_argument(
        "--stop", action="append", metavar="TEXT", help="end the answer before this text (may be given again)"
    )


SAMPLING_OPTIONS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "seed": "--seed",
                    "top_k": "--sample-top-k", "top_p": "--sample-top-p"}  # fmt: skip


def _sampling(args) -> dict:
    """The --max-new-tokens/--temperature/... options checked (before the model loads), as generate's keywords."""
    from engine.sampling import check_sampling
    from engine.stop import StopStrings

    try:
        check_sampling(args.max_new_tokens, args.temperature, args.seed, args.sample_top_k, args.sample_top_p)
    except ValueError as error:  # named as the user typed it (--top-k is the fixed budget's)
        name, _, rest = str(error).partition(" ")
        raise ValueError(f"{SAMPLING_OPTIONS.get(name, name)} {rest}") from None
    StopStrings(None, args.stop)
    sampling = dict(temperature=args.temperature, top_k=args.sample_top_k, top_p=args.sample_top_p)
    return sampling | dict(seed=args.seed, stop=args.stop)


def _offload_config(args):
    """The preset with the options given on the command line (the deprecated ones with a warning)."""
    from engine.config import RENAMED_FIELDS, OffloadConfig, new_spelling

    given = {item.name: getattr(args, item.name) for item in OffloadConfig.described()}
    given = {name: value for name, value in given.items() if value is not None}
    for old in RENAMED_FIELDS:
        if getattr(args, old) is not None:
            new, value = new_spelling(old, getattr(args, old))
            print(f"hybridattn: warning: {_flag(old)} is deprecated: use {_flag(new)} {value}", file=sys.stderr)
            given[old] = getattr(args, old)  # the configuration warns too, and refuses both spellings
    return OffloadConfig.preset(args.preset, **given)


def _check_local_model(model: str) -> None:
    """A model given as a path must exist. Hub ids never start with '.' or '/', so this
    rejects a mistyped path before the slow imports instead of asking the hub for it."""
    if (model.startswith((".", "/")) or model.endswith((".gguf", ".json"))) and not Path(model).exists():
        raise FileNotFoundError(f"model not found: {model}")


def _check_model_args(args) -> None:
    """--model and --rope-scale, before the model loads."""
    from engine.models import check_rope_scale

    _check_local_model(args.model)
    if args.rope_scale is not None:
        check_rope_scale(args.rope_scale)


def add_model_args(p: argparse.ArgumentParser, default_model: str, *, rope_scale: bool = True) -> None:
    """--model NAME and, with `rope_scale`, --rope-scale FACTOR (engine.models.stretched)."""
    p.add_argument(
        "--model", default=default_model, help="bundled name, local model directory, .gguf file or hub id (owner/name)"
    )
    if rope_scale:
        p.add_argument(
            "--rope-scale",
            type=float,
            help="stretch the model's RoPE by YaRN to this many times its trained context (e.g. 2: the bundled "
            "model's 8K to 16K)",
        )


def _text(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{source} is not UTF-8 text ({error.reason} at byte {error.start})") from None


def _read_prompt(args) -> str:
    """The prompt from --prompt, --file or stdin; not empty."""
    if args.prompt is not None:
        prompt = args.prompt
    elif args.file == "-" or (args.file is None and stdin_open() and not sys.stdin.isatty()):
        if not stdin_open():
            raise ValueError("--file -: stdin is closed")
        prompt = _text(sys.stdin.buffer.read(), "stdin")
    elif args.file is not None:
        prompt = _text(Path(args.file).read_bytes(), f"--file {args.file}")
    else:
        raise ValueError("give a prompt: --prompt TEXT, --file PATH, stdin, or --demo")
    if not prompt:
        raise ValueError("the prompt is empty")
    return prompt


def output_file(text: str) -> Path:
    """argparse type of a file a command writes (--json, --plot, --prefix-file): a path that cannot be written
    fails as the arguments are read, before the work whose results it is to hold, not after; its folder is
    made when it is written (`write_output`), so that a run that fails first leaves none behind."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"is a folder, not a file: {text}")
    _check_can_make(path.absolute().parent, text)
    return path


def output_folder(text: str) -> Path:
    """argparse type of a folder a command writes files into (--prefix-dir): one there, or one that can be
    made, checked as the arguments are read (the model loads after them)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"is a file, not a folder: {text}")
    _check_can_make(path.absolute(), text)
    return path


def _check_can_make(folder: Path, text: str) -> None:
    """`folder` (for the path `text`) is there and writable, or the nearest one above it that is there is."""
    while not folder.exists():  # the nearest folder that is there: the ones below it are to be made
        folder = folder.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"a file stands where its folder would be: {text}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"its folder cannot be made or written: {folder} is not writable")


def gib_bytes(gib: float, option: str) -> int:
    """A size given in GiB as bytes, or a ValueError naming the option where it is not a positive, finite size
    of a byte or more."""
    if not 1 <= gib * 2**30 < math.inf:  # NaN fails it too
        raise ValueError(f"{option} must be a positive number of GiB, got {gib} (finite, and a byte at least)")
    return int(gib * 2**30)


def write_output(path: Path, text: str) -> None:
    """`text` written to `path` (an `output_file`), its folders made first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def stdin_open() -> bool:
    """Whether the process has a stdin (Python sets it to None where it was closed)."""
    return sys.stdin is not None


def _bars() -> bool:
    """Whether progress bars are shown: on a terminal only (a log file gets the report's lines, not the
    bars' carriage returns); transformers' weight-loading bar is turned off elsewhere."""
    if sys.stderr.isatty():
        return True
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    return False
