"""`HybridLayer`: one model layer's cache for one sequence, a small resident set
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

import copy
from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import CacheLayerMixin

from ann.block import BlockIndex, to_device
from engine.cache.store import DeviceRows, DirectCopies, HostKV, QuerySample, SideStreamCopies, StorePool, rows_on
from engine.config import OffloadConfig
from engine.decode.estimate import BlockSummary, block_dots
from engine.decode.sketch import ExactKeys
from engine.plan import ModelShape


class StepStats:
    """Counters of the last decode step of one layer: host tokens (per KV head), and summed
    over KV heads the tokens gathered, tokens estimated (engine.decode.estimate), vectors scanned
    to select them, keys among those, and candidates rated on their keys or on the key sketch
    (engine.decode.rate); read_ids [Hkv, M] are the host ids it gathered (-1 padded)."""

    __slots__ = ("host_tokens", "gathered", "estimated", "scanned", "keys_scored", "rated", "read_ids")

    def __init__(self):
        self.host_tokens = self.gathered = self.estimated = self.scanned = self.keys_scored = self.rated = 0
        self.read_ids = None


@dataclass
class LayerMark:
    """A layer's state at a point of its sequence (`HybridLayer.mark`), to `rewind` to after more positions:
    its resident set copied, and what the host store and the indexes, which only grow, need to drop
    what came after."""

    n_seen: int
    approximate: int
    resident: tuple[torch.Tensor, torch.Tensor, np.ndarray]
    host_n: int
    summary: tuple | None
    blocks: tuple | None
    key_index: object
    key_index_mark: object
    sketch: object
    sketch_mark: object
    n_indexed: int
    n_built: int
    build_waiting: bool
    query_sample: QuerySample | None  # while the key index waits for its build

    def nbytes(self) -> dict[str, int]:
        """Bytes of its copies, where the cache's report counts what they copy: the resident set and
        the blocks' filling tails on the device, the key index's and the sketch's on the host."""
        device = _bytes(self.resident) + _bytes(self.summary) + _bytes(self.blocks)
        return {"device": device, "host": _bytes(self.key_index_mark) + _bytes(self.sketch_mark)}


def _bytes(x) -> int:
    """Bytes of the tensors, arrays and indexes in x (nested tuples and lists; each by its `nbytes`)."""
    if isinstance(x, (tuple, list)):
        return sum(_bytes(y) for y in x)
    return int(getattr(x, "nbytes", 0))


