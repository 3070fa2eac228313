"""Host index builds on a worker thread, overlapped with the rest of the prefill.

A layer's host key index (and key sketch) can be built as soon as that layer has
seen the prompt's last token: later layers of the last chunk are still running.
The heavy parts of a build (faiss's k-NN, torch products) release the GIL, so a
worker thread overlaps them with the prefill where there are cores to spare.
A layer waits for its own build before its first decode step touches the index.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from engine.index import build


class IndexBuilder:
    """Builds of layers' host indexes on `workers` threads (created on the first build)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}  # layer index -> its build

    def submit(self, layer) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="hybridattn-index")
        self._pending[layer.layer_idx] = self._pool.submit(build.build_key_index, layer)

    def wait(self, layer) -> None:
        """Block until the layer's build (if any) is done; its exception is raised here."""
        future = self._pending.pop(layer.layer_idx, None)
        if future is not None:
            future.result()

    def idle(self) -> bool:
        """Whether every build submitted is done (`wait` would not block)."""
        return all(future.done() for future in self._pending.values())

    def close(self) -> None:
        """Cancel builds not started, wait for running ones, stop the threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()
