"""Requests to the engine's answers (`Completions`): the responses' and the stream's JSON objects, a
request decoded in a batch that others join or alone, and the cache kept from one request to the next
(`PromptCache`). The server's engine thread (engine.scheduler) runs them."""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import closing

from engine.generation import GenerationReport
from engine.prefill import PrefillLeft
from engine.prefix import KeptCache
from engine.sampling import Sampling
from engine.server.request import Request, RequestError

log = logging.getLogger(__name__)

# the report's finish reason -> the API's ("left": its client is gone, and hears nothing)
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "left": "stop", "": "length"}


class PromptCache:
    """The cache the server keeps from one request to the next (engine.prefix.KeptCache), so that a request
    prefills only what is new: a request's `document`, prefilled once for the requests after it that name
    the same; or, with `reuse_prompts`, a prompt, which the next request's prompt may begin with (a
    conversation's next turn). A request that continues neither replaces it; a batch keeps nothing. With a
    `folder` (engine.prefix_file.PrefixFolder), documents are also kept as files, and one that comes back
    after another is loaded rather than prefilled."""

    def __init__(self, llm, *, reuse_prompts: bool = True, folder=None):
        self.llm, self.reuse_prompts = llm, reuse_prompts
        self.kept = KeptCache(llm, folder)

    @property
    def prefix(self):
        return self.kept.prefix

    def prepare(self, request: Request, leave: Callable[[], bool] | None = None) -> tuple[object, object, dict | None]:
        """The prompt to generate from, the kept Prefix it continues (None: none), and what the response
        tells of that: {"kind", "tokens" kept, "reused_tokens" (of the prompt's, found kept), "prefill_s"
        (spent here prefilling into it, or loading it), and for a document "loaded" (from the folder)}.
        `leave()`, asked as it prefills (engine.prefill.prefill), gives the prefill up where true (PrefillLeft)."""
        start = time.perf_counter()
        if request.document is not None:
            prompt = self.llm.encode_continuation(request.prompt)  # refused before the document is prefilled
            try:
                prefix, reused = self.kept.with_document(request.document, leave)
            except ValueError as error:  # what the engine refuses in the document (under 2 tokens, say)
                raise RequestError(str(error), "document") from None
            return prompt, prefix, self._told("document", reused, start) | {"loaded": self.kept.loaded}
        continued = None
        if self.reuse_prompts and len(request.prompts) <= 1:
            continued = self.kept.prompt(self.llm.encode(request.prompt), leave)
        if continued is None:
            self.kept.release()
            return request.prompt, None, None
        rest, prefix, reused = continued
        return rest, prefix, self._told("conversation", reused, start)

    def _told(self, kind: str, reused: int, start: float) -> dict:
        seconds, tokens = time.perf_counter() - start, self.kept.prefix.tokens
        if self.kept.loaded:
            log.info("%s: %d tokens loaded from the prefix folder in %.2f s", kind, tokens, seconds)
        elif reused < tokens:
            log.info("%s: %d tokens prefilled into the kept cache in %.2f s", kind, tokens - reused, seconds)
        return {"kind": kind, "tokens": tokens, "reused_tokens": reused, "prefill_s": seconds}

    def release(self) -> None:
        self.kept.release()


