"""Host-memory KV store of one layer, the copies that fill it, the pool that keeps stores from
one generation to the next, and the prefill-query sample its index is built from."""

from __future__ import annotations

import ctypes
import sys
import threading
from concurrent.futures import Future

import torch

from ann.block import to_device

_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def host_empty(shape, dtype: torch.dtype, *, pin: bool = False) -> torch.Tensor:
    """An uninitialised host tensor for KV rows that are read in scattered order.

    Pinned when `pin` (CUDA copies can then be asynchronous). Otherwise, on
    Linux, large buffers ask for transparent huge pages before their first
    touch: the gather kernel reads rows all over the store, and with 4 KiB
    pages nearly every row is a TLB miss.
    """
    t = torch.empty(shape, dtype=dtype, pin_memory=pin)
    if not pin and _libc is not None and t.nbytes >= 4 * _HUGE_PAGE:
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # madvise wants aligned ranges
        end = (t.data_ptr() + t.nbytes) // _HUGE_PAGE * _HUGE_PAGE
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)  # advice only
    return t


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src) for K/V rows [H, n, D], asynchronous between pinned host memory and
    a device. A host store's slice has its heads strided by the store's capacity; torch
    would copy such a tensor through a pageable staging buffer, synchronously and at a
    fraction of the bus's speed, so it goes head by head, each head's rows contiguous."""
    if dst.device == src.device or (dst.is_contiguous() and src.is_contiguous()):
        return dst.copy_(src, non_blocking=True)
    for h in range(src.shape[0]):
        dst[h].copy_(src[h], non_blocking=True)
    return dst


def rows_on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """K/V rows [H, n, D] on `device` (t itself if there already); see copy_rows."""
    if t.device == device:
        return t
    return copy_rows(torch.empty(t.shape, dtype=t.dtype, device=device), t)


class SideStreamCopies:
    """Copies of evicted K/V rows into a pinned store on a side CUDA stream, so that a prefill
    chunk's offload overlaps the compute that follows it rather than queueing behind it.

    Three orderings keep the store exact:
    - a copy starts after the work that produced its rows (the side stream waits for the
      producer's stream), and a copy on the producer's stream after the side copies in flight
      (the one event readers wait for then covers both);
    - the rows' device memory is not reused before the copy has read them (record_stream);
    - a reader waits for the copies: the host by synchronizing with the last copy's event,
      a device stream by waiting for that event on the device (the host does not stall).

    A decode step's few rows would go into the store head by head (its heads lie apart:
    `copy_rows`), two copies per KV head and layer; they go instead as one copy per tensor into
    pinned staging memory, and into the store on the host once a reader has waited for them
    (a device reader then waits on the host: a prefill after decode steps, e.g. a re-check).
    """

    _streams: dict[torch.device, torch.cuda.Stream] = {}  # one side stream per device, shared by the stores
    MIN_ROWS = 64  # fewer rows (a decode step's eviction) stay on the producer's stream: nothing to overlap

    def __init__(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        self.stream = self._streams[device]
        self.pending = None  # the last copy's event, until the host has waited for it
        self.staged: list[tuple[torch.Tensor, torch.Tensor]] = []  # (store rows, their pinned copy) to put in

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """dst.copy_(src) for each (dst, src) [H, n, D], in order, on the side stream (on the
        producer's own when n < MIN_ROWS); readers wait for the event recorded after them."""
        producer = torch.cuda.current_stream(pairs[0][1].device)
        stream = self.stream if pairs[0][1].shape[1] >= self.MIN_ROWS else producer
        if stream is not producer:
            stream.wait_stream(producer)
        elif self.pending is not None:  # a side copy in flight: the event recorded below must follow it too
            producer.wait_event(self.pending)
        with torch.cuda.stream(stream):
            for dst, src in pairs:
                if stream is producer and self.stages(dst, src):
                    staged = host_empty(src.shape, src.dtype, pin=True)
                    self.staged.append((dst, staged.copy_(src, non_blocking=True)))
                    continue
                copy_rows(dst, src)
                if stream is not producer and src.is_cuda:
                    src.record_stream(stream)
            self.pending = stream.record_event()

    @staticmethod
    def stages(dst: torch.Tensor, src: torch.Tensor) -> bool:
        """Whether a copy on the producer's stream goes through pinned staging: device rows bound
        for store rows whose heads lie apart."""
        return src.is_cuda and not dst.is_contiguous()

    def host_wait(self) -> None:
        if self.pending is not None:
            self.pending.synchronize()
            self.pending = None
        if not self.staged:  # a step's second reader (its values after its keys): nothing left to put in
            return
        # Arrived (the event covers them): into the store. In inference mode, because a store
        # allocated in it accepts in-place writes only there, and the waiting reader may be
        # outside it (the index build's thread).
        with torch.inference_mode():
            for dst, staged in self.staged:
                dst.copy_(staged)
        self.staged.clear()

    def device_wait(self, device: torch.device) -> None:
        if self.staged:  # staged rows reach the store through the host
            self.host_wait()
        elif self.pending is not None:
            torch.cuda.current_stream(device).wait_event(self.pending)


class DirectCopies:
    """Copies into a store in the caller's stream (the CPU, or a device without a side stream):
    every reader sees them in order, so there is nothing to wait for."""

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for dst, src in pairs:
            copy_rows(dst, src)

    def host_wait(self) -> None:
        pass

    def device_wait(self, device: torch.device) -> None:
        pass


class HostKV:
    """K and V [Hkv, capacity, D] in host memory, appended in position order.

    Pinned when the device is CUDA, so device-to-host copies of evicted tokens
    and host-to-device copies of prefill key blocks can be asynchronous; the
    copies in go through `copies` (SideStreamCopies on CUDA). Readers use
    `keys`/`values` on the host (they wait for copies in flight) or
    `rows_for(device)`. The capacity grows by half again when full; `reserve()`
    sizes it exactly when the final length is known.
    """

    def __init__(self, n_heads: int, dim: int, dtype: torch.dtype, *, pin: bool, capacity: int = 0, copies=None):
        self.n_heads, self.dim, self.dtype, self.pin = n_heads, dim, dtype, pin
        self.n = 0
        self.copies = copies or DirectCopies()
        self.k_memory, self.v_memory = self._alloc(capacity), self._alloc(capacity)  # [Hkv, rows held, D]
        self.k, self.v = self.k_memory, self.v_memory  # [Hkv, capacity, D]: the rows this store may fill

    def _alloc(self, capacity: int) -> torch.Tensor:
        return host_empty((self.n_heads, capacity, self.dim), self.dtype, pin=self.pin)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reserve(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        if capacity > self.k_memory.shape[1]:
            k, v = self._alloc(capacity), self._alloc(capacity)
            k[:, : self.n], v[:, : self.n] = self.keys, self.values  # (after the copies in flight)
            self.k_memory, self.v_memory = k, v
        self.k, self.v = self.k_memory[:, :capacity], self.v_memory[:, :capacity]

    def clear(self) -> None:
        """Empty, with a capacity of 0, keeping the memory for the next `reserve`
        (engine.cache.store.StorePool hands it to the next cache)."""
        self.copies.host_wait()
        self.n = 0
        self.k, self.v = self.k_memory[:, :0], self.v_memory[:, :0]

    def truncate(self, n: int) -> None:
        """Keep the first n rows (after the copies in flight, which may write past them)."""
        if not 0 <= n <= self.n:
            raise ValueError(f"a store of {self.n} rows keeps 0 to {self.n} of them, not {n}")
        self.copies.host_wait()
        self.n = n

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [Hkv, n, D] on any device."""
        self.copies.copy(self._next_rows(k, v))
        self.n += k.shape[1]

    def append_from_host(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [Hkv, n, D] in host memory (rows read back from a file), copied by the host itself after the
        copies in flight: the store's copies take their rows from the device."""
        pairs = self._next_rows(k, v)
        self.copies.host_wait()
        DirectCopies().copy(pairs)
        self.n += k.shape[1]

    def _next_rows(self, k: torch.Tensor, v: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(store rows, k) and (store rows, v) for the n rows after the last, the capacity grown to hold them."""
        n = k.shape[1]
        if self.n + n > self.capacity:
            self.reserve(max(self.n + n, self.capacity * 3 // 2, 256))
        return [(self.k[:, self.n : self.n + n], k), (self.v[:, self.n : self.n + n], v)]

    @property
    def keys(self) -> torch.Tensor:
        """[Hkv, n, D] view for the host to read (copies in flight done); rows contiguous,
        heads strided by the capacity."""
        self.copies.host_wait()
        return self.k[:, : self.n]

    @property
    def values(self) -> torch.Tensor:
        self.copies.host_wait()
        return self.v[:, : self.n]

    def rows_for(self, device: torch.device, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n (default all) K and V rows as views, for copies to `device`: a CUDA
        device's stream is ordered after the copies in flight, without stalling the host."""
        n = self.n if n is None else n
        if device.type == "cpu":
            self.copies.host_wait()
        else:
            self.copies.device_wait(device)
        return self.k[:, :n], self.v[:, :n]

    @property
    def nbytes(self) -> int:
        """Bytes of its capacity (the memory behind it may hold more rows: `memory_nbytes`)."""
        return self.k.nbytes + self.v.nbytes

    @property
    def memory_nbytes(self) -> int:
        return self.k_memory.nbytes + self.v_memory.nbytes


class DeviceRows:
    """A copy on the device of the rows a layer's host store takes while the prompt goes through
    that layer alone (engine.layer_prefill): the layer's later chunks attend to its earlier ones
    there instead of copying them back from the host, and the copy is dropped once the layer has
    seen the whole prompt. Rows are kept in the store's dtype, so a chunk reads the same numbers
    from either place. Its buffers are allocated at the first rows, on their device."""

    def __init__(self, capacity: int, dtype: torch.dtype):
        self.capacity, self.dtype = capacity, dtype
        self.n = 0
        self.k = self.v = None  # [Hkv, capacity, D]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [Hkv, n, D] of the positions following the last ones held."""
        n = k.shape[1]
        if self.n + n > self.capacity:
            raise ValueError(f"the device copy holds {self.capacity} host rows; {self.n} held, {n} more given")
        if self.k is None:
            self.k = torch.empty(k.shape[0], self.capacity, k.shape[2], dtype=self.dtype, device=k.device)
            self.v = torch.empty_like(self.k)
        self.k[:, self.n : self.n + n] = k
        self.v[:, self.n : self.n + n] = v
        self.n += n

    def first(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n rows' K and V [Hkv, n, D] (views)."""
        if not 0 < n <= self.n:
            raise ValueError(f"the device copy holds {self.n} host rows, {n} asked for")
        return self.k[:, :n], self.v[:, :n]


class StorePool:
    """Host stores kept from one cache to the next of the same engine, and allocated ahead.

    Pinned memory is slow to allocate (every page is locked and mapped for the device: about
    2.4 s for the store of a 32K-token Llama-3-8B prefill), and an engine's generations ask for
    the same stores again. A cache takes one store per layer (`take`) and gives them back when
    its generation ends (`give`); `prepare` allocates the stores a cache will take on a
    background thread, in layer order, so the first layers' are ready first and the rest are
    allocated while the prefill runs. `clear` frees what the pool holds.
    """

    def __init__(self):
        self._free: dict[tuple, list[HostKV]] = {}  # (heads, dim, dtype, pin) -> stores not in use
        self._ahead: dict[tuple, list[Future]] = {}  # ... -> stores being allocated for a take
        self._threads: dict[tuple, threading.Thread] = {}  # ... -> the thread allocating them
        self._lock = threading.Lock()

    @staticmethod
    def _key(n_heads: int, dim: int, dtype: torch.dtype, pin: bool) -> tuple:
        return n_heads, dim, dtype, pin

    def prepare(self, n_stores: int, n_heads: int, dim: int, dtype: torch.dtype, *, pin: bool, capacity: int) -> None:
        """Make ready `n_stores` stores of `capacity` rows for the next takes of their shape:
        free stores first, new ones (grown ones) on the background thread."""
        key = self._key(n_heads, dim, dtype, pin)
        with self._lock:
            if key in self._threads:  # one allocation under way per shape
                return
            ready = len(self._free.get(key, [])) + len(self._ahead.get(key, []))
            jobs = [Future() for _ in range(n_stores - ready)]
            if not jobs:
                return
            self._ahead.setdefault(key, []).extend(jobs)

            def allocate():  # ends when its stores are made: no thread outlives the work
                for job in jobs:
                    if job.set_running_or_notify_cancel():
                        try:
                            job.set_result(HostKV(n_heads, dim, dtype, pin=pin, capacity=capacity))
                        except BaseException as exc:
                            job.set_exception(exc)

            self._threads[key] = threading.Thread(target=allocate, name="hybridattn-store", daemon=True)
            self._threads[key].start()

    def take(self, n_heads: int, dim: int, dtype: torch.dtype, *, pin: bool, capacity: int, copies=None) -> HostKV:
        """An empty store with room for `capacity` rows: a free one (the smallest that holds
        them, else the largest, grown), one allocated ahead, or a new one."""
        key = self._key(n_heads, dim, dtype, pin)
        with self._lock:
            free = self._free.get(key, [])
            store = None
            if free:
                held = [s.k_memory.shape[1] for s in free]
                fits = [i for i, n in enumerate(held) if n >= capacity]
                store = free[min(fits, key=held.__getitem__) if fits else max(range(len(free)), key=held.__getitem__)]
                free.remove(store)
            job = self._ahead[key].pop(0) if store is None and self._ahead.get(key) else None
            done = self._threads.pop(key) if job is not None and not self._ahead[key] else None
        if job is not None:
            store = job.result()
        if done is not None:
            done.join()  # the last store it made: it is ending
        if store is None:
            store = HostKV(n_heads, dim, dtype, pin=pin, capacity=capacity)
        store.copies = copies or DirectCopies()
        store.reserve(capacity)
        return store

    def give(self, stores) -> None:
        """Stores no cache uses any more (emptied here; their memory is kept for the next takes)."""
        for store in stores:
            store.clear()
            key = self._key(store.n_heads, store.dim, store.dtype, store.pin)
            with self._lock:
                if not any(s is store for s in self._free.get(key, [])):
                    self._free.setdefault(key, []).append(store)

    @property
    def nbytes(self) -> int:
        """Host bytes of the free stores."""
        with self._lock:
            return sum(s.memory_nbytes for stores in self._free.values() for s in stores)

    def clear(self) -> None:
        """Drop the free stores and those allocated ahead (their memory goes back to the system)."""
        with self._lock:
            jobs = [j for js in self._ahead.values() for j in js]
            threads = list(self._threads.values())
            self._free, self._ahead, self._threads = {}, {}, {}
        for job in jobs:
            job.cancel()
        for thread in threads:
            thread.join()
        release_pinned()


def release_pinned() -> None:
    """Give back to the system the pinned host memory no tensor holds any more. torch keeps freed
    pinned blocks for reuse (its caching host allocator), so dropping a pinned store frees nothing
    until this runs; a no-op where CUDA has not started or torch has no such call."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    empty = empty or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        empty()


class QuerySample:
    """Prefill queries at evenly spaced positions, at most `limit` of them.

    Keeps every `stride`-th position; when full, doubles the stride and drops
    the positions that no longer fall on it, so the sample stays spread over
    the whole prefill however long it turns out to be. With the prompt's length
    `expected`, the stride starts where the doubling would end, so nothing is
    dropped. Queries on a CUDA device reach pinned host memory by asynchronous
    copies, waited for when the sample is read or thinned: the prefill does not
    stall on them.
    """

    def __init__(self, limit: int, expected: int = 0):
        self.limit = limit
        self.stride = 1
        while limit and -(-expected // self.stride) > limit:
            self.stride *= 2
        self.pos: list[torch.Tensor] = []
        self.q: list[torch.Tensor] = []
        self.copied = None  # the event of the last asynchronous copy, until waited for

    def add(self, q: torch.Tensor, positions: torch.Tensor) -> None:
        """q [Hq, Q, D] of positions [Q] (on the host; host copies of q are kept)."""
        if self.limit == 0:
            return
        keep = torch.nonzero(positions % self.stride == 0).flatten()  # on the host: no device sync
        self.pos.append(positions[keep])
        self.q.append(self._to_host(q.index_select(1, to_device(keep, q.device))))
        while sum(len(p) for p in self.pos) > self.limit:
            self._wait()
            self.stride *= 2
            kept = [p % self.stride == 0 for p in self.pos]
            self.q = [q[:, m] for q, m in zip(self.q, kept)]
            self.pos = [p[m] for p, m in zip(self.pos, kept)]

    def _to_host(self, q: torch.Tensor) -> torch.Tensor:
        if not q.is_cuda:
            return q
        out = torch.empty(q.shape, dtype=q.dtype, pin_memory=True)
        out.copy_(q, non_blocking=True)
        self.copied = torch.cuda.current_stream(q.device).record_event()
        return out

    def _wait(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None

    def __len__(self) -> int:
        return sum(len(p) for p in self.pos)

    def queries(self) -> torch.Tensor:
        """[Hq, n, D]"""
        self._wait()
        return torch.cat(self.q, dim=1) if self.q else torch.empty(0)

    def state(self) -> dict[str, torch.Tensor]:
        """Its queries [Hq, n, D], their positions [n] and the stride, as tensors (engine.prefix_file)."""
        positions = torch.cat(self.pos) if self.pos else torch.empty(0, dtype=torch.long)
        return {"queries": self.queries(), "positions": positions, "stride": torch.tensor([self.stride])}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """This sample as a `state()` left it."""
        queries, positions = state["queries"], state["positions"].long()
        if len(positions) > self.limit or (len(positions) and queries.shape[1] != len(positions)):
            raise ValueError(f"a query sample of at most {self.limit} positions takes a query per position")
        self.q, self.pos = ([queries], [positions]) if len(positions) else ([], [])
        self.stride = int(state["stride"][0])

    def clear(self) -> None:
        self.pos, self.q = [], []
