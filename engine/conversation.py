"""`Conversation`: a chat with the engine whose turns each prefill only what is new to them
(`HybridLLM.conversation`). The messages so far stay prefilled in a kept cache (engine.prefix.KeptCache);
each turn's prompt, the chat template over every message, begins with the turn before's, so the
cache is extended by the answer before it and the new message alone, and a long document in the
first message is prefilled once for the whole conversation. `save` writes the messages and their cache
to a file (engine.prefix_file) that `Conversation.load` resumes, in this process or a later one,
without prefilling them again."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

from engine.prefix import KeptCache, Prefix
from engine.prefix_file import saved_extra
from engine.sampling import Sampling

SAVED_AS = "conversation"  # the key of the messages in a saved prefix file's extra metadata


SAMPLING_FIELDS = {f.name for f in dataclasses.fields(Sampling)}


def _check_answer(max_new_tokens, kwargs: dict) -> None:
    """A turn's generation arguments, checked (as a `Sampling` checks them) before its prefill: after it, a
    bad one cost the prefill."""
    Sampling(max_new_tokens, **{k: v for k, v in kwargs.items() if k in SAMPLING_FIELDS})


class Conversation:
    """The messages so far (`messages`, chat messages with string role and content) and their cache.
    `ask` and `stream` add a user message and the assistant's answer; a turn that fails (an error raised)
    adds neither, so that the question may be asked again. `close()` gives the cache's host store back (the
    conversation can go on after it, prefilling its messages again)."""

    def __init__(self, llm, messages: list[dict] | None = None):
        self.llm, self.messages = llm, list(messages or [])
        self.kept = KeptCache(llm)
        self.found_kept = 0  # of the last turn's prompt, the tokens found in the cache (not prefilled again)

    def ask(self, content: str, max_new_tokens: int = 256, **kwargs):
        """The answer to `content` as the next user message (a GenerationResult; the keywords are
        `HybridLLM.generate_batch`'s but `prefix`)."""
        _check_answer(max_new_tokens, kwargs)
        messages, prompt, prefix = self._turn(content)
        result = self.llm.generate(prompt, max_new_tokens, prefix=prefix, **kwargs)
        self.messages = [*messages, {"role": "assistant", "content": result.text}]
        return result

    def stream(self, content: str, max_new_tokens: int = 256, **kwargs) -> Iterator[str]:
        """`ask`, the answer's text piece by piece (`HybridLLM.stream`'s keywords, `report=` among them).
        Stopped early (closed, or interrupted), the conversation keeps what was shown as the answer."""
        _check_answer(max_new_tokens, kwargs)
        messages, prompt, prefix = self._turn(content)
        shown: list[str] = []
        failed = False
        try:
            for piece in self.llm.stream(prompt, max_new_tokens, prefix=prefix, **kwargs):
                shown.append(piece)
                yield piece
        except Exception:  # failed: the conversation as it was
            failed = True
            raise
        finally:  # answered, or stopped (closed, interrupted): what was shown is its answer
            if not failed:
                self.messages = [*messages, {"role": "assistant", "content": "".join(shown)}]

    def save(self, path, *, progress: bool = True) -> int:
        """The messages so far and their kept cache written to the file `path` (a prefix file, the messages
        beside it), for `Conversation.load`; returns the bytes written."""
        if self.kept.prefix is None:
            raise ValueError("this conversation keeps no cache to save yet: save it after a turn")
        return self.kept.prefix.save(path, extra={SAVED_AS: json.dumps(self.messages)}, progress=progress)

    @classmethod
    def load(cls, llm, path, *, progress: bool = True) -> Conversation:
        """The conversation saved at `path` (`save`), for `llm` (the model and configuration it was saved
        with): its messages, and their cache loaded rather than prefilled, ready for the next turn."""
        extra = saved_extra(path)
        if SAVED_AS not in extra:
            raise ValueError(f"{path} holds a prefix, not a conversation: load it with HybridLLM.load_prefix")
        try:
            messages = json.loads(extra[SAVED_AS])
            if not isinstance(messages, list):
                raise ValueError("not a list of messages")
            chat = llm.conversation(messages)  # the messages checked as a user's are
        except ValueError as error:  # (json's errors are ValueErrors too)
            raise ValueError(f"{path} holds damaged messages: {error}") from None
        chat.kept.keep(Prefix.load(llm, path, progress=progress))
        return chat

    @property
    def kept_tokens(self) -> int:
        """The tokens of the conversation its cache holds, ready for the next turn."""
        return self.kept.prefix.tokens if self.kept.prefix is not None else 0

    def close(self) -> None:
        self.kept.release()

    def _turn(self, content: str):
        """The messages with the new one (kept once the turn is answered), what is left to prefill, and the
        kept Prefix it continues (or None)."""
        if not isinstance(content, str) or not content:
            raise ValueError(f"a message is a non-empty string, got {content!r}")
        messages = [*self.messages, {"role": "user", "content": content}]
        ids = self.llm.encode(messages)
        continued = self.kept.prompt(ids)
        if continued is None:  # too short to keep
            self.found_kept = 0
            return messages, ids, None
        rest, prefix, self.found_kept = continued
        return messages, rest, prefix