class Completions:
    """Requests to the engine's answers: the responses' and the stream's JSON objects. A request runs in a
    batch (`run_batch`, each its own sampling), which the first starts, from the cache kept from the
    requests before where it continues it (`cache`), and which others join; or alone (`run_alone`). The
    Scheduler's one thread runs them."""

    def __init__(self, llm, model: str, *, reuse_prompts: bool = True, folder=None):
        self.llm, self.model = llm, model
        self.cache = PromptCache(llm, reuse_prompts=reuse_prompts, folder=folder)

    def batchable(self, job) -> bool:
        """Whether the job may be decoded in a batch it does not start: one prompt, no document, not the next
        turn of the kept conversation (those continue the kept cache, which only the batch's first may)."""
        request = job.request
        if len(request.prompts) > 1 or request.document is not None or not self._encodes(job):
            return False
        return not (self.cache.reuse_prompts and self.cache.kept.continues(job.ids))

    def alone(self, job) -> bool:
        """Whether the job runs by itself, none joining it: several prompts (their own batch), or a prompt the
        engine refuses (there its client hears why). Any other starts a batch that others may join, from the
        kept cache where it continues it or is kept for the next (`run_batch`)."""
        request = job.request
        return len(request.prompts) > 1 or (request.document is None and not self._encodes(job))

    def _encodes(self, job) -> bool:
        """Whether the job's one prompt encodes, its token ids then kept as `job.ids`."""
        try:
            job.ids = self.llm.encode(job.request.prompt) if job.ids is None else job.ids
        except Exception:  # refused (the prompt, the tokenizer, its template)
            return False
        return True

    def joinable(self, job) -> bool:
        """Whether the job may join a batch that is running: one that may be batched, asking for a token or more."""
        return job.request.max_tokens > 0 and self.batchable(job)

    def run_alone(self, job) -> None:
        """The job's request by itself: its response or its chunks sent to it."""

        def gone(_row: int) -> bool:  # once it is gone, its prompts end in their prefill or at their next token
            return job.gone.is_set()

        try:
            if not job.request.stream:
                job.send("response", self.answer(job.request, leave=gone))
                return
            with closing(self.chunks(job.request, leave=gone)) as chunks:
                for chunk in chunks:
                    job.send("chunk", chunk)
                    if job.gone.is_set():
                        break
            job.send("end")
        except Exception as error:  # ValueError: what the engine refuses in the prompt
            job.send("error", self._naming_the_prompt(job.request, error))

    def _naming_the_prompt(self, request: Request, error: Exception) -> Exception:
        """A refusal of the request's prompt (empty, token ids outside the vocabulary) as a RequestError that
        names its field, `prompt` or `messages`; any other error as it is."""
        if not isinstance(error, (ValueError, TypeError)) or isinstance(error, RequestError):
            return error
        encode = self.llm.encode if request.document is None else self.llm.encode_continuation
        try:
            for prompt in request.prompts if request.messages is None else [request.messages]:
                encode(prompt)
        except (ValueError, TypeError):
            return RequestError(str(error), "prompt" if request.messages is None else "messages")
        return error

    def run_batch(self, jobs: list, more: Callable[[int], list] | None = None) -> None:
        """The jobs' requests decoded as one batch; each job is sent its own response, or chunks, as its
        sequence goes. `more(running)`, asked between steps with the number of sequences decoding, gives
        jobs (`joinable`) that join the batch there. A batch of one job continues the kept cache where its
        request does (a document's, or with `reuse_prompts` a conversation's), and keeps its prompt for the
        next request (`reuse_prompts`); the jobs that join it keep nothing and leave the kept cache as it is."""
        batch = _Batch(self._batch_head)
        sampling = [s for _, s in batch.add(jobs)]
        jobs = list(batch.jobs)  # those whose sampling was refused have heard why
        if not jobs:
            return
        log.info("a batch of %d requests", len(jobs))
        first, prefix, kept = None, None, None
        if len(jobs) == 1 and (self.cache.reuse_prompts or jobs[0].request.document is not None):
            try:
                first, prefix, kept = self.cache.prepare(jobs[0].request, leave=jobs[0].gone.is_set)
            except PrefillLeft:  # gone while the kept cache took its prompt or document
                self._finish(jobs[0], self._batch_head(jobs[0].request), "", self._left_report(jobs[0].request), None)
                return
            except Exception as error:  # its prompt or document refused: the batch does not start
                jobs[0].send("error", self._naming_the_prompt(jobs[0].request, error))
                return

        def joining() -> list[tuple]:
            new = batch.add(more(len(batch.running)))
            if new:
                log.info("%d request(s) joined the batch, now %d", len(new), len(batch.running))
            return [(job.ids, s) for job, s in new]

        batch.reports = [GenerationReport() for _ in jobs]
        pieces = self.llm.stream_batch(
            [job.ids for job in jobs] if first is None else [first],
            sampling,
            reports=batch.reports,
            leave=lambda row: batch.jobs[row].gone.is_set(),
            progress=False,
            more=None if more is None else joining,
            prefix=prefix,
        )
        with closing(pieces):
            for row, piece, finish in pieces:
                job, head = batch.jobs[row], batch.heads[row]
                if finish == "error":  # its prefill failed: it hears why, the batch goes on
                    error = batch.reports[row].error
                    log.error("a request of the batch failed in its prefill", exc_info=error)
                    batch.running.discard(row)
                    job.send("error", error)
                    continue
                request = job.request
                if request.stream:
                    if not batch.texts[row] and request.messages is not None:
                        job.send("chunk", _role_chunk(head))
                    if piece:
                        job.send("chunk", head | {"choices": [self._choice(request, 0, piece, None, delta=True)]})
                batch.texts[row].append(piece)
                if finish:
                    batch.running.discard(row)
                    self._finish(job, head, "".join(batch.texts[row]), batch.reports[row], kept if row == 0 else None)

    def _finish(self, job, head: dict, text: str, report, kept: dict | None) -> None:
        """A batched job's end: its response, or its stream's last chunks (`kept`: what it found of the kept
        cache, where it continued it)."""
        _log_report(report)
        request = job.request
        told = self._report(report, kept)
        if not request.stream:
            job.send("response", self._response(request, head, [text], [report], [told]))
            return
        for chunk in self._last_chunks(request, head, report, told):
            job.send("chunk", chunk)
        job.send("end")

    def answer(self, request: Request, leave: Callable[[int], bool] | None = None) -> dict:
        """The whole response to a request without `stream`; `leave(i)`, asked during the prefill and after
        each token of its prompt i, ends that prompt's answer there where true (engine.api.HybridLLM.generate_batch)."""
        try:
            prompt, prefix, kept = self.cache.prepare(request, leave=_first(leave))
            results = self.llm.generate(prompt, request.max_tokens, leave=leave, **self._arguments(request, prefix))
            results = results if isinstance(results, list) else [results]
            texts, reports = [r.text for r in results], [r.report for r in results]
        except PrefillLeft:  # gone while the kept cache took its prompt or document
            texts, reports, kept = [""], [self._left_report(request)], None  # (one prompt: a kept cache takes it)
        for report in reports:
            _log_report(report)
        told = [self._report(report, kept) for report in reports]  # one per choice
        return self._response(request, self._head(request, ""), texts, reports, told)

    def chunks(self, request: Request, leave: Callable[[int], bool] | None = None) -> Iterator[dict]:
        """The stream's chunks of a request with `stream`: the text piece by piece, then the finish; `leave(0)`,
        asked during the prefill and after each token, ends it there where true."""
        report = GenerationReport()
        head = self._head(request, ".chunk" if request.messages is not None else "")
        try:
            prompt, prefix, kept = self.cache.prepare(request, leave=_first(leave))
        except PrefillLeft:  # gone while the kept cache took its prompt or document
            report = self._left_report(request)
            _log_report(report)
            yield from self._last_chunks(request, head, report, self._report(report, None))
            return
        arguments = self._arguments(request, prefix)
        pieces = self.llm.stream(prompt, request.max_tokens, report=report, leave=leave, **arguments)
        first = next(pieces, None)  # the prompt checked and prefilled before the first chunk
        left = False
        try:
            if request.messages is not None:
                yield _role_chunk(head)
            for piece in itertools.chain([] if first is None else [first], pieces):
                yield head | {"choices": [self._choice(request, 0, piece, None, delta=True)]}
        except GeneratorExit:  # closed before its end: the client is gone
            left = True
            raise
        finally:  # also when the client is gone: the generation stops there, its cache is released
            pieces.close()
            report.finish_reason = "left" if left and not report.finish_reason else report.finish_reason
            _log_report(report)
        yield from self._last_chunks(request, head, report, self._report(report, kept))

    def close(self) -> None:
        self.cache.release()

    def _left_report(self, request: Request) -> GenerationReport:
        """The report of a request that left while the kept cache took its prompt or document: its prompt's
        tokens (a document's and the prompt's after it), none new."""
        if request.document is None:
            tokens = self.llm.encode(request.prompt).shape[1]
        else:
            tokens = self.llm.encode(request.document).shape[1] + self.llm.encode_continuation(request.prompt).shape[1]
        return GenerationReport(prompt_tokens=tokens, finish_reason="left")

    def _batch_head(self, request: Request) -> dict:
        return self._head(request, ".chunk" if request.stream and request.messages is not None else "")

    def _response(self, request: Request, head: dict, texts: list[str], reports: list, told: list[dict]) -> dict:
        """The whole response: a choice per text, the usage, and the engine's report of each (`told`)."""
        choices = [self._choice(request, i, t, r.finish_reason) for i, (t, r) in enumerate(zip(texts, reports))]
        return head | {"choices": choices, "usage": _usage(reports), "hybridattn": told}

    def _last_chunks(self, request: Request, head: dict, report, told: dict) -> list[dict]:
        """A stream's last chunks: its finish, then with `include_usage` the usage and the engine's report."""
        last = [head | {"choices": [self._choice(request, 0, "", report.finish_reason, delta=True)]}]
        if request.include_usage:
            last.append(head | {"choices": [], "usage": _usage([report]), "hybridattn": [told]})
        return last

    @staticmethod
    def _arguments(request: Request, prefix) -> dict:
        return dict(request.sampling, prefix=prefix, progress=False)

    @staticmethod
    def _report(report, kept: dict | None) -> dict:
        """The engine's report of a choice, with what it found of the kept cache where it continued it."""
        return report.as_dict() | ({} if kept is None else {"kept": kept})

    def _head(self, request: Request, suffix: str) -> dict:
        prefix = "chatcmpl-" if request.messages is not None else "cmpl-"
        return {
            "id": prefix + secrets.token_hex(12),
            "object": request.kind + suffix,
            "created": int(time.time()),
            "model": self.model,
        }

    @staticmethod
    def _choice(request: Request, index: int, text: str, finish: str | None, *, delta: bool = False) -> dict:
        reason = None if finish is None else FINISH.get(finish, "stop")
        if request.messages is None:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
        message = ({"content": text} if text else {}) if delta else {"role": "assistant", "content": text}
        return {"index": index, ("delta" if delta else "message"): message, "finish_reason": reason}


