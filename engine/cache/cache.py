"""`HybridCache`: a transformers `Cache` of `HybridLayer`s (one sequence) or
`BatchLayer`s (a batch decoded together), with the memory report and the step
counters summed over layers, and the exact re-run of a sequence's newest positions."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache

from engine.cache.batch import BatchLayer
from engine.cache.layer import HybridLayer, LayerMark, sum_bytes
from engine.cache.store import StorePool
from engine.config import OffloadConfig, offload_or_default
from engine.index.build import BuildProgress, build_key_index
from engine.index.heads import check_index_params
from engine.index.worker import IndexBuilder
from engine.models import check_supported
from engine.plan import ModelShape

# transformers' own attention implementations, which expect K/V tensors from the cache
BUILTIN_ATTENTION = (
    "eager",
    "sdpa",
    "flex_attention",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "paged|eager",
)


def check_offload_fits(config, offload: OffloadConfig | None):
    """A model's (text) config, checked against what an offload configuration asks of it: a model type
    the hybrid attention serves, and key index parameters the index takes at the model's head dim. Each
    cache checks; HybridLLM.from_pretrained checks before the weights load."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    check_supported(config)
    cfg = offload_or_default(offload)
    if cfg.uses_key_index and cfg.index_params:
        check_index_params(cfg.key_index, ModelShape.of(config).head_dim, cfg.index_params)
    return config


