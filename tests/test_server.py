"""The HTTP server (engine.server): OpenAI-shaped completions and chat completions give the engine's
own answers, streamed or whole; a document is prefilled once for the requests that name it; what
the engine cannot do, and bad input, are refused with errors that name the field."""

import contextlib
import io
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
import torch

from engine import OffloadConfig
from engine.api import HybridLLM
from engine.cli import main
from engine.prefill import SteppedPrefill
from engine.prefix_file import PrefixFolder
from engine.scheduler import Job, Scheduler
from engine.server import Completions, RequestError, Server, parse_request
from tests.conftest import tiny_llama
from tests.test_attention import COVER_ALL
from tests.test_stop import first_new_piece
from tests.test_stream_batch import layers_run

NEW = 12
GREEDY = {"temperature": 0}
REQUEST = dict(chat=False, model="tiny", chat_max_tokens=NEW)


@pytest.fixture(scope="module")
def llm(bundled_tokenizer):
    """A budget that covers every host token: a prompt answered from a kept cache is then answered as
    the whole prompt is (a prefix's index is built from fewer queries, which a partial read would show).
    The index builds run in the engine's thread: when a joining prompt is in is a count of steps, not a
    worker thread's timing (on a loaded machine a build could outlast a short answer's steps)."""
    cfg = OffloadConfig(device="cpu", **COVER_ALL, host_dtype="float32", prefill_chunk=64, build_workers=0)
    return HybridLLM(tiny_llama(vocab=len(bundled_tokenizer)), bundled_tokenizer, cfg)