class _Batch:
    """The jobs of a running batch, by row (their order in it, joined ones after), with what each has been sent."""

    def __init__(self, head: Callable[[Request], dict]):
        self.head = head  # a request's response head (its id, kind, time)
        self.jobs: list = []
        self.reports: list[GenerationReport] = []  # one a row: stream_batch appends those of the rows that join
        self.texts: list[list[str]] = []
        self.heads: list[dict] = []
        self.running: set[int] = set()  # the rows still decoding or on their way in

    def add(self, jobs: list) -> list[tuple]:
        """The jobs as the batch's next rows, each with its Sampling: [(job, Sampling)]. A job whose sampling is
        refused is sent the error and left out, so that it fails alone and the batch goes on without it."""
        added = []
        for job in jobs:
            try:
                sampling = Sampling(job.request.max_tokens, **job.request.sampling)
            except Exception as error:
                job.send("error", error)
                continue
            self.running.add(len(self.jobs))
            self.jobs.append(job)
            self.heads.append(self.head(job.request))
            self.texts.append([])
            added.append((job, sampling))
        return added


def _role_chunk(head: dict) -> dict:
    """A chat stream's first chunk: the assistant's role."""
    return head | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}


def _first(leave: Callable[[int], bool] | None) -> Callable[[], bool] | None:
    """`leave` asked of the first prompt (the one a kept cache takes)."""
    return None if leave is None else lambda: leave(0)


def _log_report(report) -> None:
    log.info(
        "prompt %d tokens (%d of them from the kept cache), %d new (%s) in %.2f s after its own first-token work "
        "of %.2f s; host KV read per step %.2f%%",
        report.prompt_tokens,
        report.prefix_tokens,
        report.new_tokens,
        report.finish_reason or "not finished",
        report.decode_s,
        report.first_token_s,
        100 * report.kv_read_frac,
    )


def _usage(reports) -> dict:
    prompt = sum(r.prompt_tokens for r in reports)
    completion = sum(r.new_tokens for r in reports)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