class HybridCache(Cache):
    """A `Cache` for the "hybrid" attention implementation.

    `model_or_config` is a model loaded with `attn_implementation="hybrid"` (or
    its config). `max_length`, when known, sizes the host store exactly, and
    the resident set at no more slots than that (else at the first chunk's; both grow if the
    sequence goes further);
    `prompt_length`, when known, lets each layer's host index be built on a
    worker thread (engine.index.worker) as soon as the layer has seen the prompt's
    last token, while the prefill goes on (otherwise each layer builds at
    `build_indexes()` or its first decode step); `progress` shows a bar while
    the host indexes are built. `close()` stops the worker threads. With
    `stores` (an engine.cache.store.StorePool), the host stores come from that
    pool, allocated ahead on its thread when a model and `max_length` are
    given, and `release()` gives them back.
    Use it with `model.generate(..., cache=HybridCache(model, cfg))`.
    """

    def __init__(
        self,
        model_or_config,
        offload: OffloadConfig | None = None,
        *,
        max_length: int = 0,
        prompt_length: int = 0,
        progress: bool = True,
        stores: StorePool | None = None,
    ):
        if not hasattr(model_or_config, "config") and not hasattr(model_or_config, "model_type"):
            raise TypeError(
                f"HybridCache needs a transformers model or its config, got {type(model_or_config).__name__}"
            )
        for name, value in (("max_length", max_length), ("prompt_length", prompt_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0: unknown), got {value!r}")
        config = check_offload_fits(getattr(model_or_config, "config", model_or_config), offload)
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl in BUILTIN_ATTENTION:  # those would be handed the cache layer instead of tensors
            raise ValueError(
                f"the model uses attn_implementation={impl!r}; HybridCache needs 'hybrid' "
                "(load with attn_implementation='hybrid' or call model.set_attn_implementation('hybrid'))"
            )
        self.offload_config = offload_or_default(offload)
        shape = ModelShape.of(config)
        self.build_progress = BuildProgress(shape.num_hidden_layers, enabled=progress)
        cfg = self.offload_config
        self.shape, self.max_length, self.stores = shape, max_length, stores
        building = prompt_length and cfg.build_workers and cfg.uses_key_index  # no key index: nothing to build
        self.builder = IndexBuilder(cfg.build_workers) if building else None
        layers = [
            HybridLayer(
                cfg, i, shape, capacity=max_length, progress=self.build_progress, builder=self.builder, stores=stores
            )
            for i in range(shape.num_hidden_layers)
        ]
        if stores is not None and max_length and hasattr(model_or_config, "parameters"):
            weight = next(model_or_config.parameters())  # the K/V's device and dtype, before the first update
            stores.prepare(
                shape.num_hidden_layers,
                shape.num_key_value_heads,
                shape.head_dim,
                cfg.resolved_host_dtype(weight.dtype),
                pin=weight.device.type == "cuda",
                capacity=max(0, max_length - cfg.resident_tokens),
            )
        for layer in layers:
            layer.prompt_length = prompt_length
        super().__init__(layers=layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """As transformers' caches: a layer's first update with a batch of B > 1 sequences
        makes it an `engine.cache.batch.BatchLayer` of B sequence layers."""
        layer = self.layers[layer_idx]
        if key_states.shape[0] > 1 and isinstance(layer, HybridLayer) and not layer.is_initialized:
            self.layers[layer_idx] = BatchLayer([self._sequence_layer(layer_idx) for _ in range(key_states.shape[0])])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _sequence_layer(self, layer_idx: int) -> HybridLayer:
        """One sequence's layer in a batch (its index builds after the prefill: prompt lengths differ)."""
        return HybridLayer(
            self.offload_config,
            layer_idx,
            self.shape,
            capacity=self.max_length,
            progress=self.build_progress,
            stores=self.stores,
        )

    @classmethod
    def stack(cls, caches: list[HybridCache]) -> HybridCache:
        """One cache decoding the sequences of `caches` (each prefilled alone, batch size 1)
        together: their layers are moved, not copied, and the caches given up. The batch's
        padded timeline is as long as the longest sequence (the others left-padded)."""
        if not caches or not all(isinstance(c, HybridCache) for c in caches):
            raise TypeError("HybridCache.stack takes a non-empty list of HybridCache")
        if len({id(c) for c in caches}) != len(caches):  # rows sharing a layer would count each token twice
            raise ValueError("HybridCache.stack takes distinct caches: one is listed twice")
        first = caches[0]
        _hand_over(caches, first)
        batch = cls.__new__(cls)
        Cache.__init__(
            batch,
            layers=[
                BatchLayer([c.layers[i] for c in caches], max(c.layers[i].n_seen for c in caches))
                for i in range(len(first.layers))
            ],
        )
        batch.offload_config, batch.shape, batch.max_length = first.offload_config, first.shape, first.max_length
        batch.stores = first.stores
        batch.build_progress, batch.builder = first.build_progress, None
        for c in caches:  # the layers now belong to the batch
            c.layers = []
        return batch

    def join(self, other: HybridCache) -> None:
        """Take the one sequence of `other` (prefilled alone) into this cache, between decode steps, as the
        last sequence of its batch (a cache of one sequence becomes a batch of two): its layers are moved,
        not copied, and `other` given up. The batch's timeline grows to the longest sequence's."""
        if not isinstance(other, HybridCache) or other is self:
            raise TypeError("HybridCache.join takes another HybridCache")
        _hand_over([other], self)
        if any(isinstance(layer, HybridLayer) and not layer.is_initialized for layer in self.layers):
            raise ValueError("a sequence joins a cache whose every layer holds its sequences (after a prefill)")
        self.layers = [
            BatchLayer([layer], layer.n_seen) if isinstance(layer, HybridLayer) else layer for layer in self.layers
        ]
        for batch, layer in zip(self.layers, other.layers):
            batch.seqs.append(layer)
            batch.n_columns = max(batch.n_columns, layer.n_seen)
        other.layers = []

    def sequence_layers(self) -> list[HybridLayer]:
        """Every sequence's layer, of every model layer."""
        out = []
        for layer in self.layers:
            out.extend(getattr(layer, "seqs", [layer]))
        return out

    def approximate_newest(self, row: int = 0) -> int:
        """How many of sequence `row`'s newest positions came from decode steps that read part
        of the host store, since its last exact chunk (prefill or run again): those a re-check
        runs again (engine.decode.recheck). The same in every layer: layer 0's count."""
        seq = self._first_layer(row)
        return seq.approximate if seq.is_initialized else 0

    def host_tokens(self, row: int = 0) -> int:
        """How many of sequence `row`'s positions the host store holds. The same in every layer:
        layer 0's count."""
        seq = self._first_layer(row)
        return seq.host.n if seq.is_initialized else 0

    def _first_layer(self, row: int) -> HybridLayer:
        return _sequence(self.layers[0], row)

    def rerun_exactly(self, rows: list[int], positions: int = 1):
        """Within: the model's next forward pass runs the `positions` newest positions of the
        sequences `rows` (indices into the batch; [0] for one sequence) again, given their
        tokens and positions again, as a prefill chunk: exact attention to every earlier
        position, host tokens included. Each layer replaces those positions' K/V (they must
        lie in the window), so that they, and the last one's logits, are full attention's
        wherever the positions before them are (engine.decode.recheck)."""
        return self._rerun(rows, positions, None)

    def rerun_wider(self, rows: list[int], factor: float):
        """Within: the model's next forward pass runs the newest position of the sequences `rows`
        again, given its token and position again, as a decode step that reads with the
        configuration widened `factor` times (OffloadConfig.widened). Each layer replaces the
        position's K/V; it still counts as approximate (engine.decode.recheck)."""
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1 <= factor < float("inf"):
            raise ValueError(f"a wider run reads a finite factor >= 1 times as much, got {factor!r}")
        return self._rerun(rows, 1, self.offload_config.widened(factor))

    @contextmanager
    def _rerun(self, rows: list[int], positions: int, wider: OffloadConfig | None):
        rows = [int(r) for r in rows]
        batches = [layer for layer in self.layers if not isinstance(layer, HybridLayer)]
        size = batches[0].batch_size if batches else 1
        if not rows or len(set(rows)) != len(rows) or not all(0 <= r < size for r in rows):
            raise ValueError(f"rows to run again must be distinct indices into a batch of {size}, got {rows}")
        if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
            raise ValueError(f"positions to run again must be an int >= 1, got {positions!r}")
        if batches and len(batches) != len(self.layers):
            raise ValueError("run a step again once every layer holds the batch (after the first decode step)")
        for batch in batches:
            batch.narrow(rows)
        layers = self.sequence_layers()
        own = [layer.cfg for layer in layers]
        for layer in layers:
            layer.rerun, layer.rerun_wide = positions, wider is not None
            layer.cfg = wider or layer.cfg
        try:
            yield
        finally:
            for layer, cfg in zip(layers, own):
                layer.rerun, layer.rerun_wide, layer.cfg = 0, False, cfg
            for batch in batches:
                batch.widen()

    def mark(self) -> list[LayerMark]:
        """The state of this cache of one prefilled sequence, its indexes built, for `rewind` to take it
        back there after more positions: a prefix shared by several prompts (engine.prefix)."""
        single = all(isinstance(layer, HybridLayer) and layer.is_initialized for layer in self.layers)
        if not self.layers or not single:
            raise ValueError("a mark is taken of a prefilled cache of one sequence (every layer holds its positions)")
        self.build_indexes()
        self.close()  # its builds are done; none is handed over again
        for layer in self.layers:
            layer.builder = None
        return [layer.mark() for layer in self.layers]

    def rewind(self, marks: list[LayerMark]) -> None:
        """Back to the positions, resident set and indexes of `mark()`'s result, taken of this cache."""
        if len(marks) != len(self.layers) or any(not isinstance(layer, HybridLayer) for layer in self.layers):
            raise ValueError("a cache rewinds to a mark of its own, taken while it held one sequence")
        for layer, mark in zip(self.layers, marks):
            layer.rewind(mark)

    def build_indexes(self, before_each: Callable[[], None] | None = None) -> None:
        """Build every layer's host key index now (or wait for its build on the worker thread); `before_each()`
        is called before each layer's (it may raise to give the builds up)."""
        if not self.offload_config.uses_key_index:
            return
        for layer in self.sequence_layers():
            if before_each is not None:
                before_each()
            layer.wait_for_build()
            if layer.is_initialized and layer.key_index is None:
                build_key_index(layer)

    @contextmanager
    def builds_after(self):
        """Within, a prefill's layers do not hand themselves to the build worker at the prompt's last token
        (their builds would share the cores with the rest of that chunk); after, where the prompt is in,
        every layer without its index is handed over at once, to build while what follows runs."""
        layers = [layer for layer in self.layers if isinstance(layer, HybridLayer)]
        for layer in layers:
            layer.builder = None
        try:
            yield
        finally:
            for layer in layers:
                layer.builder = self.builder
        if self.builder is None:
            return
        for layer in layers:
            if layer.is_initialized and layer.key_index is None and layer.n_seen >= layer.prompt_length > 0:
                self.builder.submit(layer)

    def builds_done(self) -> bool:
        """Whether the index builds overlapped with the prefill are all done: `build_indexes` would not wait
        for the worker thread."""
        return self.builder is None or self.builder.idle()

    def close(self) -> None:
        """Stop the index builds' worker threads (builds not started are dropped; a layer
        without its index builds it at its next decode step)."""
        if self.builder is not None:
            self.builder.close()

    def release(self) -> None:
        """The end of the cache: its host stores go back to their pool (when it has one) for the
        next cache, and every layer is emptied (used again, it starts over); so are the layers of
        sequences that left a batch, and a batch's layers become one sequence's again (as `reset` makes them)."""
        self.close()
        _give_back(self.sequence_layers() + self._left())
        self._one_sequence()
        self.build_progress.reset()

    def reset(self) -> None:
        """transformers' `Cache.reset`: every layer emptied, as `release` does, once its index build has
        finished (a build still running would attach the old sequence's index); the cache is used again,
        with a batch of any size (a batch's layers become one sequence's again)."""
        layers = self.sequence_layers() + self._left()
        for layer in layers:
            layer.wait_for_build()
        _give_back(layers)
        super().reset()
        self._one_sequence()
        self.build_progress.reset()

    def _one_sequence(self) -> None:
        """A batch's layers, emptied, replaced by one sequence's (a batch of any size may come next; the batch's
        timeline and sequences that left went with them)."""
        self.layers = [
            self._sequence_layer(i) if isinstance(layer, BatchLayer) else layer for i, layer in enumerate(self.layers)
        ]

    def _left(self) -> list[HybridLayer]:
        """The layers of sequences that left the batch (engine.cache.batch.BatchLayer.left)."""
        return [seq for layer in self.layers for seq in getattr(layer, "left", ())]

    def keep_only(self, own: list[HybridLayer]) -> None:
        """Back to the one sequence whose layers are `own` (this cache's `layers` before others joined it:
        a prefix's, engine.prefix.Prefix.rewind), whether it is still decoding in the batch or left it; the
        sequences that joined give their host stores back, as `release` does."""
        held = [getattr(layer, "seqs", [layer]) + getattr(layer, "left", []) for layer in self.layers]
        if len(own) != len(held) or not all(any(seq is mine for seq in seqs) for mine, seqs in zip(own, held)):
            raise ValueError("a cache keeps only a sequence of its own: its layer of each model layer")
        self.close()
        _give_back([seq for mine, seqs in zip(own, held) for seq in seqs if seq is not mine])
        self.layers = list(own)

    def memory_report(self) -> dict[str, dict[str, int]]:
        """Bytes held by the cache: {"device": {...}, "host": {...}} summed over layers."""
        return sum_bytes(layer.nbytes() for layer in self.layers)

    def step_stats(self, row: int | None = None) -> dict[str, float]:
        """The last decode step over all layers, of every sequence (row None) or of sequence
        `row` of the batch: host tokens, tokens gathered and estimated, vectors scanned, keys
        scored and candidates rated, and the tokens gathered, keys scored and candidates rated as
        shares of the host tokens."""
        if row is None:
            layers = self.sequence_layers()
        else:
            layers = [_sequence(layer, row) for layer in self.layers]
        layers = [layer for layer in layers if layer.is_initialized]
        host = sum(layer.stats.host_tokens * layer.n_kv_heads for layer in layers)
        gathered = sum(layer.stats.gathered for layer in layers)
        scanned = sum(layer.stats.scanned for layer in layers)
        keys = sum(layer.stats.keys_scored for layer in layers)
        rated = sum(layer.stats.rated for layer in layers)
        return {
            "host_tokens": host,
            "gathered": gathered,
            "estimated": sum(layer.stats.estimated for layer in layers),
            "scanned": scanned,
            "keys_scored": keys,
            "rated": rated,
            "kv_read_frac": gathered / host if host else 0.0,
            "keys_scored_frac": keys / host if host else 0.0,
            "rated_frac": rated / host if host else 0.0,
        }


def _sequence(layer, row: int) -> HybridLayer:
    """Sequence `row`'s layer of a model layer (a HybridLayer is a batch of one)."""
    seqs = getattr(layer, "seqs", [layer])
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < len(seqs):
        raise IndexError(f"row {row!r} is not a sequence of this cache's batch of {len(seqs)}")
    return seqs[row]


def _give_back(layers: list[HybridLayer]) -> None:
    """Sequence layers emptied (used again, they start over), their host stores back to the pool they came from."""
    for layer in layers:
        if layer.is_initialized and layer.stores is not None:
            layer.stores.give([layer.host])
            layer.host = None  # the next cache's now
        layer.reset()


def _hand_over(caches: list[HybridCache], like: HybridCache) -> None:
    """Check that `caches` each hold one prefilled sequence of `like`'s model and offload configuration, and
    make their layers ready to move into another cache: their overlapped index builds finished, their build
    threads stopped."""
    for c in caches:
        if c.offload_config != like.offload_config or c.shape != like.shape:
            raise ValueError("caches stacked or joined must share the model and the offload configuration")
        if len(c.layers) != len(like.layers) or any(
            not isinstance(layer, HybridLayer) or not layer.is_initialized for layer in c.layers
        ):
            raise ValueError("stack or join prefilled single-sequence caches (every layer holds one sequence)")
    for c in caches:
        for layer in c.layers:  # builds overlapped with a prefill finish in their cache's threads
            layer.wait_for_build()
            layer.builder = None
        c.close()