@contextlib.contextmanager
def running(server):
    """The server serving on a thread of its own until the block ends."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(llm):
    with running(Server(llm, port=0, model="tiny", chat_max_tokens=NEW)) as server:
        yield server


@pytest.fixture(scope="module")
def prompt():
    return "The grass is green and the sky is blue. " * 30


def post(server, path: str, body, *, raw: bytes | None = None) -> tuple[int, str]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def answer(server, path: str, body) -> dict:
    status, text = post(server, path, body)
    assert status == 200, text
    return json.loads(text)


def events(server, path: str, body) -> list:
    """A stream's events: each chunk's JSON, then the string "[DONE]"."""
    status, text = post(server, path, {**body, "stream": True})
    assert status == 200, text
    data = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def test_a_completion_is_the_engine_s_greedy_answer(server, llm, prompt):
    got = answer(server, "/completions", {"model": "tiny", "prompt": prompt, "max_tokens": NEW, **GREEDY})
    want = llm.generate(prompt, NEW, progress=False)
    [choice] = got["choices"]
    assert got["object"] == "text_completion" and got["model"] == "tiny"
    assert choice["text"] == want.text and choice["index"] == 0
    assert choice["finish_reason"] == ("length" if want.report.finish_reason == "length" else "stop")
    prompt_tokens = len(llm.tokenizer(prompt).input_ids)
    assert got["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(want.token_ids),
        "total_tokens": prompt_tokens + len(want.token_ids),
    }
    assert got["hybridattn"][0]["kv_read_frac"] == want.report.kv_read_frac > 0  # the engine's report rides along
    assert got["hybridattn"][0]["kept"]["reused_tokens"] == 0  # (the prompt kept for a next turn)


def test_a_list_of_prompts_is_a_batch_each_answered_as_alone(server, llm, prompt):
    prompts = [prompt, list(range(100, 180))]  # text and token ids
    got = answer(server, "/completions", {"prompt": prompts, "max_tokens": NEW, **GREEDY})
    assert [c["index"] for c in got["choices"]] == [0, 1]
    assert [c["text"] for c in got["choices"]] == [llm.generate(p, NEW, progress=False).text for p in prompts]
    assert got["usage"]["prompt_tokens"] == len(llm.tokenizer(prompt).input_ids) + 80


def test_a_stream_gives_the_answer_piece_by_piece_then_its_finish_and_usage(server, prompt):
    body = {"prompt": prompt, "max_tokens": NEW, **GREEDY}
    whole = answer(server, "/completions", body)
    got = events(server, "/completions", {**body, "stream_options": {"include_usage": True}})
    *chunks, finish, usage, done = got
    assert done == "[DONE]" and len(chunks) > 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert finish["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert len({c["id"] for c in got[:-1]}) == 1  # one id for the whole stream


def test_a_stop_string_ends_the_answer_before_it(server, llm, prompt):
    free = llm.generate(prompt, NEW, stop_at_eos=False, progress=False)
    stop = first_new_piece(llm_stops(llm), free.token_ids, 1)
    got = answer(server, "/completions", {"prompt": prompt, "max_tokens": NEW, "stop": [stop], **GREEDY})
    [choice] = got["choices"]
    assert choice["text"] == free.text[: free.text.find(stop)] and choice["finish_reason"] == "stop"
    streamed = events(server, "/completions", {"prompt": prompt, "max_tokens": NEW, "stop": stop, **GREEDY})
    assert "".join(c["choices"][0]["text"] for c in streamed[:-1]) == choice["text"]
    assert streamed[-2]["choices"][0]["finish_reason"] == "stop"


def llm_stops(llm):
    from engine.stop import StopStrings

    return StopStrings(llm.tokenizer, [])


def test_a_chat_completion_goes_through_the_chat_template(server, llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    want = llm.generate(messages, NEW, progress=False)
    parts = [
        messages[0],
        {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]},
    ]
    got = answer(server, "/chat/completions", {"messages": parts, **GREEDY})  # max_tokens: the server's default
    [choice] = got["choices"]
    assert got["object"] == "chat.completion" and got["id"].startswith("chatcmpl-")
    assert choice["message"] == {"role": "assistant", "content": want.text}
    assert got["usage"]["completion_tokens"] == len(want.token_ids) <= NEW
    streamed = events(server, "/chat/completions", {"messages": messages, "max_completion_tokens": NEW, **GREEDY})
    first, *chunks, finish, done = streamed
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in streamed[:-1])
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == want.text
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_a_document_is_prefilled_once_for_the_requests_that_name_it(server, llm, monkeypatch):
    made = []
    prefix = llm.prefix
    monkeypatch.setattr(llm, "prefix", lambda text, **kw: made.append(prefix(text, **kw)) or made[-1])
    document = "Alice keeps the red key and Bob the blue one. " * 40
    body = {"prompt": " Who keeps the red key?", "document": document, "max_tokens": NEW, **GREEDY}
    first = answer(server, "/completions", body)
    answer(server, "/completions", {**body, "prompt": [101, 102, 103]})  # another question, as token ids
    again = answer(server, "/completions", body)
    assert len(made) == 1 and server.completions.cache.prefix is made[0]
    assert again["choices"] == first["choices"]  # the document's state, as left the first time
    report, tokens = first["hybridattn"][0], made[0].tokens
    assert report["kept"]["kind"] == "document" and report["kept"]["tokens"] == tokens
    assert report["kept"]["reused_tokens"] == 0 and again["hybridattn"][0]["kept"]["reused_tokens"] == tokens
    assert report["prefix_tokens"] == tokens
    assert report["prompt_tokens"] == tokens + len(llm.tokenizer(body["prompt"]).input_ids)
    alone = prefix(document, progress=False)
    try:
        want = llm.generate(body["prompt"], NEW, prefix=alone, progress=False)
    finally:
        alone.release()
    assert first["choices"][0]["text"] == want.text
    answer(server, "/completions", {**body, "document": "Another document. " * 20})
    assert len(made) == 2 and made[0].cache is None  # the first given back when the second came


def test_with_a_prefix_folder_a_document_that_comes_back_is_loaded_not_prefilled(llm, tmp_path):
    """--prefix-dir: each document's prefix is kept as a file; one that comes back after another, or after
    a restart, is loaded from it, and answers as when it was prefilled."""
    folder = PrefixFolder(llm, tmp_path, 2**30)
    first, second = "Alice keeps the red key. " * 40, "Bob keeps the blue key. " * 40
    body = {"prompt": " Who keeps the key?", "max_tokens": NEW, **GREEDY}
    with running(Server(llm, port=0, model="tiny", prefix_folder=folder)) as server:
        answers = [answer(server, "/completions", {**body, "document": d}) for d in (first, second, first)]
    kept = [a["hybridattn"][0]["kept"] for a in answers]
    assert [k["loaded"] for k in kept] == [False, False, True] and len(list(tmp_path.glob("*.prefix"))) == 2
    assert kept[2]["reused_tokens"] == kept[2]["tokens"] == kept[0]["tokens"] and kept[0]["reused_tokens"] == 0
    assert answers[2]["choices"] == answers[0]["choices"]
    with running(Server(llm, port=0, model="tiny", prefix_folder=PrefixFolder(llm, tmp_path, 2**30))) as server:
        again = answer(server, "/completions", {**body, "document": second})  # a restart: loaded from its file
    assert again["hybridattn"][0]["kept"]["loaded"] and again["choices"] == answers[1]["choices"]


def test_a_conversation_s_next_turn_prefills_only_what_is_new(server, llm, monkeypatch):
    made = []
    prefix = llm.prefix
    monkeypatch.setattr(llm, "prefix", lambda ids, **kw: made.append(prefix(ids, **kw)) or made[-1])
    turns = [{"role": "user", "content": "The grass is green and the sky is blue. " * 20 + "What is green?"}]
    first = answer(server, "/chat/completions", {"messages": turns, **GREEDY})
    turns += [first["choices"][0]["message"], {"role": "user", "content": "And what is blue?"}]
    second = answer(server, "/chat/completions", {"messages": turns, **GREEDY})
    turns += [second["choices"][0]["message"], {"role": "user", "content": "Thanks."}]
    third = answer(server, "/chat/completions", {"messages": turns, **GREEDY})
    assert len(made) == 1  # the first turn's prompt kept, and extended by each turn after it
    kept = [r["hybridattn"][0]["kept"] for r in (first, second, third)]
    ids = [len(llm.encode(turns[: 2 * i + 1])[0]) for i in range(3)]
    assert [k["reused_tokens"] for k in kept] == [0, ids[0] - 1, ids[1] - 1]  # all but each turn's last token
    assert [r["usage"]["prompt_tokens"] for r in (first, second, third)] == ids
    for i, response in enumerate((second, third)):  # each as the whole conversation's answer
        want = llm.generate(turns[: 2 * i + 3], NEW, progress=False)
        assert response["choices"][0]["message"]["content"] == want.text
    answer(server, "/completions", {"prompt": ["a", "b"], "max_tokens": 1})  # a batch continues nothing
    assert server.completions.cache.prefix is None and made[0].cache is None


def test_without_reuse_no_cache_is_kept(llm, prompt):
    server = Server(llm, port=0, model="tiny", reuse_prompts=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        body = {"prompt": prompt, "max_tokens": 4, **GREEDY}
        got = [
            answer(server, "/completions", body),
            answer(server, "/completions", body | {"prompt": prompt + "x y z"}),
        ]
        assert all("kept" not in r["hybridattn"][0] for r in got) and server.completions.cache.prefix is None
        assert got[0]["choices"][0]["text"] == llm.generate(prompt, 4, progress=False).text
        assert [r["hybridattn"][0]["batch"] for r in got] == [1, 1]  # each started a batch others could join
    finally:
        server.shutdown()
        server.close()


def test_a_prompt_the_tokenizer_fails_on_is_answered_an_error_and_the_server_goes_on(llm, prompt, monkeypatch):
    """Any error encoding a prompt, not only a refusal, reaches its client: the engine thread runs on."""
    encode = llm.encode

    def failing(text):
        if text == "boom":
            raise RuntimeError("the template broke")
        return encode(text)

    monkeypatch.setattr(llm, "encode", failing)
    server = Server(llm, port=0, model="tiny", reuse_prompts=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        body = {"prompt": "boom", "max_tokens": 2, **GREEDY}
        status, text = post(server, "/completions", body)
        assert status == 500 and "the template broke" in text
        got = answer(server, "/completions", body | {"prompt": prompt})
        assert got["choices"][0]["text"] == llm.generate(prompt, 2, progress=False).text
    finally:
        server.shutdown()
        server.close()


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/completions", [1, 2], 400, None),
        ("/completions", {"prompt": "x", "n": 2}, 400, "n"),
        ("/completions", {"prompt": "x", "logprobs": 3}, 400, "logprobs"),
        ("/completions", {"prompt": "x", "echo": True}, 400, "echo"),
        ("/completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
        ("/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
        ("/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/completions", {"prompt": "x", "top_k": 1.5}, 400, "top_k"),
        ("/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ("/completions", {"prompt": "x", "seed": "one"}, 400, "seed"),
        ("/completions", {"prompt": "x", "seed": 2**64}, 400, "seed"),  # more than a generator takes
        ("/completions", {"prompt": "x", "seed": -(2**63) - 1}, 400, "seed"),
        ("/completions", {"prompt": "x", "temperature": float("inf")}, 400, "temperature"),  # JSON's Infinity
        ("/completions", {"prompt": "x", "temperature": 10**400}, 400, "temperature"),  # no float holds it
        ("/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
        ("/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
        ("/completions", {"prompt": ["a", "b"], "stream": True}, 400, "stream"),
        ("/completions", {"prompt": "x", "document": ""}, 400, "document"),
        ("/completions", {"prompt": "x", "document": "x"}, 400, "document"),  # one token: a prefix holds 2
        ("/completions", {"prompt": ["Hi", "Hello there"], "document": "Some document text."}, 400, "document"),
        ("/completions", {}, 400, "prompt"),
        ("/completions", {"prompt": []}, 400, "prompt"),
        ("/completions", {"prompt": [1, 10**9]}, 400, "prompt"),  # refused by the engine: outside the vocabulary
        ("/completions", {"prompt": [1, 10**9], "stream": True}, 400, "prompt"),
        ("/completions", {"prompt": ""}, 400, "prompt"),  # refused by the engine: empty
        # after a document (the kept cache prepares it), where the error came without its field
        ("/completions", {"prompt": [1, 10**9], "document": "Some document text."}, 400, "prompt"),
        ("/completions", {"prompt": "", "document": "Some document text."}, 400, "prompt"),
        ("/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
        ("/completions", {"prompt": "x", "stop": {"a": 1}}, 400, "stop"),
        ("/completions", {"prompt": "x", "n": True}, 400, "n"),  # not n's 1
        ("/completions", {"prompt": "x", "echo": 0}, 400, "echo"),
        (
            "/completions",
            {"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}},
            400,
            "stream_options",
        ),
        ("/chat/completions", {"messages": []}, 400, "messages"),
        ("/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "document": "d"}, 400, "document"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{}]}, 400, "tools"),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "response_format": "json"},
            400,
            "response_format",
        ),
        ("/embeddings", {"input": "x"}, 404, None),
        # a lone surrogate (a JSON escape): the tokenizer failed on it mid-batch, ending the batch's other answers
        ("/completions", {"prompt": "x", "stop": ["\ud800"]}, 400, "stop"),
        ("/completions", {"prompt": " Q", "document": "a \ud800 document"}, 400, "document"),
    ],
)
def test_bad_requests_get_an_error_that_names_the_field(server, path, body, status, param):
    got_status, text = post(server, path, body)
    error = json.loads(text)["error"]
    assert got_status == status and error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"]


def test_a_body_that_is_not_json_is_refused(server):
    status, text = post(server, "/completions", None, raw=b"{not json")
    assert status == 400 and "not JSON" in json.loads(text)["error"]["message"]
    status, text = post(server, "/completions", None, raw=b"[" * 100_000)  # nested past the parser's recursion
    assert status == 400 and "not JSON" in json.loads(text)["error"]["message"]


@pytest.mark.parametrize("tokens", [0, True, 2.0])
def test_a_server_refuses_a_chat_default_that_is_not_a_count(llm, tokens):
    with pytest.raises(ValueError, match="chat_max_tokens must be an int >= 1"):  # True was taken for 1
        Server(llm, port=0, model="tiny", chat_max_tokens=tokens)


def test_a_chunked_body_is_refused_not_read_as_none():
    from engine.server.endpoints import Handler

    handler = Handler.__new__(Handler)
    handler.headers, handler.rfile = {"Transfer-Encoding": "chunked"}, io.BytesIO(b'f\r\n{"prompt": "x"}\r\n0\r\n\r\n')
    with pytest.raises(RequestError, match="send the body with a Content-Length") as refused:
        handler._body()  # it was read as no body: "the request body must be a JSON object, got NoneType"
    assert refused.value.status == 411


def test_a_request_to_a_closed_scheduler_is_a_503(llm):
    with running(Server(llm, port=0, model="tiny", chat_max_tokens=NEW)) as server:
        server.scheduler.close()  # the HTTP server still up, as while `serve` stops
        status, text = post(server, "/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 503 and json.loads(text)["error"]["message"] == "the server is closed"  # was a 500


def test_a_method_the_server_does_not_serve_gets_a_json_error(server):
    request = urllib.request.Request(server.url + "/completions", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 501 and refused.value.headers["Content-Type"] == "application/json"
    error = json.loads(refused.value.read())["error"]  # the base class sent an HTML page
    assert error["type"] == "server_error" and "DELETE" in error["message"]


def test_the_models_endpoint_lists_the_served_name(server):
    with urllib.request.urlopen(server.url + "/models", timeout=30) as response:
        listed = json.loads(response.read())
    assert [m["id"] for m in listed["data"]] == ["tiny"]
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(server.url + "/nothing", timeout=30)
    assert error.value.code == 404


def test_requests_at_once_are_answered_one_after_another(server, llm, prompt):
    body = {"prompt": prompt, "max_tokens": NEW, **GREEDY}
    results = [None, None]

    def ask(i):
        results[i] = answer(server, "/completions", body)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    want = llm.generate(prompt, NEW, progress=False).text
    assert [r["choices"][0]["text"] for r in results] == [want, want]


def test_a_client_that_leaves_a_stream_ends_its_generation(server, prompt, caplog):
    body = json.dumps({"prompt": prompt, "max_tokens": 4000, "stream": True, **GREEDY}).encode()
    host, port = server.server_address[:2]
    caplog.set_level(logging.INFO, logger="engine.server")
    with socket.create_connection((host, port)) as client:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        client.sendall(head.encode() + body)
        assert client.recv(64).startswith(b"HTTP/1.0 200")  # the stream began
    # the next request joins it; the first ends when its writes find the client gone, long before 4000 tokens
    assert answer(server, "/completions", {"prompt": "x y", "max_tokens": 2})["choices"]
    first = f"prompt {len(server.completions.llm.encode(prompt)[0])} tokens"
    deadline = time.monotonic() + 60
    while not (ended := [r.getMessage() for r in caplog.records if r.getMessage().startswith(first)]):
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        time.sleep(0.1)
    [(new, finish)] = re.findall(r", (\d+) new \(([^)]*)\)", ended[0])
    assert int(new) < 4000 and finish == "left" and "joined the batch" in caplog.text


def test_a_stream_run_alone_whose_client_leaves_is_logged_as_left(server, prompt, caplog):
    caplog.set_level(logging.INFO, logger="engine.server")
    request = parse_request({"prompt": prompt, "max_tokens": 4000, "stream": True, **GREEDY}, **REQUEST)
    chunks = server.completions.chunks(request)
    next(chunks), next(chunks)
    chunks.close()  # as Completions.run_alone does where its client is gone
    short = parse_request({"prompt": prompt, "max_tokens": 2, "stream": True, **GREEDY}, **REQUEST)
    assert list(server.completions.chunks(short))[-1]["choices"][0]["finish_reason"] == "length"
    ended = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prompt ")]
    assert [re.findall(r", \d+ new \(([^)]*)\)", line) for line in ended] == [["left"], ["length"]]


def test_closing_the_server_waits_for_its_handlers_to_send_the_answers_ended(llm, prompt, monkeypatch):
    """Ctrl-C on `hybridattn serve` closes the server while a request runs: its generation ends at the next
    token, and close() returns only once the handler has sent that answer (a process that exits while a
    handler thread runs leaves its client without one, and may abort)."""
    from engine.server import endpoints

    send_json = endpoints.Handler._send_json

    def slow_send_json(handler, status, payload):  # a handler still sending when the engine thread is done
        time.sleep(0.5)
        send_json(handler, status, payload)

    monkeypatch.setattr(endpoints.Handler, "_send_json", slow_send_json)
    before = set(threading.enumerate())
    server = Server(llm, port=0, model="tiny")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    got = []
    body = {"prompt": [prompt, prompt[:40]], "max_tokens": 4000, **GREEDY}
    client = threading.Thread(target=lambda: got.append(post(server, "/completions", body)))
    client.start()
    deadline = time.monotonic() + 60
    while not server.scheduler._running:  # the request under way
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.shutdown()
    server.close()
    handlers = [t for t in threading.enumerate() if t not in before and "process_request_thread" in t.name]
    assert not handlers  # every handler done, its answer sent
    client.join(10)
    [(status, text)] = got
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] < 2 * 4000
    thread.join(10)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_run_alone_whose_client_is_gone_ends_before_its_prefill(server, llm, prompt, stream):
    """A request run by itself (several prompts, or a stream with joining off); closing the server marks the job
    gone, and each prompt then ends in its prefill (or after its next token) rather than at `max_tokens`.
    (Ending after the next token, and where in the prefill: tests/test_stream_batch.py.)"""
    prompts = prompt if stream else [prompt, prompt[:40]]
    request = parse_request({"prompt": prompts, "max_tokens": 4000, "stream": stream, **GREEDY}, **REQUEST)
    job = Job(request)
    job.gone.set()
    with layers_run(llm.model) as run:
        server.completions.run_alone(job)
    if stream:  # its first chunk is its finish (and the last it is sent: it is gone)
        [(choice,)] = [chunk["choices"] for chunk in job.chunks()]
        assert (choice["text"], choice["finish_reason"]) == ("", "stop")
    else:
        response = job.response()
        assert response["usage"]["completion_tokens"] == 0
        assert [told["finish_reason"] for told in response["hybridattn"]] == ["left", "left"]
        assert [choice["finish_reason"] for choice in response["choices"]] == ["stop", "stop"]
    assert run == []


def test_a_job_is_gone_once_its_client_is_seen_to_have_left_while_it_waits(monkeypatch):
    from engine import scheduler

    monkeypatch.setattr(scheduler, "CLIENT_POLL_S", 0.01)
    job, asked = Job(None), []

    def connected():
        asked.append(1)
        if len(asked) == 3:  # the engine sees it gone, and ends the job's generation
            threading.Timer(0.05, job.send, ("response", {"done": True})).start()
        return len(asked) < 3

    assert job.response(connected) == {"done": True} and job.gone.is_set() and len(asked) == 3
    streamed = Job(None)
    streamed.send("chunk", 1)
    streamed.send("end")
    assert list(streamed.chunks(lambda: True)) == [1]  # (closed at its end: gone)


def test_a_handler_sees_whether_its_client_holds_the_connection():
    from engine.server.endpoints import Handler

    handler = Handler.__new__(Handler)  # its connection alone
    ours, theirs = socket.socketpair()
    handler.connection = ours
    try:
        assert handler._connected()
        theirs.sendall(b"more")  # a request sent after it: still there
        assert handler._connected()
        theirs.close()
        ours.recv(4)
        assert not handler._connected()
        ours.close()
        assert not handler._connected()
    finally:
        ours.close()


def test_a_whole_response_ends_once_its_client_closes_the_connection(server, prompt, caplog):
    """Without `stream` the server sends nothing until the answer is whole: it looks whether the client is
    still there while it waits, and a client that left ends its generation (finish "left") there."""
    caplog.set_level(logging.INFO, logger="engine")
    body = json.dumps({"prompt": prompt, "max_tokens": 4000, **GREEDY}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.server_port)) as client:
        client.sendall(head + body)
        deadline = time.monotonic() + 60
        while not server.scheduler._running:  # the request under way
            assert time.monotonic() < deadline
            time.sleep(0.01)
    while not (ended := [r.getMessage() for r in caplog.records if " new (" in r.getMessage()]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [line] = ended
    assert "new (left)" in line and int(line.split(" new (")[0].rsplit(" ", 1)[1]) < 4000


class GoneAt:
    """A job's `gone` that its client leaves at its `at`-th question (counted in `asked`)."""

    def __init__(self, at: int):
        self.at, self.asked = at, 0

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked >= self.at

    def set(self) -> None:
        self.at = 0


