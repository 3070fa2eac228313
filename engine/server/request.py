"""A completion or chat completion request's JSON body, checked field by field (`parse_request`): what
the engine cannot do is refused with a RequestError that names the field; fields it does not know are
ignored, as clients send many."""

from __future__ import annotations

import math
import secrets
import sys
from dataclasses import dataclass, field

from engine.api import _token_id_list
from engine.sampling import SEEDS
from engine.stop import StopStrings, is_text

COMPLETION_MAX_TOKENS = 16  # a completion's max_tokens when the request gives none, as OpenAI's API has it
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
        value = body.get(name)
        # of the same kind too: true is not n's 1, nor 0 echo's false
        if value is not None and not any(
            value == v and isinstance(value, bool) == isinstance(v, bool) for v in nothing
        ):
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
        if request.document is not None and not is_text(request.document):
            raise RequestError("document must be Unicode text: it holds a lone surrogate", "document")
        if request.document is not None and len(request.prompts) > 1:
            raise RequestError("document is continued by one prompt: send a request for each prompt", "document")
        request.max_tokens = _integer(body, "max_tokens", COMPLETION_MAX_TOKENS)
    seed = _integer(body, "seed", None, low=SEEDS.start, high=SEEDS.stop - 1)
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
    try:
        request.include_usage = _boolean(options, "include_usage")
    except RequestError as error:
        raise RequestError(f"stream_options.{error}", "stream_options") from None
    return request


def _integer(body: dict, name: str, default, *, low: int = 0, high: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    top = math.inf if high is None else high
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= top:
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(f"{name} must be an integer {bounds}, got {value!r}", name)
    return value


def _number(body: dict, name: str, default: float, *, low: float, high: float | None) -> float:
    value = body.get(name)
    if value is None:
        return default
    top = sys.float_info.max if high is None else high  # JSON's Infinity, and an int no float holds, are refused
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= top:
        what = f"a finite number >= {low}" if high is None else f"a number in [{low}, {high}]"
        raise RequestError(f"{name} must be {what}, got {value!r}", name)
    return float(value)


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise RequestError(f"{name} must be true or false, got {value!r}", name)
    return bool(value)


def _stop(value) -> list[str]:
    if value is not None and not isinstance(value, (str, list)):
        raise RequestError(f"stop must be a string or a list of strings, got {value!r}", "stop")
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
