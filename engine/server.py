"""`hybridattn serve`: the engine behind HTTP endpoints shaped as OpenAI's completions and chat
completions (`/v1/completions`, `/v1/chat/completions`, `/v1/models`), so that clients written for
that API talk to it unchanged, streaming included (server-sent events).

One thread runs the engine (engine.scheduler): requests wait for it in order, and are decoded as one
batch, each with its own sampling, joining it between its steps as they come. Only the batch's first
request may continue the cache kept between requests (below) or keep its prompt there; several
prompts in one request run alone, as their own batch.
What the engine cannot do is refused with a 400 that names the field (`n` above 1,
log-probabilities, `echo`, penalties, tools); fields it does not know are ignored, as clients send
many.

Between requests the server keeps one cache (`PromptCache`), so that a request prefills only what is
new: a conversation's next turn, whose prompt begins with the turn before's, prefills the answer and
the new message alone; and a completion may name a long `document` (the engine's own field), which
the first request prefills and the requests after it that name the same find kept."""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from engine.api import _token_id_list
from engine.generation import GenerationReport
from engine.prefix import KeptCache
from engine.sampling import Sampling
from engine.scheduler import Scheduler
from engine.stop import StopStrings

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 2**20  # a request body (a 131K-token document is about half a MiB of text)
COMPLETION_MAX_TOKENS = 16  # a completion's max_tokens when the request gives none, as OpenAI's API has it
# the report's finish reason -> the API's ("left": its client is gone, and hears nothing)
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "left": "stop", "": "length"}
# Fields whose feature the engine does not have, and the values that ask for none of it.
UNSUPPORTED = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "suffix": ("",),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
}


class RequestError(ValueError):
    """A request the server answers with an error: its HTTP status, and the field it is about."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class Request:
    """A completion request, checked: `prompts` (one, or a batch) or chat `messages`."""

    kind: str  # "text_completion" or "chat.completion"
    prompts: list = field(default_factory=list)
    messages: list[dict] | None = None
    document: str | None = None
    max_tokens: int = COMPLETION_MAX_TOKENS
    sampling: dict = field(default_factory=dict)  # temperature, top_k, top_p, seed, stop, stop_at_eos
    stream: bool = False
    include_usage: bool = False

    @property
    def prompt(self):
        """What the engine is given: the chat messages, the one prompt, or the batch's list."""
        if self.messages is not None:
            return self.messages
        return self.prompts[0] if len(self.prompts) == 1 else self.prompts


