"""The HTTP side of the server: the handler (JSON responses, server-sent events, OpenAI-shaped errors)
and the `Server`, whose one engine thread (engine.scheduler) runs the requests."""

from __future__ import annotations

import itertools
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from engine.scheduler import Closed, Scheduler
from engine.server.completions import Completions
from engine.server.request import RequestError, parse_request

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 2**20  # a request body (a 131K-token document is about half a MiB of text)
CLOSE_WAIT_S = 5.0  # how long `Server.close` waits for the handlers to send the answers the engine ended


class Handler(BaseHTTPRequestHandler):
    """HTTP to `Completions` and back: JSON responses, server-sent events, OpenAI-shaped errors."""

    server: Server

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
                self._send_events(job.chunks(self._connected))
            else:
                self._send_json(200, job.response(self._connected))
        except RequestError as error:
            self._send_error(error)
        except Closed as error:
            self._send_error(RequestError(str(error), status=503))
        except (ValueError, TypeError) as error:  # what the engine refuses: the prompt, its token ids, a value
            self._send_error(RequestError(str(error)))
        except (BrokenPipeError, ConnectionResetError):
            log.info("the client of %s closed the connection", self.path)
        except Exception as error:  # the server goes on; the client hears of it, the log has its traceback
            log.exception("internal error on %s", self.path)
            self._send_error(RequestError(f"internal error: {type(error).__name__}: {error}", status=500))

    def _connected(self) -> bool:
        """Whether the client still holds the connection: one it closed reads as readable with nothing in it.
        (Asked while its answer is prefilled or decoded: a client that left ends its generation there.)"""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return not readable or bool(self.connection.recv(1, socket.MSG_PEEK))
        except (OSError, ValueError):  # reset, or closed here
            return False

    def _body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():  # it was read as no body at all
            raise RequestError("send the body with a Content-Length: a chunked body is not read", status=411)
        given = (self.headers.get("Content-Length") or "0").strip()
        if not (given.isascii() and given.isdigit()):  # a negative length would read to the end of the stream
            raise RequestError(f"Content-Length must be a number of bytes, got {given!r}")
        length = int(given)
        if length > MAX_BODY_BYTES:
            raise RequestError(f"the request body holds {length} bytes, more than {MAX_BODY_BYTES}", status=413)
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, nested too deep, an int too long
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

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own errors (a method not served, a request line it cannot read) in the
        shape of every other error, where it sent an HTML page."""
        self.close_connection = True
        self._send_error(RequestError(message or self.responses.get(code, ("error",))[0], status=code))

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (the base class's name)
        log.info("%s %s", self.address_string(), format % args)


def _error_body(error: RequestError) -> dict:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"error": {"message": str(error), "type": kind, "param": error.param, "code": None}}


class Server(ThreadingHTTPServer):
    """The HTTP server of one engine; `serve_forever()` serves until interrupted, `close()` after. Requests
    that wait together are decoded in batches of up to `max_batch`, which with `join` those that come while
    a batch runs join (engine.scheduler)."""

    daemon_threads = True  # a client that stops reading cannot hold the process: `close` waits for it a while only

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
        if not isinstance(chat_max_tokens, int) or isinstance(chat_max_tokens, bool) or chat_max_tokens < 1:
            raise ValueError(f"chat_max_tokens must be an int >= 1, got {chat_max_tokens!r}")
        self._handlers: set[threading.Thread] = set()  # the handler threads under way
        self._handlers_lock = threading.Lock()
        self.completions = Completions(llm, model, reuse_prompts=reuse_prompts, folder=prefix_folder)
        self.chat_max_tokens = chat_max_tokens
        super().__init__((host, port), Handler)
        self.scheduler = Scheduler(self.completions, max_batch, join=join)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def process_request_thread(self, request, client_address) -> None:
        thread = threading.current_thread()
        with self._handlers_lock:
            self._handlers.add(thread)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._handlers_lock:
                self._handlers.discard(thread)

    def close(self) -> None:
        """Stop: the generations under way end at their next token (engine.scheduler), and their handlers send
        what they have, for up to CLOSE_WAIT_S seconds, before the kept cache is released (a process that
        exited while a handler thread still ran would not answer its client, and may abort)."""
        self.server_close()
        self.scheduler.close()
        deadline = time.monotonic() + CLOSE_WAIT_S
        with self._handlers_lock:
            handlers = list(self._handlers)
        for thread in handlers:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.completions.close()
