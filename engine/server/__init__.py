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
the first request prefills and the requests after it that name the same find kept.

The package's parts: `request` (a request's JSON body, checked), `completions` (requests to the engine's
answers, and the cache kept between them) and `endpoints` (HTTP: the handler and the `Server`)."""

from engine.server.completions import Completions, PromptCache
from engine.server.endpoints import Handler, Server
from engine.server.request import Request, RequestError, parse_request

__all__ = ["Completions", "Handler", "PromptCache", "Request", "RequestError", "Server", "parse_request"]
