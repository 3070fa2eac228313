"""`Conversation`: a chat with the engine whose turns each prefill only what is new to them
(`HybridLLM.conversation`). The messages so far stay prefilled in a kept cache (engine.prefix.KeptCache);
each turn's prompt, the chat template over every message, begins with the turn before's, so the
cache is extended by the answer before it and the new message alone, and a long document in the
first message is prefilled once for the whole conversation."""

from __future__ import annotations

from collections.abc import Iterator

from engine.prefix import KeptCache


class Conversation:
    """The messages so far (`messages`, chat messages with string role and content) and their cache.
    `ask` and `stream` add a user message and the assistant's answer; `close()` gives the cache's host
    store back (the conversation can go on after it, prefilling its messages again)."""

    def __init__(self, llm, messages: list[dict] | None = None):
        self.llm, self.messages = llm, list(messages or [])
        self.kept = KeptCache(llm)
        self.found_kept = 0  # of the last turn's prompt, the tokens found in the cache (not prefilled again)

    def ask(self, content: str, max_new_tokens: int = 256, **kwargs):
        """The answer to `content` as the next user message (a GenerationResult; the keywords are
        `HybridLLM.generate_batch`'s but `prefix`)."""
        prompt, prefix = self._turn(content)
        result = self.llm.generate(prompt, max_new_tokens, prefix=prefix, **kwargs)
        self.messages.append({"role": "assistant", "content": result.text})
        return result

    def stream(self, content: str, max_new_tokens: int = 256, **kwargs) -> Iterator[str]:
        """`ask`, the answer's text piece by piece (`HybridLLM.stream`'s keywords, `report=` among them).
        Stopped early, the conversation keeps what was shown as the answer."""
        prompt, prefix = self._turn(content)
        shown: list[str] = []
        try:
            for piece in self.llm.stream(prompt, max_new_tokens, prefix=prefix, **kwargs):
                shown.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(shown)})

    @property
    def kept_tokens(self) -> int:
        """The tokens of the conversation its cache holds, ready for the next turn."""
        return self.kept.prefix.tokens if self.kept.prefix is not None else 0

    def close(self) -> None:
        self.kept.release()

    def _turn(self, content: str):
        """The new message added: what is left to prefill, and the kept Prefix it continues (or None)."""
        if not isinstance(content, str) or not content:
            raise ValueError(f"a message is a non-empty string, got {content!r}")
        messages = [*self.messages, {"role": "user", "content": content}]
        ids = self.llm.encode(messages)
        continued = self.kept.prompt(ids)
        self.messages = messages
        if continued is None:  # too short to keep
            self.found_kept = 0
            return ids, None
        rest, prefix, self.found_kept = continued
        return rest, prefix
