"""The build of a layer's host key index (and the adaptive budget's candidate scorer)
from its host keys and the prefill queries sampled for it, with one progress bar."""

from __future__ import annotations

import logging
import threading
import time

from tqdm.auto import tqdm

from engine.cache.store import rows_on
from engine.decode.sketch import make_scorer
from engine.index.heads import HeadIndexes, ListSelector

log = logging.getLogger(__name__)


class BuildProgress:
    """One progress bar over the layers whose host index is being built. Layers whose build waits
    for a block of host keys (a short prompt) are counted, but show no bar while no layer builds."""

    def __init__(self, n_layers: int, *, enabled: bool = True):
        self.n_layers, self.enabled = n_layers, enabled
        self.bar = None
        self.counted = 0
        self.seconds = 0.0
        self.lock = threading.Lock()  # builds run on worker threads (engine.index.worker)

    def done(self, seconds: float, built: bool = True) -> None:
        """A layer counted: its index built in `seconds`, or (not `built`) its build waiting."""
        with self.lock:
            if built and self.bar is None:
                self.bar = tqdm(
                    total=self.n_layers,
                    initial=self.counted,
                    desc="building host key index",
                    unit="layer",
                    leave=False,
                    disable=not self.enabled,
                )
            self.counted += 1
            self.seconds += seconds
            if self.bar is not None:
                self.bar.update(1)
            if self.counted >= self.n_layers:
                if self.bar is not None:
                    log.info("host key indexes built in %.1f s", self.seconds)
                self._start_over()

    def reset(self) -> None:
        """Count from none again, the bar closed: for a cache that starts over (the builds it dropped were never
        counted: the next sequence's count started from the last one's, its bar left open at its end)."""
        with self.lock:
            self._start_over()

    def _start_over(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.counted, self.seconds = None, 0, 0.0


def build_key_index(layer) -> bool:
    """Build the layer's host key index from its host keys and the sampled queries of
    each head's query group (the attention-aware indexes use those). A host store of
    less than a block is left unindexed (those tokens are read at every step) and the
    build waits, collecting decode queries, until it holds one: a short prompt starts
    offloading during decode. Returns whether the index was built."""
    cfg = layer.cfg
    if layer.host.n < cfg.block_size:
        if layer.progress is not None and not layer.build_waiting:
            layer.progress.done(0.0, built=False)  # counted now; the build itself is a block of keys, later
        layer.build_waiting = True
        return False
    t0 = time.perf_counter()
    Hkv, D = layer.n_kv_heads, layer.head_dim
    queries = None
    if len(layer.query_sample):
        queries = layer.query_sample.queries().reshape(Hkv, -1, D)  # [Hkv, G * nq, D]: a group's heads stacked
    if cfg.key_index == "qq":
        index = ListSelector(Hkv, D, layer.device, layer.dtype, cfg.index_params)
        keys = rows_on(layer.host.rows_for(layer.device)[0], layer.device)  # the lists' product on the device
    else:
        index = HeadIndexes(cfg.key_index, Hkv, D, cfg.index_params)
        keys = layer.host.keys
    index.build(keys, queries)
    if cfg.budget == "adaptive":
        layer.sketch = make_scorer(cfg.sketch_rank, layer.host, cfg.host_threads)
        layer.sketch.build(keys, queries)  # on the device when the keys went there for the lists
    layer.key_index = index
    layer.n_indexed = layer.n_built = layer.host.n
    layer.query_sample.clear()
    if layer.progress is not None and not layer.build_waiting:
        layer.progress.done(time.perf_counter() - t0)
    return True