def parse_request(body, *, chat: bool, model: str, chat_max_tokens: int) -> Request:
    """The request's JSON body, checked field by field (RequestError names the first that is wrong)."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    if body.get("model") not in (None, model):
        raise RequestError(f"model {body['model']!r} is not served here: this server serves {model!r}", "model", 404)
    for name, nothing in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in nothing:
            raise RequestError(f"{name} {body[name]!r} is not supported by this engine: leave it out", name)
    response_format = body.get("response_format") or {"type": "text"}
    if not isinstance(response_format, dict) or response_format.get("type") != "text":
        raise RequestError(f"response_format {response_format!r} is not supported: text only", "response_format")
    request = Request("chat.completion" if chat else "text_completion")
    if chat:
        request.messages = _messages(body.get("messages"))
        if body.get("document") is not None:
            raise RequestError(
                "document continues a completion's text prompt; in a chat, put the document in a message: the "
                "conversation's cache is kept from one turn to the next",
                "document",
            )
        request.max_tokens = _integer(body, "max_completion_tokens", _integer(body, "max_tokens", chat_max_tokens))
    else:
        request.prompts = _prompts(body.get("prompt"))
        request.document = body.get("document")
        if request.document is not None and not (isinstance(request.document, str) and request.document):
            raise RequestError("document must be a non-empty string", "document")
        request.max_tokens = _integer(body, "max_tokens", COMPLETION_MAX_TOKENS)
    seed = _integer(body, "seed", None, low=None)
    request.sampling = dict(
        temperature=_number(body, "temperature", 1.0, low=0.0, high=None),
        top_p=_number(body, "top_p", 1.0, low=0.0, high=1.0),
        top_k=_integer(body, "top_k", 0),
        seed=secrets.randbits(63) if seed is None else seed,  # no seed: a new draw each request
        stop=_stop(body.get("stop")),
        stop_at_eos=not _boolean(body, "ignore_eos"),  # the engine's field (as vLLM's): run to max_tokens
    )
    if request.sampling["top_p"] == 0:
        raise RequestError("top_p must lie in (0, 1]", "top_p")
    request.stream = _boolean(body, "stream")
    if request.stream and len(request.prompts) > 1:
        raise RequestError("stream serves one prompt; a list of prompts is answered without it", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    request.include_usage = _boolean(options, "include_usage")
    return request


def _integer(body: dict, name: str, default, *, low: int | None = 0):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
        raise RequestError(f"{name} must be an integer{'' if low is None else f' >= {low}'}, got {value!r}", name)
    return value


def _number(body: dict, name: str, default: float, *, low: float, high: float | None) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= (high or float("inf")):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(f"{name} must be a number {bounds}, got {value!r}", name)
    return float(value)


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise RequestError(f"{name} must be true or false, got {value!r}", name)
    return bool(value)


def _stop(value) -> list[str]:
    try:
        return StopStrings(None, value).strings
    except ValueError as error:
        raise RequestError(str(error), "stop") from None


def _prompts(value) -> list:
    """The prompt field: a string, token ids, or a list of either (a batch)."""
    if isinstance(value, str) or _token_id_list(value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) or _token_id_list(p) for p in value):
        return list(value)
    raise RequestError("prompt must be a string, token ids, or a non-empty list of either", "prompt")


def _messages(value) -> list[dict]:
    """Chat messages with string content; content given as parts keeps their text, joined."""
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)):
            raise RequestError(f"message {i} must be an object with a string role", "messages")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
                raise RequestError(f"message {i}: only text parts are supported", "messages")
            content = "".join(str(part.get("text", "")) for part in content)
        if not isinstance(content, str):
            raise RequestError(f"message {i}'s content must be a string or a list of text parts", "messages")
        out.append({"role": message["role"], "content": content})
    return out


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

    def prepare(self, request: Request) -> tuple[object, object, dict | None]:
        """The prompt to generate from, the kept Prefix it continues (None: none), and what the response
        tells of that: {"kind", "tokens" kept, "reused_tokens" (of the prompt's, found kept), "prefill_s"
        (spent here prefilling into it, or loading it), and for a document "loaded" (from the folder)}."""
        start = time.perf_counter()
        if request.document is not None:
            prompt = self.llm.encode_continuation(request.prompt)  # refused before the document is prefilled
            prefix, reused = self.kept.with_document(request.document)
            return prompt, prefix, self._told("document", reused, start) | {"loaded": self.kept.loaded}
        continued = None
        if self.reuse_prompts and len(request.prompts) <= 1:
            continued = self.kept.prompt(self.llm.encode(request.prompt))
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
        try:
            if not job.request.stream:
                job.send("response", self.answer(job.request))
                return
            with closing(self.chunks(job.request)) as chunks:
                for chunk in chunks:
                    job.send("chunk", chunk)
                    if job.gone.is_set():
                        break
            job.send("end")
        except Exception as error:  # ValueError: what the engine refuses in the prompt
            job.send("error", error)

    def run_batch(self, jobs: list, more: Callable[[int], list] | None = None) -> None:
        """The jobs' requests decoded as one batch; each job is sent its own response, or chunks, as its
        sequence goes. `more(running)`, asked between steps with the number of sequences decoding, gives
        jobs (`joinable`) that join the batch there. A batch of one job continues the kept cache where its
        request does (a document's, or with `reuse_prompts` a conversation's), and keeps its prompt for the
        next request (`reuse_prompts`); the jobs that join it keep nothing and leave the kept cache as it is."""
        batch = _Batch(lambda r: self._head(r, ".chunk" if r.stream and r.messages is not None else ""))
        log.info("a batch of %d requests", len(jobs))
        first, prefix, kept = None, None, None
        if len(jobs) == 1 and (self.cache.reuse_prompts or jobs[0].request.document is not None):
            try:
                first, prefix, kept = self.cache.prepare(jobs[0].request)
            except Exception as error:  # its prompt or document refused: the batch does not start
                jobs[0].send("error", error)
                return

        def joining() -> list[tuple]:
            new = more(len(batch.running))
            if new:
                log.info("%d request(s) joined the batch, now %d", len(new), len(batch.running) + len(new))
            return [(job.ids, s) for job, s in zip(new, batch.add(new))]

        sampling = batch.add(jobs)
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

    def answer(self, request: Request) -> dict:
        """The whole response to a request without `stream`."""
        prompt, prefix, kept = self.cache.prepare(request)
        results = self.llm.generate(prompt, request.max_tokens, **self._arguments(request, prefix))
        results = results if isinstance(results, list) else [results]
        reports = [r.report for r in results]
        for report in reports:
            _log_report(report)
        told = [self._report(report, kept) for report in reports]  # one per choice
        return self._response(request, self._head(request, ""), [r.text for r in results], reports, told)

    def chunks(self, request: Request) -> Iterator[dict]:
        """The stream's chunks of a request with `stream`: the text piece by piece, then the finish."""
        report = GenerationReport()
        head = self._head(request, ".chunk" if request.messages is not None else "")
        prompt, prefix, kept = self.cache.prepare(request)
        pieces = self.llm.stream(prompt, request.max_tokens, report=report, **self._arguments(request, prefix))
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

    def add(self, jobs: list) -> list[Sampling]:
        """The jobs as the batch's next rows; returns their Sampling."""
        for job in jobs:
            self.running.add(len(self.jobs))
            self.jobs.append(job)
            self.heads.append(self.head(job.request))
            self.texts.append([])
        return [Sampling(job.request.max_tokens, **job.request.sampling) for job in jobs]


def _role_chunk(head: dict) -> dict:
    """A chat stream's first chunk: the assistant's role."""
    return head | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}


