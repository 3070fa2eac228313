"""The benchmarks' JSON files printed as Markdown tables (bench.tables's renderers), and the docs'
report blocks and the README's configuration table kept up to date.

python -m bench.report [--kernel PATH] [--decode PATH] [--eval PATH ...] [--ruler PATH ...] [--fidelity PATH]
                       [--generation PATH] [--prefill PATH] [--soak PATH] [--throughput PATH] [--margins PATH]
python -m bench.report --update docs/results.md   # rewrite its report blocks from the JSON they name
python -m bench.report --readme [README.md]       # rewrite its configuration table from OffloadConfig

A report block in a Markdown file names its renderer and its JSON files (paths from the
repository root, or glob patterns; `eval`, `ruler` and `fidelity_lengths` take several, the others one):

    <!-- report:decode bench/out/decode.json -->

    ...the table that `decode` renders from that file...

    <!-- /report -->

`--update` rewrites every block whose files exist and leaves the others as they are, saying
so: the JSON lives in bench/out/, which the repository does not keep, so the tables stay
until someone measures again.
"""

from __future__ import annotations

import glob
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.common.options import parser
from bench.tables import MANY_FILES, RENDERERS
from engine.cli import run_script

BLOCK_START, BLOCK_END = "<!-- report:", "<!-- /report -->"
CONFIG_START, CONFIG_END = "<!-- config-table:", "<!-- /config-table -->"


@dataclass(frozen=True)
class Block:
    """A marked block of a Markdown file's lines: lines[start] opens it, lines[end] closes it."""

    start: int
    end: int
    name: str
    paths: tuple[str, ...]


def find_blocks(lines: list[str], where: str = "the document") -> list[Block]:
    """The report blocks of a document's lines (without their line ends), in order. A block
    that is not closed, is opened inside another, names no JSON or an unknown renderer, or
    gives a one-file renderer several files raises ValueError naming its line."""
    blocks, open_at = [], None
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith(BLOCK_START):
            if open_at is not None:
                raise ValueError(f"{where}, line {i + 1}: a report block opens inside the one of line {open_at + 1}")
            open_at = i
        elif text == BLOCK_END:
            if open_at is None:
                raise ValueError(f"{where}, line {i + 1}: {BLOCK_END} closes no report block")
            blocks.append(_block(lines[open_at].strip(), open_at, i, where))
            open_at = None
    if open_at is not None:
        raise ValueError(f"{where}, line {open_at + 1}: the report block is not closed ({BLOCK_END})")
    return blocks


def _block(marker: str, start: int, end: int, where: str) -> Block:
    if not marker.endswith("-->"):
        raise ValueError(f"{where}, line {start + 1}: a report marker ends with '-->' on its own line: {marker!r}")
    name, *paths = marker[len(BLOCK_START) : -len("-->")].split()
    if name not in RENDERERS and name not in MANY_FILES:
        known = ", ".join([*RENDERERS, *MANY_FILES])
        raise ValueError(f"{where}, line {start + 1}: unknown renderer {name!r} (known: {known})")
    if not paths or (len(paths) > 1 and name not in MANY_FILES):
        raise ValueError(f"{where}, line {start + 1}: report:{name} names {len(paths)} JSON files, give one")
    return Block(start, end, name, tuple(paths))


def render_files(name: str, files: list[Path]) -> str:
    """The Markdown that renderer `name` makes of these JSON files (MANY_FILES: all of them); a file that is not
    JSON, or lacks what the renderer reads, is named in a ValueError."""
    results = []
    for f in files:
        try:
            results.append(json.loads(f.read_text()))
        except json.JSONDecodeError as error:
            raise ValueError(f"{f} is not JSON: {error}") from None
    try:
        return MANY_FILES[name](results) if name in MANY_FILES else RENDERERS[name](results[0])
    except (KeyError, TypeError, IndexError) as error:
        named = ", ".join(str(f) for f in files)
        raise ValueError(
            f"report:{name} cannot render {named}: {type(error).__name__} {error} (not its benchmark's JSON?)"
        ) from None


def _existing(patterns: tuple[str, ...], root: Path) -> tuple[list[Path], list[str]]:
    """The files the paths or glob patterns name under root, in order (a pattern's matches
    sorted), and the patterns that match no file."""
    files, missing = [], []
    for pattern in patterns:
        found = sorted(glob.glob(pattern, root_dir=root)) if set("*?[") & set(pattern) else [pattern]
        found = [root / f for f in found if (root / f).is_file()]
        files += found
        if not found:
            missing.append(pattern)
    return files, missing


def update_blocks(text: str, root: Path, where: str = "the document") -> tuple[str, list[str]]:
    """text with every report block whose JSON files all exist under root rendered again (a
    blank line either side of the table); the other blocks and everything outside the blocks
    as they were. Returns (text, one line per block left as it was)."""
    lines = text.split("\n")
    blocks = find_blocks(lines, where)
    out, kept, done = [], [], 0
    for b in blocks:
        out += lines[done : b.start + 1]
        files, missing = _existing(b.paths, root)
        if missing:
            kept.append(f"{where}, line {b.start + 1}: report:{b.name} left as it is, no JSON at {', '.join(missing)}")
            out += lines[b.start + 1 : b.end]
        else:
            out += ["", *render_files(b.name, files).split("\n"), ""]
        done = b.end
    out += lines[done:]
    return "\n".join(out), kept


def config_table() -> str:
    """The README's configuration table, from the fields of OffloadConfig (their one description)."""
    from engine.config import OffloadConfig

    return OffloadConfig.markdown_table().strip()


def update_config_table(text: str, table: str, where: str = "README.md") -> str:
    """text with the lines between its one config-table marker pair replaced by table (a
    blank line either side); anything else unchanged."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line.strip().startswith(CONFIG_START)]
    ends = [i for i, line in enumerate(lines) if line.strip() == CONFIG_END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(
            f"{where}: needs one {CONFIG_START} ... --> line and one {CONFIG_END} line after it, "
            f"found {len(starts)} and {len(ends)}"
        )
    return "\n".join(lines[: starts[0] + 1] + ["", *table.split("\n"), ""] + lines[ends[0] :])


def main(argv=None) -> int:
    p = parser(__doc__, __spec__)
    for name in [*RENDERERS, *MANY_FILES]:  # the renderer's name, hyphenated: --let-go prints let_go's tables
        many = name in MANY_FILES
        p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=Path,
            nargs="+" if many else None,
            metavar="JSON",
            help=f"print the {name} tables of {'these files' if many else 'this file'}",
        )
    p.add_argument("--update", type=Path, nargs="+", help="Markdown files whose report blocks to render again")
    p.add_argument("--root", type=Path, default=Path("."), help="where the blocks' JSON paths start (default: .)")
    p.add_argument(
        "--readme", type=Path, nargs="?", const=Path("README.md"), help="rewrite this file's configuration table"
    )
    args = p.parse_args(argv)
    for doc in args.update or []:
        text, kept = update_blocks(doc.read_text(), args.root, where=str(doc))
        doc.write_text(text)
        for line in kept:
            print(line, file=sys.stderr)
    if args.readme is not None:
        text = args.readme.read_text()
        args.readme.write_text(update_config_table(text, config_table(), where=str(args.readme)))
    for name in [*RENDERERS, *MANY_FILES]:
        files = getattr(args, name)
        if files:
            print(render_files(name, files if isinstance(files, list) else [files]) + "\n")
    return 0


if __name__ == "__main__":
    run_script(main)