def run(completions, body, gone=None) -> Job:
    """The request run as the engine thread runs it (in a batch, which none joins); `gone`: its job's."""
    job = Job(parse_request(body, **REQUEST))
    job.gone = gone or job.gone
    completions.run_batch([job])
    return job


@pytest.fixture
def completions(llm):
    """Requests to answers in this thread, with a kept cache of their own."""
    completions = Completions(llm, "tiny")
    yield completions
    completions.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_gone_while_its_document_is_prefilled_keeps_nothing_and_the_next_prefills_it(
    completions, llm, stream
):
    document = "Carol keeps the green key and Dan the white one. " * 30  # chunks of 64 tokens
    body = {"prompt": " Who keeps the green key?", "document": document, "max_tokens": NEW, **GREEDY}
    gone = GoneAt(2)
    job = run(completions, {**body, "stream": stream}, gone)
    if stream:
        [(choice,)] = [chunk["choices"] for chunk in job.chunks()]
    else:
        response = job.response()
        [choice] = response["choices"]
        tokens = llm.encode(document).shape[1] + llm.encode_continuation(body["prompt"]).shape[1]
        assert response["usage"] == {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}
    assert (choice["text"], choice["finish_reason"], gone.asked) == ("", "stop", 2)  # before its second layer
    assert completions.cache.prefix is None  # nothing kept
    again = run(completions, body).response()
    alone = llm.prefix(document, progress=False)
    try:
        want = llm.generate(body["prompt"], NEW, prefix=alone, progress=False)
    finally:
        alone.release()
    assert again["choices"][0]["text"] == want.text and again["hybridattn"][0]["kept"]["reused_tokens"] == 0


