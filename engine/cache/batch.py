"""`BatchLayer`: one model layer's cache for B sequences decoded together.

Each sequence keeps its own `HybridLayer` (resident set, host store, block and
key indexes): nothing is shared between sequences but the forward passes. The
batch lives on one padded timeline of `n_columns` columns, as transformers
sees it: prompts of different lengths are left-padded, and a padding column
never reaches a sequence's cache. Which columns are padding only the attention
mask says, and the attention function sees it after `update()`: so `update()`
keeps the chunk, and the attention function hands each sequence its real
columns (`take_chunk`) before attending (engine.attention).
"""

from __future__ import annotations

import torch

from ann.block import to_device
from engine.cache.layer import EngineLayer, HybridLayer, sum_bytes


class BatchLayer(EngineLayer):
    """The B sequences' `HybridLayer`s of one model layer, on one padded timeline."""

    def __init__(self, seqs: list[HybridLayer], n_columns: int = 0):
        super().__init__()
        if not seqs:
            raise ValueError("a batch needs at least one sequence")
        self.seqs = list(seqs)
        self.n_columns = n_columns  # the padded timeline's length
        self.chunk = None  # the latest update's K/V [B, Hkv, C, D], until the attention takes it
        self.whole = None  # while narrowed to the rows of a step run again: the batch's sequences
        self.left: list[HybridLayer] = []  # sequences that left the batch, until the cache is released
        self.is_initialized = True

    @property
    def batch_size(self) -> int:
        return len(self.seqs)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != self.batch_size:
            raise ValueError(f"the cache holds {self.batch_size} sequences, got a batch of {key_states.shape[0]}")
        self.chunk = (key_states, value_states)
        if self.whole is None:  # positions run again (narrow) take their columns again
            self.n_columns += key_states.shape[2]
        return self, self

    def take_chunk(self, valid: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Give each sequence the real columns of the latest chunk (valid [B, C] bool; None:
        every column is real). Returns each sequence's column indices [n] (None: all C)."""
        if self.chunk is None:
            raise RuntimeError("the batch's attention ran twice on one chunk, or before any update")
        k, v = self.chunk
        self.chunk = None
        columns = []
        for b, seq in enumerate(self.seqs):
            cols = None if valid is None or bool(valid[b].all()) else to_device(valid[b].nonzero()[:, 0], k.device)
            if cols is None:
                seq.update(k[b : b + 1], v[b : b + 1])
            elif len(cols):
                seq.update(k[b : b + 1, :, cols], v[b : b + 1, :, cols])
            columns.append(cols)
        return columns

    def batch_select_indices(self, indices) -> None:
        """Keep the sequences `indices` (in that order), e.g. the unfinished ones. The others are
        set aside: their host stores go back to the pool when the cache is released."""
        rows = [int(i) for i in indices]
        if len(set(rows)) != len(rows) or not all(0 <= r < len(self.seqs) for r in rows):
            # a row twice would share one layer: each token stored twice, once per row
            raise ValueError(
                f"a batch keeps distinct rows of its {len(self.seqs)} (a HybridCache does not copy a sequence), "
                f"got {rows}"
            )
        kept = [self.seqs[r] for r in rows]
        self.left.extend(seq for seq in self.seqs if not any(seq is k for k in kept))
        self.seqs = kept

    def narrow(self, rows: list[int]) -> None:
        """Hold only the sequences `rows` while their newest positions run again (HybridCache.rerun_exactly)."""
        self.whole, self.seqs = self.seqs, [self.seqs[r] for r in rows]

    def widen(self) -> None:
        """Hold every sequence of the batch again after `narrow`."""
        self.seqs, self.whole = self.whole, None

    def nbytes(self) -> dict[str, dict[str, int]]:
        return sum_bytes(seq.nbytes() for seq in self.seqs)

    # ------------------------------------------------- transformers' Cache API

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # each sequence initialises its own layer at its first real column

    def get_seq_length(self) -> int:
        return self.n_columns - (self.seqs[0].rerun if self.whole is not None else 0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        for seq in self.seqs:
            seq.reset()
        self.n_columns, self.chunk = 0, None
