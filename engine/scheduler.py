"""The server's engine thread (`Scheduler`): requests wait in order for the one thread that runs the
engine, and are decoded as one batch, up to `max_batch` of them, each with its own sampling. The batch
starts with the first waiting request, from the kept cache where it continues it (a document's, the
conversation kept) or keeping its prompt for the next; the requests after it that need no kept cache (a
plain prompt) join it one between two of its steps, and so do such requests that come while it runs
(continuous batching): each has its first token after its own prefill, which runs a chunk a step while
the batch decodes, so that a step waits for one prefill chunk at most. A request that may not join waits
for the batch's end and starts the next; one of several prompts runs by itself (`Completions.alone`).

Each request is a `Job`: the handler thread that took it reads what the engine thread sends back
(the response, or the stream's chunks, or the error), and tells it, by `gone`, that its client left."""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

CLIENT_POLL_S = 0.5  # while a handler waits for the engine, how often it looks whether its client is still there


class Closed(RuntimeError):
    """A request the server, closed, does not run (HTTP 503 Service Unavailable)."""


class Job:
    """One request and what the engine thread sends back for it, in order: ("response", dict), or
    ("chunk", dict)s then ("end", None), or ("error", exception) at any point."""

    def __init__(self, request):
        self.request = request
        self.ids = None  # the prompt's token ids, once encoded to batch it
        self.gone = threading.Event()  # its client left: its generation ends in its prefill or at its next token
        self._sent: queue.Queue = queue.Queue()

    def send(self, kind: str, value=None) -> None:
        self._sent.put((kind, value))

    def response(self, connected: Callable[[], bool] | None = None) -> dict:
        """The whole response, once the engine thread has it (its error raised here); `connected()`, asked
        while it waits, tells it the client left (the job is then gone)."""
        kind, value = self._next(connected)
        if kind == "error":
            raise value
        return value

    def chunks(self, connected: Callable[[], bool] | None = None) -> Iterator[dict]:
        """The stream's chunks as the engine thread sends them (an error raised where it came); closed
        early, or where `connected()`, asked while it waits, is false, the job's generation ends."""
        try:
            while True:
                kind, value = self._next(connected)
                if kind == "error":
                    raise value
                if kind == "end":
                    return
                yield value
        finally:
            self.gone.set()

    def _next(self, connected: Callable[[], bool] | None) -> tuple:
        """What the engine thread sends next; while it waits, every CLIENT_POLL_S, the job is gone where
        `connected()` is false."""
        while True:
            try:
                return self._sent.get(timeout=None if connected is None or self.gone.is_set() else CLIENT_POLL_S)
            except queue.Empty:
                if not connected():
                    self.gone.set()


class Scheduler:
    """The one thread that runs `completions` (engine.server.Completions): `submit` queues a request's
    Job, which the thread takes in order, batching what it can (`Completions.batchable`, up to
    `max_batch`; 1: one request at a time), and with `join` letting what may join a running batch
    join it (`Completions.joinable`; without, a batch is taken whole and runs to its end)."""

    def __init__(self, completions, max_batch: int = 8, *, join: bool = True):
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if not isinstance(join, bool):
            raise ValueError(f"join must be True or False, got {join!r}")
        self.completions, self.max_batch, self.join = completions, max_batch, join
        self._waiting: deque[Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._running: list[Job] = []
        self._thread = threading.Thread(target=self._serve, name="hybridattn-engine", daemon=True)
        self._thread.start()

    def submit(self, request) -> Job:
        job = Job(request)
        with self._ready:
            if self._closed:
                raise Closed("the server is closed")
            self._waiting.append(job)
            self._ready.notify()
        return job

    def close(self) -> None:
        """Stop: the generation under way ends at its next token, as if its clients had left; the jobs still
        waiting get an error."""
        with self._ready:
            self._closed = True
            left, self._waiting = list(self._waiting), deque()
            self._ready.notify()
        for job in list(self._running):
            job.gone.set()
        for job in left:
            job.send("error", Closed("the server closed before this request ran"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

    def _serve(self) -> None:
        while (jobs := self._take()) is not None:
            self._running = list(jobs)
            admitted: deque[Job] = deque()  # taken to join the batch, and not joined yet
            try:
                if len(jobs) == 1 and (not self.join or self.completions.alone(jobs[0])):
                    self.completions.run_alone(jobs[0])
                elif not self.join:  # prefilled together, decoded to the end
                    self.completions.run_batch(jobs)
                else:  # the others join one by one: each has its first token after its own prefill
                    admitted.extend(jobs[1:])
                    self.completions.run_batch(jobs[:1], functools.partial(self._joining, admitted=admitted))
            except Exception as error:  # the thread goes on; each job hears of it (those that heard the end ignore it)
                failed = [job for job in self._running if all(job is not a for a in admitted)]
                log.exception("error in a generation of %d request(s)", len(failed))
                for job in failed:
                    job.send("error", error)
            self._put_back(admitted)  # the batch ended before they joined: they run next

    def _joining(self, running: int, admitted: deque[Job]) -> list[Job]:
        """The job that joins the running batch of `running` sequences (those on their way in counted): one
        at a time, asked for when none is being prefilled, a chunk a step (engine.prefill.SteppedPrefill),
        so that the batch's steps wait for one prefill chunk at most, and each that joins has its first
        token after its own prefill. First those `admitted` with the batch when it was taken, then the
        waiting jobs from the front of the queue, while the first may join (`Completions.joinable`), up to
        `max_batch` sequences in all. A job that may not waits for the batch's end, and every job after it
        waits with it: none is overtaken for long."""
        with self._ready:
            if self._closed:
                return []
            if admitted:
                return [admitted.popleft()]
            if not self._waiting or running >= self.max_batch:
                return []
            if not self.completions.joinable(self._waiting[0]):
                return []
            job = self._waiting.popleft()
        self._running.append(job)
        return [job]

    def _put_back(self, jobs: deque[Job] | list[Job]) -> None:
        """Jobs taken that did not run: first in the queue again (an error each where the server closed)."""
        with self._ready:
            if not self._closed:
                self._waiting.extendleft(reversed(jobs))
                return
        for job in jobs:
            job.send("error", Closed("the server closed before this request ran"))

    def _take(self) -> list[Job] | None:
        """The next jobs to run: the first waiting, with those after it that batch with it (that may join
        it: `Completions.joinable`) (None: closed)."""
        with self._ready:
            while not self._waiting and not self._closed:
                self._ready.wait()
            if self._closed:
                return None
            waiting, self._waiting = list(self._waiting), deque()
        first, taken, left = waiting[0], [waiting[0]], []
        fits = self.completions.joinable if self.join else self.completions.batchable
        if self.max_batch > 1 and self.completions.batchable(first):
            for job in waiting[1:]:
                if len(taken) < self.max_batch and fits(job):
                    taken.append(job)
                else:
                    left.append(job)
        else:
            left = waiting[1:]
        self._put_back(left)  # those not taken go back before any that came meanwhile
        with self._ready:
            if not self._closed:
                return taken
        for job in taken:  # closed while they were taken out of the queue
            job.send("error", Closed("the server closed before this request ran"))
        return None