@pytest.mark.parametrize("document", [False, True])
def test_a_request_gone_before_it_ran_leaves_the_kept_cache_as_it_was(completions, llm, document):
    ids = torch.randint(0, 5000, (100,), generator=torch.Generator().manual_seed(5)).tolist()
    run(completions, {"prompt": ids, "max_tokens": NEW, **GREEDY}).response()
    kept = completions.cache.prefix
    other = {"prompt": " Who?", "document": "Carol keeps the key. " * 10} if document else {"prompt": ids[50:]}
    response = run(completions, {**other, "max_tokens": NEW, **GREEDY}, GoneAt(1)).response()
    assert response["hybridattn"][0]["finish_reason"] == "left"
    assert completions.cache.prefix is kept and kept.tokens == 99  # another client's conversation, not given back
    again = run(completions, {"prompt": ids + ids[:10], "max_tokens": NEW, **GREEDY}).response()
    assert again["hybridattn"][0]["kept"]["reused_tokens"] == 99


def test_a_request_gone_while_the_kept_prompt_is_extended_leaves_it_as_it_was(completions, llm):
    ids = torch.randint(0, 5000, (400,), generator=torch.Generator().manual_seed(4)).tolist()
    body = {"prompt": ids[:100], "max_tokens": NEW, **GREEDY}
    run(completions, body).response()  # kept: its 99 first tokens
    kept = completions.cache.prefix
    gone = GoneAt(2)
    response = run(completions, {**body, "prompt": ids}, gone).response()
    [choice] = response["choices"]
    assert (choice["text"], choice["finish_reason"], gone.asked) == ("", "stop", 2)
    assert response["usage"]["prompt_tokens"] == len(ids) and response["hybridattn"][0]["finish_reason"] == "left"
    assert completions.cache.prefix is kept and kept.tokens == 99 and kept.ids[0].tolist() == ids[:99]
    again = run(completions, {**body, "prompt": ids}).response()
    assert again["hybridattn"][0]["kept"]["reused_tokens"] == 99
    assert again["choices"][0]["text"] == llm.generate(ids, NEW, progress=False).text


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_refused_after_a_document_is_a_bad_request_not_an_internal_error(server, caplog, stream):
    caplog.set_level(logging.INFO, logger="engine")
    body = {"prompt": [1, 10**9], "document": "A short document. " * 4, "max_tokens": 2, "stream": stream}
    status, text = post(server, "/completions", body)
    assert status == 400 and "token ids must lie in" in json.loads(text)["error"]["message"]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_document_refused_leaves_the_kept_one_for_the_next_request(completions):
    document = "Alice keeps the red key and Bob the blue one. " * 10
    body = {"prompt": " Who keeps the red key?", "document": document, "max_tokens": 2, **GREEDY}
    run(completions, body).response()
    kept = completions.cache.prefix
    with pytest.raises(RequestError, match="at least 2 tokens, got 1") as refused:
        run(completions, {**body, "document": "x"}).response()  # one token
    assert refused.value.param == "document"
    again = run(completions, body).response()
    assert completions.cache.prefix is kept and again["hybridattn"][0]["kept"]["reused_tokens"] == kept.tokens


