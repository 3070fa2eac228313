"""Stop strings: a sequence ends where its answer's text comes to contain one of them (as it ends at
an end-of-sequence token), and its text is cut just before the first."""

from __future__ import annotations


class StopStrings:
    """The stop strings of one generation and the tokenizer that turns tokens into text.

    Each new token is checked against the end of the answer only (`reached`): the text of its
    last tokens, enough to hold the longest stop string however the tokenizer splits it, so a
    check costs the same at the thousandth token as at the first."""

    def __init__(self, tokenizer, strings: str | list[str] | tuple[str, ...] | None):
        strings = [strings] if isinstance(strings, str) else list(strings or [])
        for s in strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.tokenizer, self.strings = tokenizer, strings
        # a token holds at least one byte of text and a character at most four, so the longest string
        # lies within its length x 4 last tokens; a few more absorb the first one's cut character
        self.tail_tokens = 4 * max(map(len, strings), default=0) + 8

    def __bool__(self) -> bool:
        return bool(self.strings)

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def reached(self, tokens: list[int]) -> bool:
        """Whether the answer `tokens` ends with one of the strings complete (checked after each token,
        this is where the first one appears)."""
        if not self.strings:
            return False
        tail = self.text(tokens[-self.tail_tokens :])
        return any(s in tail for s in self.strings)

    def cut(self, text: str) -> str:
        """text up to the first place any of the strings begins (all of it where none occurs)."""
        ends = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return text[: min(ends)] if ends else text

    def held(self, text: str) -> int:
        """How many of text's last characters could begin a stop string the next tokens complete: a
        stream holds them back until it knows."""
        return max((n for s in self.strings for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