class EngineLayer(CacheLayerMixin):
    """A HybridCache's layer, as transformers' Cache calls see it: what it need not do (its host store is the
    offload: nothing moves per layer), and what it does not do, refused by name (an AttributeError before)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def offload(self):
        pass

    def prefetch(self):
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("HybridCache does not support beam search")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("HybridCache does not crop its positions: rewind it to a mark() taken before them")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError(
            "HybridCache does not copy a sequence (num_return_sequences > 1): stack caches prefilled apart "
            "(HybridCache.stack)"
        )


class HybridLayer(EngineLayer):
    """Resident sinks + window ring on the device, host KV store, block and key indexes."""

    def __init__(
        self,
        cfg: OffloadConfig,
        layer_idx: int,
        shape: ModelShape,
        *,
        capacity: int = 0,
        progress=None,
        builder=None,
        stores: StorePool | None = None,
    ):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.builder = builder  # engine.index.worker.IndexBuilder, or None: builds in the caller's thread
        self.stores = stores  # where the host store comes from (None: a new one)
        self.prompt_length = 0  # when known (> 0), the prefill hands the layer to the builder at its last token
        self.failed_build = None  # the error of its build, raised in a forward pass: the cache cannot go on
        self.n_kv_heads, self.head_dim = shape.num_key_value_heads, shape.head_dim
        self.group = shape.num_attention_heads // shape.num_key_value_heads
        self.capacity_hint = capacity
        self.progress = progress
        self.n_seen = 0
        self.stats = StepStats()
        self.rerun = 0  # the newest positions run again (HybridCache.rerun_exactly / rerun_wider): how many
        self.rerun_wide = False  # ... as a decode step with a wider selection, not exactly
        self.approximate = 0  # the newest positions written by decode steps that read part of the host store
        self.device_rows: DeviceRows | None = None  # host rows also on the device (engine.layer_prefill)

    # ------------------------------------------------------------ set-up

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, Hkv, C, D = key_states.shape
        if B != 1:
            raise ValueError(
                f"this cache layer holds one sequence, got a batch of {B} (batches: engine.cache.batch.BatchLayer)"
            )
        self._check_heads(Hkv, D)
        cfg = self.cfg
        self.device, self.dtype = key_states.device, key_states.dtype
        R = cfg.resident_tokens
        host_capacity = max(0, self.capacity_hint - R)
        try:
            self._allocate_device_buffers(Hkv, D, host_capacity, first_chunk=C)
        except (RuntimeError, MemoryError) as error:  # torch's allocators (torch.OutOfMemoryError too), numpy's
            raise ValueError(
                f"layer {self.layer_idx}: its buffers for n_sink + window = {R} resident tokens and blocks of "
                f"block_size = {cfg.block_size} tokens could not be allocated on {self.device} (lower those "
                f"OffloadConfig fields): {error}"
            ) from error
        cuda = self.device.type == "cuda"
        copies = SideStreamCopies(self.device) if cuda else DirectCopies()  # evictions overlap the next compute
        make = self.stores.take if self.stores is not None else HostKV  # after the buffers: none taken in vain
        self.host = make(Hkv, D, cfg.resolved_host_dtype(self.dtype), pin=cuda, capacity=host_capacity, copies=copies)
        self.host_out = torch.empty(Hkv * self.group, D, pin_memory=cuda)  # [Hq, D] gather-attend output
        self.host_lse = torch.empty(Hkv * self.group, pin_memory=cuda)  # [Hq] (pinned: they reach a GPU asynchronously)
        self.key_index = None  # the host key index of every KV head (engine.decode.select), built after prefill
        self.build_waiting = False  # the build waits for a block of host keys (a short prompt)
        self.sketch = None  # the adaptive budget's key sketch (engine.decode.sketch), built with the key index
        self.n_indexed = 0  # host keys the key indexes (and the sketch) hold
        self.n_built = 0  # ... of which the index was built from (the others were added later)
        self.query_sample = QuerySample(cfg.max_build_queries if cfg.uses_key_index else 0, self.prompt_length)
        self.is_initialized = True

    def _allocate_device_buffers(self, Hkv: int, D: int, host_capacity: int, first_chunk: int) -> None:
        """The buffers whose sizes the configuration sets: the resident set's (sinks + window, or the
        sequence's expected length where that is shorter: `capacity`, else its first chunk, the prompt
        of a transformers generate) and the block summaries' and block index's (a block still filling
        is kept whole)."""
        cfg = self.cfg
        slots = min(cfg.resident_tokens, self.capacity_hint or first_chunk)  # a shorter sequence fills no more
        self.resident_k = torch.zeros(Hkv, slots, D, device=self.device, dtype=self.dtype)
        self.resident_v = torch.zeros_like(self.resident_k)  # [Hkv, <= sinks + window, D]
        self.resident_pos = np.full(slots, -1, np.int64)  # position held by each slot (-1: empty)
        summaries = dict(device=self.device, dtype=self.dtype)  # block summaries in the model's dtype
        summaries["capacity"] = max(cfg.block_size, host_capacity)
        self.summary = BlockSummary(Hkv, D, cfg.block_size, **summaries) if cfg.estimate else None
        self.blocks = None  # the block selection index: the summary's mean keys where it can be
        if cfg.uses_blocks:
            if self.summary is not None and cfg.landmark == "mean":
                self.blocks = self.summary.keys
            else:
                self.blocks = BlockIndex(Hkv, D, cfg.block_size, cfg.landmark, dots=block_dots, **summaries)

    # --------------------------------------------------------- bookkeeping

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Take the new positions' K/V [1, Hkv, C, D]; return the layer itself as the
        attention function's key and value (it needs the whole state, not tensors)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.failed_build is not None:
            raise RuntimeError(
                f"layer {self.layer_idx}'s host index build failed in a forward pass that the layers before it "
                "had taken: the cache cannot go on (release it and start over)"
            ) from self.failed_build
        try:
            self.wait_for_build()  # a build on the worker thread reads the state this update changes
        except Exception as error:
            self.failed_build = error  # a retry went on with the layers out of step, without a word
            raise
        if key_states.shape[0] != 1:
            raise ValueError(
                f"this cache holds one sequence (its first input had batch size 1), got a batch of "
                f"{key_states.shape[0]}: start a new HybridCache for a batch"
            )
        k, v = key_states[0], value_states[0]  # [Hkv, C, D]
        if self.rerun:
            self._replace_newest(k, v)
            if not self.rerun_wide:  # a wider run reads part of the host store still: its positions stay approximate
                self.approximate = 0  # older approximate positions, if any, stay so: only the newest run again
            return self, self
        S, W, a, C = self.cfg.n_sink, self.cfg.window, self.n_seen, k.shape[1]
        self._reserve_slots(min(S + W, a + C))

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

    def _reserve_slots(self, n: int) -> None:
        """At least n resident slots (n <= sinks + window). Sized for the sequence's expected length
        (`capacity`, else its first chunk), the buffers grow, at least twofold, when it goes further;
        the ring has not wrapped yet then (slot = position), so the filled slots keep their places."""
        have = self.resident_pos.shape[0]
        if n <= have:
            return
        slots = min(self.cfg.resident_tokens, max(n, 2 * have))
        try:
            k, v = (t.new_zeros(t.shape[0], slots, t.shape[2]) for t in (self.resident_k, self.resident_v))
        except (RuntimeError, MemoryError) as error:
            raise ValueError(
                f"layer {self.layer_idx}: its resident set (n_sink + window = {self.cfg.resident_tokens} tokens) "
                f"could not grow to {slots} slots on {self.device} past the length the cache was sized for: {error}"
            ) from error
        k[:, :have], v[:, :have] = self.resident_k, self.resident_v
        self.resident_k, self.resident_v = k, v
        self.resident_pos = np.concatenate([self.resident_pos, np.full(slots - have, -1, np.int64)])

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
        if self.device_rows is not None:
            self.device_rows.append(k, v)
        if self.summary is not None:
            self.summary.add(k, v)
        if self.own_blocks:
            self.blocks.add(k)
        if self.key_index is not None and self.host.n - self.n_indexed >= self.cfg.block_size:
            self.index_new_keys()

    # ------------------------------------ state made without a prefill (benchmarks, evaluations)

    def load_kv(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Take the next positions' K/V [Hkv, n, D] as a prefill chunk's `update` does (sinks,
        window, the rest to the host store and its block summaries), without the chunk's own
        attention, so the chunk is not kept for it: a context built directly rather than
        computed, at lengths no CPU could prefill."""
        if keys.ndim != 3 or keys.shape != values.shape:
            raise ValueError(
                f"load_kv takes keys and values of one shape [Hkv, n, D], got {tuple(keys.shape)} and "
                f"{tuple(values.shape)}"
            )
        self._check_heads(keys.shape[0], keys.shape[2])  # checked at every call: a later call's was broadcast
        self.update(keys[None], values[None])
        self.last_added = None
        self.approximate = 0  # given K/V are exact, one position as well (update takes it for a decode step's)

    def _check_heads(self, n_kv_heads: int, head_dim: int) -> None:
        if (n_kv_heads, head_dim) != (self.n_kv_heads, self.head_dim):
            raise ValueError(
                f"layer {self.layer_idx}: expected {self.n_kv_heads} KV heads of dim {self.head_dim}, "
                f"got {n_kv_heads} of dim {head_dim}"
            )

    def add_build_queries(self, queries: torch.Tensor) -> None:
        """Queries [Hq, n, D] for the host key index's build (the attention-aware indexes learn
        from prefill queries), taken as spread evenly over the positions seen so far: for a
        context given by `load_kv`, whose prefill queries were never computed."""
        if not self.is_initialized or self.key_index is not None:
            raise ValueError("build queries go to a layer that holds positions and has no host key index yet")
        Hq = self.n_kv_heads * self.group
        if queries.ndim != 3 or (queries.shape[0], queries.shape[2]) != (Hq, self.head_dim):
            raise ValueError(
                f"layer {self.layer_idx}: expected queries [{Hq}, n, {self.head_dim}], got {tuple(queries.shape)}"
            )
        self.query_sample.add(queries, torch.linspace(0, self.n_seen - 1, queries.shape[1]).long())

    def copy_indexes_from(self, source: HybridLayer) -> None:
        """Copies of `source`'s host key index and key sketch, for this layer holding the same
        positions under a configuration with the source's sinks and key index (and, with an
        adaptive budget, sketch rank) and a window no longer than its; the host tokens a
        shorter window leaves over are added to the copies. Evaluations compare configurations
        on one prefill this way, rather than building every configuration's index again."""
        mine, theirs = self.cfg, source.cfg
        same = (mine.n_sink, mine.key_index) == (theirs.n_sink, theirs.key_index) and mine.window <= theirs.window
        if mine.budget == "adaptive":
            same &= mine.sketch_rank == theirs.sketch_rank and (source.sketch is not None or source.key_index is None)
        if not same or self.n_seen != source.n_seen:
            raise ValueError(
                "a layer takes the host indexes of a layer holding the same positions, with the same sinks and "
                "key index (and an adaptive one, the sketch rank) and a window no shorter than its"
            )
        self.key_index = copy.deepcopy(source.key_index)
        self.sketch = None
        if mine.budget == "adaptive" and source.sketch is not None:  # an exact scorer reads this layer's own store
            exact = isinstance(source.sketch, ExactKeys)
            self.sketch = ExactKeys(self.host, mine.host_threads) if exact else copy.deepcopy(source.sketch)
        self.n_indexed, self.n_built = source.n_indexed, source.n_built
        if self.key_index is not None and self.host.n > self.n_indexed:
            self.index_new_keys()

    def index_new_keys(self) -> None:
        """Add the host keys the key indexes have not seen yet. Done a block at a
        time, not every step: until then the decode step attends to those few
        newest host tokens directly (see `unindexed_ids`)."""
        new = self.host.keys[:, self.n_indexed :]  # [Hkv, n, D]
        self.key_index.add(new)
        if self.sketch is not None:
            self.sketch.add(new)
        self.n_indexed = self.host.n

    def wait_for_build(self) -> None:
        """Until the layer's index build on the worker thread (if any) has finished; its error raised here."""
        if self.builder is not None:
            try:
                self.builder.wait(self)
            except Exception as error:
                error.add_note(f"(in the host index build of layer {self.layer_idx}, on the worker thread)")
                raise

    def unindexed_ids(self) -> np.ndarray:
        """Host ids [n] of the newest host tokens not yet in the key indexes."""
        return np.arange(self.n_indexed, self.host.n)

    # ------------------------------------------------- a point to come back to (engine.prefix)

    def mark(self) -> LayerMark:
        """Its state now, for `rewind` to take it back there after more positions (a prompt after a
        shared prefix). Its index build, if any, is finished first."""
        self.wait_for_build()
        if not self.is_initialized or self.rerun or self.device_rows is not None:
            raise ValueError("a mark is taken of a layer that holds positions, between forward passes")
        sketch_mark = None if self.sketch is None or isinstance(self.sketch, ExactKeys) else copy.deepcopy(self.sketch)
        sample = None
        if self.key_index is None:
            self.query_sample.queries()  # its copies in flight arrived: the copy below holds host tensors only
            sample = copy.deepcopy(self.query_sample)
        return LayerMark(
            n_seen=self.n_seen,
            approximate=self.approximate,
            resident=(self.resident_k.clone(), self.resident_v.clone(), self.resident_pos.copy()),
            host_n=self.host.n,
            summary=self.summary.mark() if self.summary is not None else None,
            blocks=self.blocks.mark() if self.own_blocks else None,
            key_index=self.key_index,
            key_index_mark=self.key_index.mark() if self.key_index is not None else None,
            sketch=self.sketch,
            sketch_mark=sketch_mark,
            n_indexed=self.n_indexed,
            n_built=self.n_built,
            build_waiting=self.build_waiting,
            query_sample=sample,
        )

    def rewind(self, mark: LayerMark) -> None:
        """Back to the state of `mark`, taken of this layer, which has taken more positions since, none
        run again; the mark stays as it was, for the next rewind."""
        self.wait_for_build()
        other_index = mark.key_index is not None and mark.key_index is not self.key_index
        if self.n_seen < mark.n_seen or self.host.n < mark.host_n or other_index:
            raise ValueError("a layer rewinds to a mark of its own sequence, taken before its positions since")
        if self.n_indexed != mark.n_indexed and mark.key_index is not None:  # keys were added to the index
            mark.key_index.rewind(mark.key_index_mark)
        if mark.sketch_mark is None:  # none, or the exact keys', which read the store and keep nothing
            self.sketch = mark.sketch
        elif self.n_indexed != mark.n_indexed:  # keys were added to it since: a copy of the mark's
            self.sketch = copy.deepcopy(mark.sketch_mark)
        self.key_index, self.n_indexed, self.n_built = mark.key_index, mark.n_indexed, mark.n_built
        self.build_waiting = mark.build_waiting
        if mark.query_sample is not None:
            self.query_sample = copy.deepcopy(mark.query_sample)
        self.host.truncate(mark.host_n)
        if self.summary is not None:
            self.summary.rewind(mark.summary)
        if mark.blocks is not None:
            self.blocks.rewind(mark.blocks)
        k, v, pos = mark.resident
        self.resident_k, self.resident_v, self.resident_pos = k.clone(), v.clone(), pos.copy()
        self.n_seen, self.approximate = mark.n_seen, mark.approximate
        self.stats, self.last_added = StepStats(), None

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

    def host_rows(self, device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n host rows' K and V [Hkv, n, D] for a prefill chunk on `device`: from
        their copy on the device while the prompt goes through this layer alone, else from the
        store (HostKV.rows_for)."""
        if self.device_rows is not None:
            return self.device_rows.first(n)
        return self.host.rows_for(device, n)

    def resident(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Filled resident slots: K, V [Hkv, R, D] (device) and their positions [R]."""
        filled = min(self.n_seen, self.cfg.resident_tokens)  # slots fill in order until the ring wraps
        return self.resident_k[:, :filled], self.resident_v[:, :filled], self.resident_pos[:filled]

    def ordered_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every position's K and V [Hkv, seq_len, D] in position order, on the device
        (a full copy: for evaluation against full attention, not for decoding)."""
        where = self.positions()
        resident = np.concatenate([where["sinks"], where["window"]])
        slots = to_device(np.argsort(self.resident_pos)[-len(resident) :], self.device)  # filled slots by position
        # head by head on the stream ordered after the copies in flight (rows_on), not through a host copy
        host_k, host_v = (rows_on(t, self.device).to(self.dtype) for t in self.host.rows_for(self.device))
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

    @property
    def own_blocks(self) -> bool:
        """Whether the block index is its own (min and max keys, or no summaries), not the summaries' mean keys."""
        return self.blocks is not None and (self.summary is None or self.blocks is not self.summary.keys)

    # ------------------------------------------------- transformers' Cache API

    @property
    def reruns_exactly(self) -> bool:
        """Whether the positions fed now run again exactly, as a prefill chunk (HybridCache.rerun_exactly)."""
        return self.rerun > 0 and not self.rerun_wide

    def get_seq_length(self) -> int:
        return self.n_seen - self.rerun  # positions run again take their own positions again

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        self.n_seen = 0
        self.prompt_length = 0  # the next sequence's is not known (the last one's built its index mid-prompt)
        self.failed_build = None
        self.key_index = None
        self.build_waiting = False
        self.sketch = None
        self.n_indexed = self.n_built = 0
        self.last_added = None
        self.device_rows = None
        self.stats = StepStats()
        self.rerun = self.approximate = 0
        self.rerun_wide = False

    def batch_select_indices(self, indices) -> None:
        """transformers' call to keep rows of a batch: one sequence's cache keeps its row 0, or nothing to keep."""
        if [int(i) for i in indices] != [0]:
            raise ValueError(f"a cache of one sequence keeps its row 0 alone, got rows {[int(i) for i in indices]}")


def sum_bytes(reports) -> dict[str, dict[str, int]]:
    """Byte reports {"device": {...}, "host": {...}} summed part by part."""
    total = {"device": {}, "host": {}}
    for report in reports:
        for where, parts in report.items():
            for name, n in parts.items():
                total[where][name] = total[where].get(name, 0) + n
    return total