def test_a_request_whose_sampling_is_refused_fails_alone_and_its_batch_goes_on(completions, llm, prompt):
    """An error in the setup of one request of a batch, one that joins it or one taken with it, is that
    request's alone (here a seed no generator takes, past parse_request's check): the others are answered."""

    def jobs():
        good = Job(parse_request({"prompt": prompt, "max_tokens": NEW, **GREEDY}, **REQUEST))
        bad = Job(parse_request({"prompt": "Hello", "temperature": 1}, **REQUEST))
        bad.request.sampling["seed"] = 2**64
        good.ids, bad.ids = llm.encode(prompt), llm.encode("Hello")
        return good, bad

    want = llm.generate(prompt, NEW, progress=False).text
    good, bad = jobs()
    offered = [[bad]]
    completions.run_batch([good], lambda running: offered.pop() if offered else [])
    assert not offered  # it came to join
    with pytest.raises(ValueError, match="seed must be an int in"):
        bad.response()
    assert good.response()["choices"][0]["text"] == want
    good, bad = jobs()
    completions.run_batch([bad, good])  # a batch taken whole (--no-join)
    with pytest.raises(ValueError, match="seed must be an int in"):
        bad.response()
    assert good.response()["choices"][0]["text"] == want


@pytest.mark.parametrize("length", ["-1", "12x", "+5"])
def test_a_content_length_that_is_not_a_number_of_bytes_is_refused(length):
    """Not read: rfile.read(-1) reads to the end of the stream, past the body's limit."""
    from engine.server.endpoints import Handler

    handler = Handler.__new__(Handler)
    handler.headers, handler.rfile = {"Content-Length": length}, io.BytesIO(b'{"prompt": "x"}')
    with pytest.raises(RequestError, match=re.escape(f"Content-Length must be a number of bytes, got {length!r}")):
        handler._body()
    handler.headers, handler.rfile = {"Content-Length": "15"}, io.BytesIO(b'{"prompt": "x"}')
    assert handler._body() == {"prompt": "x"}


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--port", "70000"),
        ("--max-tokens", "0"),
        ("--max-batch", "0"),
        ("--prefix-dir-gb", "0"),  # (--prefix-dir is checked as the arguments are read: tests/test_cli.py)
    ],
)
def test_the_serve_command_refuses_bad_options_in_one_line(flag, value, capsys):
    assert main(["serve", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hybridattn: error:") and flag in err and "\n" not in err


def test_the_serve_command_serves_the_model_until_interrupted(llm, monkeypatch, capsys, tmp_path):
    from engine.api import HybridLLM as Engine

    closed = []
    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda cls, *a, **kw: llm))
    monkeypatch.setattr(Server, "serve_forever", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(Server, "close", lambda self: closed.append(self) or self.server_close())
    argv = ["serve", "--port", "0", "--served-name", "mine", "--prefix-dir", str(tmp_path / "kept"), "--no-join"]
    assert main([*argv, "--prefix-dir-gb", "0.5"]) == 130  # as Ctrl-C ends it
    err, url = capsys.readouterr().err, closed[0].url
    assert f"serving mine at {url}" in err and url.startswith("http://127.0.0.1:")
    folder = closed[0].completions.cache.kept.folder
    assert folder.folder == tmp_path / "kept" and folder.folder.is_dir() and folder.max_bytes == 2**29
    assert closed[0].scheduler.join is False and closed[0].scheduler.max_batch == 8


def test_the_serve_command_says_in_one_line_when_its_port_is_taken(llm, monkeypatch, capsys):
    from engine.api import HybridLLM as Engine

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda cls, *a, **kw: llm))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hybridattn: error:") and "\n" not in err


