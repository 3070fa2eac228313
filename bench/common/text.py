"""Prompts of natural text, read locally: the licence texts Debian's base-files installs on
every system, with the copyright notices of installed packages as the fallback."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch

TEXT_GLOBS = ("/usr/share/common-licenses/*", "/usr/share/doc/*/copyright")


def load_text(min_chars: int) -> tuple[str, str]:
    """Concatenate distinct natural-language files until `min_chars` is reached.

    Returns (text, description of the source). Byte-identical files (GPL is
    GPL-3 on Debian) are read once so the text does not repeat itself."""
    parts, seen, used = [], set(), []
    for pattern in TEXT_GLOBS:
        for path in sorted(glob.glob(pattern)):
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            try:
                body = Path(path).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if body in seen or len(body) < 500:
                continue
            seen.add(body)
            parts.append(body)
            used.append(os.path.dirname(pattern))
            if sum(map(len, parts)) >= min_chars:
                return "\n\n".join(parts), ", ".join(sorted(set(used)))
    if not parts:
        raise FileNotFoundError(f"no text found under {TEXT_GLOBS}")
    return "\n\n".join(parts), ", ".join(sorted(set(used)))


def segments(tok, n: int, length: int, offset: int) -> list[torch.Tensor]:
    """n token segments [1, length], evenly spaced through the text past `offset` tokens."""
    text, _ = load_text(min_chars=(offset + n * length) * 5)
    ids = tok(text, return_tensors="pt").input_ids[:, offset:]
    if ids.shape[1] < n * length:
        raise ValueError(f"the text has {ids.shape[1]} tokens past the offset, {n} x {length} asked")
    stride = ids.shape[1] // n
    return [ids[:, i * stride : i * stride + length] for i in range(n)]
