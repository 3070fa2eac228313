"""`HybridCache`: a transformers `Cache` whose layers keep a small resident set
on the device and everything else in host memory, indexed for retrieval.

Per layer, every position < seq_len is in exactly one place:

    sinks   positions [0, n_sink)                       device, slots [0, n_sink)
    window  the `window` most recent positions          device, ring slots [n_sink, n_sink + window)
    host    positions [n_sink, seq_len - window)        host store, id = position - n_sink

A position leaves the window for the host store (and its indexes) when the
position `window` later arrives. `update()` does this bookkeeping and hands the
layer itself to the registered "hybrid" attention function, which computes
exact prefill attention or the retrieval decode step (engine.attention).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from engine.builder import IndexBuilder
from engine.config import ModelShape, OffloadConfig
from engine.estimate import BlockSummary
from engine.models import check_supported
from engine.store import HostKV, QuerySample

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


class StepStats:
    """Counters of the last decode step of one layer: host tokens (per KV head), and summed
    over KV heads the tokens gathered, tokens estimated (engine.estimate), vectors scanned
    to select them, keys among those, and sketch rows scored (engine.sketch); read_ids
    [Hkv, M] are the host ids it gathered (-1 padded)."""

    __slots__ = ("host_tokens", "gathered", "estimated", "scanned", "keys_scored", "sketched", "read_ids")

    def __init__(self):
        self.host_tokens = self.gathered = self.estimated = self.scanned = self.keys_scored = self.sketched = 0
        self.read_ids = None


class HybridLayer(CacheLayerMixin):
    """Resident sinks + window ring on the device, host KV store, block and key indexes."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(
        self, cfg: OffloadConfig, layer_idx: int, shape: ModelShape, *, capacity: int = 0, progress=None, builder=None
    ):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.builder = builder  # engine.builder.IndexBuilder, or None: builds in the caller's thread
        self.prompt_length = 0  # when known (> 0), the prefill hands the layer to the builder at its last token
        self.n_kv_heads, self.head_dim = shape.num_key_value_heads, shape.head_dim
        self.group = shape.num_attention_heads // shape.num_key_value_heads
        self.capacity_hint = capacity
        self.progress = progress
        self.n_seen = 0
        self.stats = StepStats()
        self.rerun = 0  # the newest positions run again, exactly (HybridCache.rerun_exactly): how many
        self.approximate = 0  # the newest positions written by decode steps that read part of the host store

    # ------------------------------------------------------------ set-up

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        from ann import BlockIndex

        B, Hkv, _, D = key_states.shape
        if B != 1:
            raise ValueError(
                f"this cache layer holds one sequence, got a batch of {B} (batches: engine.batch.BatchLayer)"
            )
        if (Hkv, D) != (self.n_kv_heads, self.head_dim):
            raise ValueError(
                f"layer {self.layer_idx}: expected {self.n_kv_heads} KV heads of dim {self.head_dim}, "
                f"got {Hkv} of dim {D}"
            )
        cfg = self.cfg
        self.device, self.dtype = key_states.device, key_states.dtype
        R = cfg.resident_tokens
        self.resident_k = torch.zeros(Hkv, R, D, device=self.device, dtype=self.dtype)  # [Hkv, sinks + window, D]
        self.resident_v = torch.zeros_like(self.resident_k)
        self.resident_pos = np.full(R, -1, np.int64)  # position held by each slot (-1: empty)
        host_dtype = cfg.resolved_host_dtype(self.dtype)
        host_capacity = max(0, self.capacity_hint - R)
        self.host = HostKV(Hkv, D, host_dtype, pin=self.device.type == "cuda", capacity=host_capacity)
        summaries = dict(device=self.device, dtype=self.dtype)  # block summaries in the model's dtype
        summaries["capacity"] = max(cfg.block_size, host_capacity)
        self.summary = BlockSummary(Hkv, D, cfg.block_size, **summaries) if cfg.estimate else None
        self.blocks = None  # the block selection index: the summary's mean keys where it can be
        if cfg.uses_blocks:
            if self.summary is not None and cfg.landmark == "mean":
                self.blocks = self.summary.keys
            else:
                self.blocks = BlockIndex(Hkv, D, cfg.block_size, cfg.landmark, **summaries)
        pin = self.device.type == "cuda"  # the host kernel's results then reach the device asynchronously
        self.host_out = torch.empty(Hkv * self.group, D, pin_memory=pin)  # [Hq, D] gather-attend output
        self.host_lse = torch.empty(Hkv * self.group, pin_memory=pin)  # [Hq]
        self.key_index = None  # the host key index of every KV head (engine.retrieval), built after prefill
        self.build_waiting = False  # the build waits for a block of host keys (a short prompt)
        self.sketch = None  # the adaptive budget's key sketch (engine.sketch), built with the key index
        self.n_indexed = 0  # host keys the key indexes (and the sketch) hold
        self.n_built = 0  # ... of which the index was built from (the others were added later)
        self.query_sample = QuerySample(cfg.max_build_queries if cfg.uses_key_index else 0)
        self.is_initialized = True

    # --------------------------------------------------------- bookkeeping

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Take the new positions' K/V [1, Hkv, C, D]; return the layer itself as the
        attention function's key and value (it needs the whole state, not tensors)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.wait_for_build()  # a build on the worker thread reads the state this update changes
        if key_states.shape[0] != 1:
            raise ValueError(
                f"this cache holds one sequence (its first input had batch size 1), got a batch of "
                f"{key_states.shape[0]}: start a new HybridCache for a batch"
            )
        k, v = key_states[0], value_states[0]  # [Hkv, C, D]
        if self.rerun:
            self._replace_newest(k, v)
            self.approximate = 0  # older approximate positions, if any, stay so: only the newest run again
            return self, self
        S, W, a, C = self.cfg.n_sink, self.cfg.window, self.n_seen, k.shape[1]

        n_sink_new = max(0, min(C, S - a))
        if n_sink_new:
            self.resident_k[:, a : a + n_sink_new] = k[:, :n_sink_new]
            self.resident_v[:, a : a + n_sink_new] = v[:, :n_sink_new]
            self.resident_pos[a : a + n_sink_new] = np.arange(a, a + n_sink_new)
        p0, p1 = a + n_sink_new, a + C  # positions that enter the window

        # Positions pushed out of the window: older ring entries first, then the
        # chunk's own positions that the rest of the chunk pushes straight through.
        e0, e1 = max(S, p0 - W), max(S, p1 - W)
        if e1 > e0:
            ring = self._ring_segments(e0, min(e1, p0))
            lo, hi = max(e0, p0) - a, max(e1, p0) - a  # chunk offsets that go straight to the host
            self._evict(
                torch.cat([self.resident_k[:, s0:s1] for s0, s1, _ in ring] + [k[:, lo:hi]], dim=1),
                torch.cat([self.resident_v[:, s0:s1] for s0, s1, _ in ring] + [v[:, lo:hi]], dim=1),
            )

        for s0, s1, pos in self._ring_segments(max(p0, p1 - W), p1):  # the chunk positions that stay
            self.resident_k[:, s0:s1] = k[:, pos - a : pos - a + s1 - s0]
            self.resident_v[:, s0:s1] = v[:, pos - a : pos - a + s1 - s0]
            self.resident_pos[s0:s1] = np.arange(pos, pos + s1 - s0)
        self.n_seen += C
        # A chunk attends exactly (prefill attention); one position reads part of the host store if it has any.
        self.approximate = self.approximate + 1 if C == 1 and self.host.n > 0 else 0
        self.last_added = (k, v)  # the chunk's own K/V [Hkv, C, D], which its prefill attention reads
        return self, self

    def _replace_newest(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Positions run again: the K/V [Hkv, C, D] of the C newest positions, all in the window,
        replace those stored; what their first runs moved to the host store was older, so
        nothing else changes. The prefill attention then reads them as a chunk."""
        C, first = k.shape[1], self.n_seen - self.rerun
        if C != self.rerun or first < self.cfg.n_sink or C > self.cfg.window:
            raise ValueError(
                f"positions run again must be the {self.rerun} newest, in the window "
                f"(at most {self.cfg.window} after the sinks); got {C} of {self.n_seen}"
            )
        for s0, s1, pos in self._ring_segments(first, self.n_seen):
            self.resident_k[:, s0:s1] = k[:, pos - first : pos - first + s1 - s0]
            self.resident_v[:, s0:s1] = v[:, pos - first : pos - first + s1 - s0]
        self.last_added = (k, v)

    def _ring_segments(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """Window slots of positions [start, stop) (at most `window` of them), as
        contiguous ranges (slot_begin, slot_end, first position): slicing, not index tensors."""
        S, W = self.cfg.n_sink, self.cfg.window
        segments, pos = [], start
        while pos < stop:
            slot = S + (pos - S) % W
            n = min(stop - pos, S + W - slot)
            segments.append((slot, slot + n, pos))
            pos += n
        return segments

    def _evict(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [Hkv, n, D] of the positions following the host store's last one."""
        self.host.append(k, v)
        if self.summary is not None:
            self.summary.add(k, v)
        if self.blocks is not None and (self.summary is None or self.blocks is not self.summary.keys):
            self.blocks.add(k)
        if self.key_index is not None and self.host.n - self.n_indexed >= self.cfg.block_size:
            self.index_new_keys()

    def index_new_keys(self) -> None:
        """Add the host keys the key indexes have not seen yet. Done a block at a
        time, not every step: until then the decode step attends to those few
        newest host tokens directly (see `unindexed_ids`)."""
        self.wait_for_host_store()
        new = self.host.keys[:, self.n_indexed :]  # [Hkv, n, D]
        self.key_index.add(new)
        if self.sketch is not None:
            self.sketch.add(new)
        self.n_indexed = self.host.n

    def wait_for_build(self) -> None:
        """Until the layer's index build on the worker thread (if any) has finished."""
        if self.builder is not None:
            self.builder.wait(self)

    def wait_for_host_store(self) -> None:
        """Before the host keys are read on the CPU: on CUDA, evictions reach the
        pinned store by asynchronous copies."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def unindexed_ids(self) -> np.ndarray:
        """Host ids [n] of the newest host tokens not yet in the key indexes."""
        return np.arange(self.n_indexed, self.host.n)

    # ------------------------------------------------------------- queries

    def positions(self) -> dict[str, np.ndarray]:
        """Where each position lives: {"sinks", "window", "host"} -> sorted positions."""
        S = self.cfg.n_sink
        pos = self.resident_pos
        return {
            "sinks": np.sort(pos[:S][pos[:S] >= 0]),
            "window": np.sort(pos[S:][pos[S:] >= 0]),
            "host": np.arange(S, S + self.host.n),
        }

    def resident(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Filled resident slots: K, V [Hkv, R, D] (device) and their positions [R]."""
        filled = min(self.n_seen, self.cfg.resident_tokens)  # slots fill in order until the ring wraps
        return self.resident_k[:, :filled], self.resident_v[:, :filled], self.resident_pos[:filled]

    def ordered_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every position's K and V [Hkv, seq_len, D] in position order, on the device
        (a full copy: for evaluation against full attention, not for decoding)."""
        where = self.positions()
        resident = np.concatenate([where["sinks"], where["window"]])
        slots = torch.from_numpy(np.argsort(self.resident_pos)[-len(resident) :]).to(
            self.device
        )  # filled slots by position
        host_k, host_v = (t.to(self.device, self.dtype) for t in (self.host.keys, self.host.values))
        n_sink = len(where["sinks"])
        k = torch.cat([self.resident_k[:, slots[:n_sink]], host_k, self.resident_k[:, slots[n_sink:]]], dim=1)
        v = torch.cat([self.resident_v[:, slots[:n_sink]], host_v, self.resident_v[:, slots[n_sink:]]], dim=1)
        return k, v

    def nbytes(self) -> dict[str, dict[str, int]]:
        if not self.is_initialized:
            return {"device": {}, "host": {}}
        index_device, index_host = self.key_index.nbytes() if self.key_index is not None else (0, 0)
        summary = self.summary
        block_keys = {id(b): b.nbytes for b in (self.blocks, summary and summary.keys) if b is not None}
        device = {
            "resident_kv": self.resident_k.nbytes + self.resident_v.nbytes,
            # a shared index counted once; the summary's superblock keys with the block keys
            "block_index": sum(block_keys.values()) + (summary.coarse_keys.nbytes if summary is not None else 0),
            "block_values": summary.values.nbytes + summary.coarse_values.nbytes if summary is not None else 0,
            "query_index": index_device,
        }
        host = {"kv_store": self.host.nbytes, "key_index": index_host}
        if self.sketch is not None:
            host["key_sketch"] = self.sketch.nbytes
        return {"device": device, "host": host}

    # ------------------------------------------------- transformers' Cache API

    def get_seq_length(self) -> int:
        return self.n_seen - self.rerun  # positions run again take their own positions again

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        self.n_seen = 0
        self.key_index = None
        self.build_waiting = False
        self.sketch = None
        self.n_indexed = self.n_built = 0
        self.last_added = None
        self.stats = StepStats()
        self.rerun = self.approximate = 0

    def offload(self):  # the host store is the offload; nothing moves per layer
        pass

    def prefetch(self):
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("HybridCache does not support beam search")


def sum_bytes(reports) -> dict[str, dict[str, int]]:
    """Byte reports {"device": {...}, "host": {...}} summed part by part."""
    total = {"device": {}, "host": {}}
    for report in reports:
        for where, parts in report.items():
            for name, n in parts.items():
                total[where][name] = total[where].get(name, 0) + n
    return total


class HybridCache(Cache):
    """A `Cache` for the "hybrid" attention implementation.

    `model_or_config` is a model loaded with `attn_implementation="hybrid"` (or
    its config). `max_length`, when known, sizes the host store exactly;
    `prompt_length`, when known, lets each layer's host index be built on a
    worker thread (engine.builder) as soon as the layer has seen the prompt's
    last token, while the prefill goes on (otherwise each layer builds at
    `build_indexes()` or its first decode step); `progress` shows a bar while
    the host indexes are built. `close()` stops the worker threads.
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
    ):
        if not hasattr(model_or_config, "config") and not hasattr(model_or_config, "model_type"):
            raise TypeError(
                f"HybridCache needs a transformers model or its config, got {type(model_or_config).__name__}"
            )
        if not isinstance(offload, (OffloadConfig, type(None))):
            raise TypeError(
                f"offload must be an OffloadConfig (see OffloadConfig.preset), got {type(offload).__name__}"
            )
        for name, value in (("max_length", max_length), ("prompt_length", prompt_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0: unknown), got {value!r}")
        config = getattr(model_or_config, "config", model_or_config)
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        check_supported(config)
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl in BUILTIN_ATTENTION:  # those would be handed the cache layer instead of tensors
            raise ValueError(
                f"the model uses attn_implementation={impl!r}; HybridCache needs 'hybrid' "
                "(load with attn_implementation='hybrid' or call model.set_attn_implementation('hybrid'))"
            )
        self.offload_config = offload or OffloadConfig()
        shape = ModelShape.of(config)
        from engine.retrieval import BuildProgress

        self.build_progress = BuildProgress(shape.num_hidden_layers, enabled=progress)
        cfg = self.offload_config
        self.shape, self.max_length = shape, max_length
        self.builder = IndexBuilder(cfg.build_workers) if prompt_length and cfg.build_workers else None
        layers = [
            HybridLayer(cfg, i, shape, capacity=max_length, progress=self.build_progress, builder=self.builder)
            for i in range(shape.num_hidden_layers)
        ]
        for layer in layers:
            layer.prompt_length = prompt_length
        super().__init__(layers=layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """As transformers' caches: a layer's first update with a batch of B > 1 sequences
        makes it an `engine.batch.BatchLayer` of B sequence layers."""
        layer = self.layers[layer_idx]
        if key_states.shape[0] > 1 and isinstance(layer, HybridLayer) and not layer.is_initialized:
            from engine.batch import BatchLayer

            self.layers[layer_idx] = BatchLayer([self._sequence_layer(layer_idx) for _ in range(key_states.shape[0])])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _sequence_layer(self, layer_idx: int) -> HybridLayer:
        """One sequence's layer in a batch (its index builds after the prefill: prompt lengths differ)."""
        return HybridLayer(
            self.offload_config, layer_idx, self.shape, capacity=self.max_length, progress=self.build_progress
        )

    @classmethod
    def stack(cls, caches: list[HybridCache]) -> HybridCache:
        """One cache decoding the sequences of `caches` (each prefilled alone, batch size 1)
        together: their layers are moved, not copied, and the caches given up. The batch's
        padded timeline is as long as the longest sequence (the others left-padded)."""
        from engine.batch import BatchLayer

        if not caches or not all(isinstance(c, HybridCache) for c in caches):
            raise TypeError("HybridCache.stack takes a non-empty list of HybridCache")
        first = caches[0]
        for c in caches[1:]:
            if c.offload_config != first.offload_config or c.shape != first.shape:
                raise ValueError("stacked caches must share the model and the offload configuration")
        for c in caches:
            if any(not isinstance(layer, HybridLayer) or not layer.is_initialized for layer in c.layers):
                raise ValueError("stack prefilled single-sequence caches (every layer holds one sequence)")
            for layer in c.layers:  # builds overlapped with a prefill finish in their cache's threads
                layer.wait_for_build()
                layer.builder = None
            c.close()
        batch = cls.__new__(cls)
        Cache.__init__(
            batch,
            layers=[
                BatchLayer([c.layers[i] for c in caches], max(c.layers[i].n_seen for c in caches))
                for i in range(len(first.layers))
            ],
        )
        batch.offload_config, batch.shape, batch.max_length = first.offload_config, first.shape, first.max_length
        batch.build_progress, batch.builder = first.build_progress, None
        for c in caches:  # the layers now belong to the batch
            c.layers = []
        return batch

    def sequence_layers(self) -> list[HybridLayer]:
        """Every sequence's layer, of every model layer."""
        out = []
        for layer in self.layers:
            out.extend(getattr(layer, "seqs", [layer]))
        return out

    def approximate_newest(self, row: int = 0) -> int:
        """How many of sequence `row`'s newest positions came from decode steps that read part
        of the host store, since its last exact chunk (prefill or run again): those a re-check
        runs again (engine.recheck). The same in every layer: layer 0's count."""
        layer = self.layers[0]
        seq = layer.seqs[row] if hasattr(layer, "seqs") else layer
        return seq.approximate if seq.is_initialized else 0

    @contextmanager
    def rerun_exactly(self, rows: list[int], positions: int = 1):
        """Within: the model's next forward pass runs the `positions` newest positions of the
        sequences `rows` (indices into the batch; [0] for one sequence) again, given their
        tokens and positions again, as a prefill chunk: exact attention to every earlier
        position, host tokens included. Each layer replaces those positions' K/V (they must
        lie in the window), so that they, and the last one's logits, are full attention's
        wherever the positions before them are (engine.recheck)."""
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
        for layer in layers:
            layer.rerun = positions
        try:
            yield
        finally:
            for layer in layers:
                layer.rerun = 0
            for batch in batches:
                batch.widen()

    def build_indexes(self) -> None:
        """Build every layer's host key index now (or wait for its build on the worker thread)."""
        from engine.retrieval import build_key_index

        if not self.offload_config.uses_key_index:
            return
        for layer in self.sequence_layers():
            layer.wait_for_build()
            if layer.is_initialized and layer.key_index is None:
                build_key_index(layer)

    def close(self) -> None:
        """Stop the index builds' worker threads (builds not started are dropped; a layer
        without its index builds it at its next decode step)."""
        if self.builder is not None:
            self.builder.close()

    def memory_report(self) -> dict[str, dict[str, int]]:
        """Bytes held by the cache: {"device": {...}, "host": {...}} summed over layers."""
        return sum_bytes(layer.nbytes() for layer in self.layers)

    def step_stats(self) -> dict[str, float]:
        """The last decode step over all layers (and sequences): host tokens, tokens gathered and estimated,
        vectors scanned, keys and sketch rows scored, and kv_read_frac = gathered / host tokens."""
        layers = [layer for layer in self.sequence_layers() if layer.is_initialized]
        host = sum(layer.stats.host_tokens * layer.n_kv_heads for layer in layers)
        gathered = sum(layer.stats.gathered for layer in layers)
        scanned = sum(layer.stats.scanned for layer in layers)
        keys = sum(layer.stats.keys_scored for layer in layers)
        return {
            "host_tokens": host,
            "gathered": gathered,
            "estimated": sum(layer.stats.estimated for layer in layers),
            "scanned": scanned,
            "keys_scored": keys,
            "sketched": sum(layer.stats.sketched for layer in layers),
            "kv_read_frac": gathered / host if host else 0.0,
            "keys_scored_frac": keys / host if host else 0.0,
        }