class Recording:
    """A stand-in for Completions: records what the scheduler runs, alone and in batches; the first job
    it runs waits for `gate` (the engine busy while the others queue)."""

    def __init__(self):
        self.gate, self.runs, self.done = threading.Event(), [], threading.Event()
        self.started = []  # each batch's jobs when it started

    def batchable(self, job):
        return job.request != "alone"

    def joinable(self, job):
        return self.batchable(job)

    def alone(self, job):  # a request alone keeps its prompt for the next (the server's default)
        return True

    def run_alone(self, job):
        if not self.runs:
            self.gate.wait(30)
        self.runs.append([job.request])
        job.send("response", {})

    def run_batch(self, jobs, more=None):  # takes every job that joins, none ending
        self.started.append(len(jobs))
        while more is not None and (new := more(len(jobs))):
            jobs = jobs + new
        self.runs.append([job.request for job in jobs])
        for job in jobs:
            job.send("response", {})


class Joining(Recording):
    """A Recording whose first batch, once `joins` is set, asks for jobs to join it as it grows to 3
    sequences, then as if two had ended."""

    def __init__(self):
        super().__init__()
        self.joins, self.asked = threading.Event(), threading.Event()

    def run_batch(self, jobs, more):
        if len(self.runs) > 1:
            return super().run_batch(jobs, more)
        self.asked.set()
        self.joins.wait(30)
        names = [job.request for job in jobs]
        for running in (1, 2, 3, 1, 2):
            new = more(running)
            jobs = jobs + new
            names.append([job.request for job in new])
        self.runs.append(names)
        for job in jobs:
            job.send("response", {})


@pytest.mark.parametrize("join", [True, False])
def test_requests_that_wait_together_run_in_batches_in_their_order(join):
    completions = Recording()
    scheduler = Scheduler(completions, max_batch=3, join=join)
    jobs = [scheduler.submit("busy")]
    while not completions.gate.is_set() and scheduler._waiting:  # the first taken: the engine busy with it
        time.sleep(0.01)
    jobs += [scheduler.submit(name) for name in ("a", "alone", "b", "c", "d", "e")]
    completions.gate.set()
    for job in jobs:
        assert job.response() == {}
    scheduler.close()
    # the plain ones batch, up to 3, in order; the one that must run alone waits its turn after the first batch
    assert completions.runs == [["busy"], ["a", "b", "c"], ["alone"], ["d", "e"]]
    assert completions.started == ([1, 1] if join else [3, 2])  # joining, the others come one a step
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit("late")
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(completions, max_batch=0)
    with pytest.raises(ValueError, match="join must be True or False"):
        Scheduler(completions, join="no")


def test_requests_that_come_while_a_batch_runs_join_it_in_their_order():
    completions = Joining()
    scheduler = Scheduler(completions, max_batch=3)
    jobs = [scheduler.submit("busy")]
    while not completions.gate.is_set() and scheduler._waiting:
        time.sleep(0.01)
    jobs += [scheduler.submit(name) for name in ("a", "b")]
    completions.gate.set()
    assert completions.asked.wait(30)  # the batch [a b] runs
    jobs += [scheduler.submit(name) for name in ("c", "d", "alone", "e")]
    completions.joins.set()
    for job in jobs:
        assert job.response() == {}
    scheduler.close()
    # one job a step: b (taken with a), c; none while 3 decode; d once there is room; "alone" may not join,
    # and e waits behind it
    assert completions.runs == [["busy"], ["a", ["b"], ["c"], [], ["d"], []], ["alone"], ["e"]]


def test_a_request_alone_that_keeps_nothing_starts_a_batch_that_others_join():
    class Keeping(Recording):
        def alone(self, job):  # without reuse_prompts: nothing to keep
            return job.request == "alone"

    completions = Keeping()
    scheduler = Scheduler(completions, max_batch=3)
    jobs = [scheduler.submit("first")]
    for job in jobs:
        assert job.response() == {}
    jobs = [scheduler.submit("alone")]
    assert jobs[0].response() == {}
    scheduler.close()
    assert completions.runs == [["first"], ["alone"]] and completions.started == [1]  # "first" ran as a batch


def test_jobs_taken_with_a_batch_that_ended_before_they_joined_run_next():
    class Ending(Recording):
        def run_batch(self, jobs, more):  # ends at once, asking for none
            self.runs.append(["batch"] + [job.request for job in jobs])
            for job in jobs:
                job.send("response", {})

    completions = Ending()
    scheduler = Scheduler(completions, max_batch=3)
    jobs = [scheduler.submit("busy")]
    while not completions.gate.is_set() and scheduler._waiting:
        time.sleep(0.01)
    jobs += [scheduler.submit(name) for name in ("a", "b", "c")]
    completions.gate.set()
    for job in jobs:
        assert job.response() == {}
    scheduler.close()
    assert completions.runs == [["busy"], ["batch", "a"], ["batch", "b"], ["c"]]


def test_closing_the_scheduler_ends_the_generation_under_way():
    started = threading.Event()

    class Endless:
        def batchable(self, job):
            return True

        joinable = batchable

        def alone(self, job):
            return True

        def run_alone(self, job):  # runs until its client leaves
            started.set()
            assert job.gone.wait(30)
            job.send("response", {"ended": True})

    scheduler = Scheduler(Endless(), max_batch=2)
    running = scheduler.submit("long")
    assert started.wait(30)
    waiting = scheduler.submit("next")
    scheduler.close()
    assert running.response() == {"ended": True}
    with pytest.raises(RuntimeError, match="closed before this request ran"):
        waiting.response()


def test_a_job_whose_stream_is_closed_tells_the_engine_its_client_left():
    job = Job("request")
    job.send("chunk", {"n": 1})
    chunks = job.chunks()
    assert next(chunks) == {"n": 1} and not job.gone.is_set()
    chunks.close()
    assert job.gone.is_set()


@pytest.fixture
def held(llm, monkeypatch):
    """A server whose engine thread holds the first request it runs alone (one of several prompts: none
    joins it) until `release()`: the requests sent meanwhile wait together. Yields (server, release)."""
    with running(Server(llm, port=0, model="tiny", chat_max_tokens=NEW, max_batch=4)) as server:
        gate, run_alone = threading.Event(), server.completions.run_alone

        def held_alone(job):
            gate.wait(60)
            run_alone(job)

        monkeypatch.setattr(server.completions, "run_alone", held_alone)

        def release(waiting: int):
            deadline = time.monotonic() + 60
            while len(server.scheduler._waiting) < waiting and time.monotonic() < deadline:
                time.sleep(0.02)
            monkeypatch.setattr(server.completions, "run_alone", run_alone)
            gate.set()

        yield server, release