def _log_report(report) -> None:
    log.info(
        "prompt %d tokens (%d of them from the kept cache), %d new (%s) in %.2f s after a first token at %.2f s; "
        "host KV read per step %.2f%%",
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


class Handler(BaseHTTPRequestHandler):
    """HTTP to `Completions` and back: JSON responses, server-sent events, OpenAI-shaped errors."""

    server: Server
    error_content_type = "application/json"

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            model = {"id": self.server.completions.model, "object": "model", "created": 0, "owned_by": "hybridattn"}
            self._send_json(200, {"object": "list", "data": [model]})
        elif self.path.rstrip("/") == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._send_error(RequestError(f"no such endpoint: GET {self.path}", status=404))

    def do_POST(self) -> None:
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        chat = routes.get(self.path.rstrip("/"))
        if chat is None:
            self._send_error(RequestError(f"no such endpoint: POST {self.path}", status=404))
            return
        completions = self.server.completions
        try:
            request = parse_request(
                self._body(), chat=chat, model=completions.model, chat_max_tokens=self.server.chat_max_tokens
            )
            job = self.server.scheduler.submit(request)
            if request.stream:
                self._send_events(job.chunks())
            else:
                self._send_json(200, job.response())
        except RequestError as error:
            self._send_error(error)
        except (ValueError, TypeError) as error:  # what the engine refuses: the prompt, its token ids, a value
            self._send_error(RequestError(str(error)))
        except (BrokenPipeError, ConnectionResetError):
            log.info("the client of %s closed the connection", self.path)
        except Exception as error:  # the server goes on; the client hears of it, the log has its traceback
            log.exception("internal error on %s", self.path)
            self._send_error(RequestError(f"internal error: {type(error).__name__}: {error}", status=500))

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise RequestError(f"the request body holds {length} bytes, more than {MAX_BODY_BYTES}", status=413)
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(f"the request body is not JSON: {error}") from None

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_events(self, chunks: Iterator[dict]) -> None:
        """Each chunk as a server-sent event as its text is decoded, then `[DONE]`; the connection
        closes after it. An error before the first chunk (a prompt refused) is an error response; one
        after it ends the stream with an error event."""
        with closing(chunks):
            first = next(chunks)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            try:
                for chunk in itertools.chain([first], chunks):
                    self._event(json.dumps(chunk))
            except (BrokenPipeError, ConnectionResetError):
                raise
            except Exception as error:
                log.exception("error in the stream of %s", self.path)
                self._event(json.dumps(_error_body(RequestError(f"{type(error).__name__}: {error}", status=500))))
        self._event("[DONE]")

    def _event(self, data: str) -> None:
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _send_error(self, error: RequestError) -> None:
        self._send_json(error.status, _error_body(error))

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (the base class's name)
        log.info("%s %s", self.address_string(), format % args)


def _error_body(error: RequestError) -> dict:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"error": {"message": str(error), "type": kind, "param": error.param, "code": None}}


class Server(ThreadingHTTPServer):
    """The HTTP server of one engine; `serve_forever()` serves until interrupted, `close()` after. Requests
    that wait together are decoded in batches of up to `max_batch`, which with `join` those that come while
    a batch runs join (engine.scheduler)."""

    daemon_threads = True

    def __init__(
        self,
        llm,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        model: str,
        chat_max_tokens: int = 512,
        reuse_prompts: bool = True,
        prefix_folder=None,
        max_batch: int = 8,
        join: bool = True,
    ):
        if not isinstance(chat_max_tokens, int) or chat_max_tokens < 1:
            raise ValueError(f"chat_max_tokens must be an int >= 1, got {chat_max_tokens!r}")
        self.completions = Completions(llm, model, reuse_prompts=reuse_prompts, folder=prefix_folder)
        self.chat_max_tokens = chat_max_tokens
        super().__init__((host, port), Handler)
        self.scheduler = Scheduler(self.completions, max_batch, join=join)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def close(self) -> None:
        self.server_close()
        self.scheduler.close()
        self.completions.close()