def wait_to_join(scheduler, monkeypatch, asking: threading.Event | None = None) -> list[int]:
    """The scheduler's batch, the first time it asks for a job to join once those taken with it have joined
    (setting `asking`), waits for another request to come; returns the running counts it asked with."""
    joining, asked = scheduler._joining, []

    def held_joining(running, admitted):
        if not admitted:
            if asking is not None:
                asking.set()
            deadline = time.monotonic() + 60
            while not asked and not scheduler._waiting and time.monotonic() < deadline:
                time.sleep(0.01)
            asked.append(running)
        return joining(running, admitted=admitted)

    monkeypatch.setattr(scheduler, "_joining", held_joining)
    return asked


def test_requests_that_wait_together_are_each_answered_as_alone(held, llm):
    server, release = held
    words = "The grass is green and the sky is blue. ".split()
    prompts = [" ".join(words[i:] * 12) for i in range(3)]
    bodies = [
        ("/completions", {"prompt": prompts[0], "max_tokens": NEW, **GREEDY}),
        ("/completions", {"prompt": prompts[1], "max_tokens": 5, "temperature": 0.8, "seed": 4}),
        ("/chat/completions", {"messages": [{"role": "user", "content": prompts[2]}], "seed": 2, "top_k": 3}),
    ]
    bodies[2][1]["stream_options"] = {"include_usage": True}  # streamed
    got = [None] * (len(bodies) + 1)

    def ask(i, path, body):
        got[i] = events(server, path, body) if "stream_options" in body else answer(server, path, body)

    first = threading.Thread(target=ask, args=(3, "/completions", {"prompt": ["x y z", "a b"], "max_tokens": 2}))
    first.start()  # the engine holds it while the others come
    deadline = time.monotonic() + 60
    while not server.scheduler._running and time.monotonic() < deadline:
        time.sleep(0.01)
    threads = [threading.Thread(target=ask, args=(i, *b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    release(waiting=len(bodies))
    for t in [first, *threads]:
        t.join(timeout=120)
    for (_, body), response in zip(bodies[:2], got):
        sampling = {k: body[k] for k in ("temperature", "seed") if k in body}
        want = llm.generate(body["prompt"], body["max_tokens"], progress=False, **sampling)
        assert response["choices"][0]["text"] == want.text
        assert response["hybridattn"][0]["batch"] == 3
        assert response["usage"]["completion_tokens"] == want.report.new_tokens
    chunks, messages = got[2][:-1], bodies[2][1]["messages"]
    want = llm.generate(messages, NEW, temperature=1.0, seed=2, top_k=3, progress=False)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1]) == want.text
    assert chunks[-1]["hybridattn"][0]["batch"] == 3 and chunks[-1]["usage"]["completion_tokens"] == NEW
    assert got[3]["choices"][0]["finish_reason"] == "length"  # the one before, alone


def test_a_request_that_comes_while_a_batch_runs_joins_it_and_is_answered_as_alone(held, llm, monkeypatch):
    server, release = held
    both = threading.Event()  # with the two decoding, the batch waits for the third request
    asked = wait_to_join(server.scheduler, monkeypatch, both)
    words = "The grass is green and the sky is blue. ".split()
    bodies = [{"prompt": " ".join(words[i:] * 10), "max_tokens": NEW - i, **GREEDY} for i in range(3)]
    bodies[2] |= {"temperature": 0.8, "seed": 5}
    got = [None] * 4

    def ask(i, body):
        got[i] = answer(server, "/completions", body)

    first = threading.Thread(target=ask, args=(3, {"prompt": ["x y z", "a b"], "max_tokens": 2}))
    first.start()
    deadline = time.monotonic() + 60
    while not server.scheduler._running and time.monotonic() < deadline:
        time.sleep(0.01)
    batched = [threading.Thread(target=ask, args=(i, bodies[i])) for i in range(2)]
    for t in batched:
        t.start()
    release(waiting=2)
    assert both.wait(60)  # the batch of two runs
    late = threading.Thread(target=ask, args=(2, bodies[2]))
    late.start()
    for t in [first, *batched, late]:
        t.join(timeout=120)
    assert asked[:2] == [2, 3]  # the third joined at a step of the batch of two
    for body, response in zip(bodies, got):
        sampling = {k: body[k] for k in ("temperature", "seed") if k in body}
        want = llm.generate(body["prompt"], body["max_tokens"], progress=False, **sampling)
        assert response["choices"][0]["text"] == want.text
        assert response["usage"]["completion_tokens"] == want.report.new_tokens
        assert response["hybridattn"][0]["batch"] == 3


def first_then_joining(scheduler, first: Callable[[], object], joining: Callable[[], object]) -> list:
    """`first()` asked on a thread of its own, then, once the engine runs it, `joining()` on another: their answers."""
    got = [None, None]
    asks = [
        threading.Thread(target=lambda i=i, ask=ask: got.__setitem__(i, ask()))
        for i, ask in enumerate((first, joining))
    ]
    asks[0].start()
    while not scheduler._running:
        time.sleep(0.01)
    asks[1].start()
    for ask in asks:
        ask.join(timeout=120)
    return got


def test_others_join_a_request_that_keeps_its_prompt_and_the_next_turn_still_finds_it(llm, monkeypatch):
    """With prompts kept (the default), a conversation's turn starts a batch that another client's request
    joins; each is answered as alone, and the conversation's next turn still continues the kept cache."""
    with running(Server(llm, port=0, model="tiny", chat_max_tokens=NEW)) as server:
        scheduler = server.scheduler
        wait_to_join(scheduler, monkeypatch)  # the turn's batch waits at its first step for the other request
        turns = [{"role": "user", "content": "The grass is green and the sky is blue. " * 20 + "What is green?"}]
        other = {"prompt": "A prompt of another client entirely", "max_tokens": NEW - 4, "temperature": 0.8, "seed": 3}
        chat = {"messages": turns, **GREEDY}
        turn, other_answer = first_then_joining(
            scheduler, lambda: answer(server, "/chat/completions", chat), lambda: answer(server, "/completions", other)
        )
        got = {"turn": turn, "other": other_answer}
        assert [got[k]["hybridattn"][0]["batch"] for k in ("turn", "other")] == [2, 2]  # decoded together
        told = [got[k]["hybridattn"][0] for k in ("turn", "other")]
        assert told[0]["kept"]["reused_tokens"] == 0 and "kept" not in told[1]
        assert got["turn"]["choices"][0]["message"]["content"] == llm.generate(turns, NEW, progress=False).text
        want = llm.generate(other["prompt"], NEW - 4, temperature=0.8, seed=3, progress=False).text
        assert got["other"]["choices"][0]["text"] == want
        turns += [got["turn"]["choices"][0]["message"], {"role": "user", "content": "And what is blue?"}]
        second = answer(server, "/chat/completions", {"messages": turns, **GREEDY})
        assert second["hybridattn"][0]["kept"]["reused_tokens"] == len(llm.encode(turns[:1])[0]) - 1
        assert second["choices"][0]["message"]["content"] == llm.generate(turns, NEW, progress=False).text


def test_a_request_whose_prefill_fails_as_it_joins_hears_why_and_the_batch_goes_on(llm, monkeypatch, caplog):
    """The joining request's prefill runs out of memory: it is answered with the error (500), the request it
    joined with what it gets alone, and the server serves the next request."""

    def out_of_memory(self, whole=False):
        raise torch.OutOfMemoryError("no room for this prompt")

    monkeypatch.setattr(SteppedPrefill, "step", out_of_memory)  # the prefill of a prompt that joins a batch
    with running(Server(llm, port=0, model="tiny", reuse_prompts=False)) as server:
        scheduler = server.scheduler
        wait_to_join(scheduler, monkeypatch)
        first = {"prompt": "The grass is green and the sky is blue. " * 10, "max_tokens": NEW, **GREEDY}
        answered, joined = first_then_joining(
            scheduler,
            lambda: post(server, "/completions", first),
            lambda: post(server, "/completions", {"prompt": "B"}),
        )
        got = {"first": answered, "joining": joined}
        assert got["joining"][0] == 500 and "OutOfMemoryError: no room for this prompt" in got["joining"][1]
        assert got["first"][0] == 200
        want = llm.generate(first["prompt"], NEW, progress=False).text
        assert json.loads(got["first"][1])["choices"][0]["text"] == want
        assert "failed in its prefill" in caplog.text
        assert answer(server, "/completions", {"prompt": "And then", "max_tokens": 2})["choices"]


def test_a_batch_whose_first_request_fails_runs_those_taken_with_it_next(monkeypatch):
    """The requests taken to join a batch whose first one fails before they joined did not fail: they go back
    to the front of the queue and run next; the first hears its error."""
    ran = []

    class FirstFails:
        def alone(self, job):
            return False

        def batchable(self, job):  # every request batches with every other
            return True

        joinable = batchable

        def run_batch(self, jobs, more=None):
            ran.append([job.request for job in jobs])
            if jobs[0].request == "bad":
                raise torch.OutOfMemoryError("no room for this prompt")
            for job in jobs:
                job.send("response", {"text": job.request})

    scheduler = Scheduler(FirstFails(), max_batch=4)
    with scheduler._ready:  # queued together: taken as one batch
        bad, good = scheduler.submit("bad"), scheduler.submit("good")
    with pytest.raises(torch.OutOfMemoryError):
        bad.response()
    assert good.response() == {"text": "good"} and ran == [["bad"], ["good"]]
    scheduler.close()


def test_requests_taken_out_of_the_queue_as_the_server_closes_hear_that_it_closed():
    """close() comes while the engine's thread asks which waiting requests batch together (encoding their
    prompts, outside the queue's lock): none of them is run, and each hears why rather than waiting forever."""
    asked, go_on = threading.Event(), threading.Event()

    class SlowToBatch:
        def batchable(self, job):
            asked.set()
            go_on.wait(timeout=60)
            return job.request != "alone"

        joinable = batchable

        def run_batch(self, jobs, more=None):
            for job in jobs:
                job.send("response", {"text": job.request})

    scheduler = Scheduler(SlowToBatch(), max_batch=4)
    with scheduler._ready:
        jobs = [scheduler.submit(name) for name in ("a", "alone", "b")]
    assert asked.wait(timeout=60)
    closing = threading.Thread(target=scheduler.close)
    closing.start()
    while not scheduler._closed:
        time.sleep(0.01)
    go_on.set()
    closing.join(timeout=60)
    for job in jobs:
        with pytest.raises(RuntimeError, match="the server closed before this request ran"):
            job.response(connected=lambda: True)


def test_a_request_whose_prefill_fails_in_a_batch_taken_whole_fails_alone(completions, llm, prompt, monkeypatch):
    """Without joining (--no-join) a batch's prompts are prefilled one by one: the one whose prefill runs out
    of memory hears why, the others are answered as alone."""
    import engine.batch_run

    prefill = engine.batch_run.prefill_prompt

    def out_of_memory_for_hello(model, ids, *args, **kwargs):
        if torch.equal(ids, llm.encode("Hello")):
            raise torch.OutOfMemoryError("no room for this prompt")
        return prefill(model, ids, *args, **kwargs)

    monkeypatch.setattr(engine.batch_run, "prefill_prompt", out_of_memory_for_hello)
    good, bad = (Job(parse_request({"prompt": p, "max_tokens": NEW, **GREEDY}, **REQUEST)) for p in (prompt, "Hello"))
    good.ids, bad.ids = llm.encode(prompt), llm.encode("Hello")
    completions.run_batch([bad, good])
    with pytest.raises(torch.OutOfMemoryError, match="no room for this prompt"):
        bad.response()
    assert good.response()["choices"][0]["text"] == llm.generate(prompt, NEW, progress=False).text


def test_the_next_turn_of_the_kept_conversation_is_not_batched(server, prompt):
    answer(server, "/completions", {"prompt": prompt, "max_tokens": 2, **GREEDY})  # kept
    completions = server.completions
    assert not completions.batchable(Job(parse_request({"prompt": prompt + " And"}, **REQUEST)))
    assert completions.batchable(Job(parse_request({"prompt": "Another prompt entirely"}, **REQUEST)))
    assert not completions.batchable(Job(parse_request({"prompt": "Q", "document": prompt}, **REQUEST)))
    assert not completions.batchable(Job(parse_request({"prompt": ["a b", "c d"]}, **REQUEST)))
    assert completions.joinable(Job(parse_request({"prompt": "Another prompt entirely"}, **REQUEST)))
    assert not completions.joinable(Job(parse_request({"prompt": "Another prompt", "max_tokens": 0}, **REQUEST)))
    assert not completions.joinable(Job(parse_request({"prompt": prompt + " And"}, **REQUEST)))
    assert not completions.alone(Job(parse_request({"prompt": "Another prompt entirely"}, **REQUEST)))  # a batch
    assert not completions.alone(Job(parse_request({"prompt": prompt + " And"}, **REQUEST)))  # from the kept cache
    assert completions.alone(Job(parse_request({"prompt": ["a b", "c d"]}, **REQUEST)))  # their own batch


def test_ignore_eos_runs_an_answer_to_its_max_tokens(server):
    assert parse_request({"prompt": "x", "ignore_eos": True}, **REQUEST).sampling["stop_at_eos"] is False
    assert parse_request({"prompt": "x"}, **REQUEST).sampling["stop_at_eos"] is True
    status, text = post(server, "/completions", {"prompt": "x y", "ignore_eos": "yes"})
    assert status == 400 and json.loads(text)["error"]["param"] == "ignore_eos"
