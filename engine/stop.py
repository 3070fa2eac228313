"""Stop strings: a sequence ends where its answer's text comes to contain one of them (as it ends at
an end-of-sequence token), and its text is cut just before the first; a stop string that is one special
token, where the answer has that token."""

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
        # a string that is one special token ("<|im_end|>", say) never shows in the text, which leaves
        # special tokens out: the answer stops at that token instead
        self.token_ids = set()
        for s in strings if tokenizer is not None else ():
            ids = tokenizer.encode(s, add_special_tokens=False)
            if len(ids) == 1 and not self.text(ids):
                self.token_ids.add(ids[0])
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
        if tokens and tokens[-1] in self.token_ids:
            return True
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


class TextStream:
    """One answer's text as its tokens come, in the pieces a stream shows (`add`, then `finish` at its
    end): cut before the first stop string; half a multi-byte character, and the last characters where
    they may begin a stop string, held back until the next tokens tell."""

    def __init__(self, stops: StopStrings):
        self.stops, self.tokens, self.shown = stops, [], ""

    def add(self, token: int) -> str:
        """The text the answer's new token shows (maybe none yet)."""
        self.tokens.append(token)
        text = self.stops.text(self.tokens)
        cut = self.stops.cut(text)
        if cut != text:  # a stop string completed (the answer ends here): the text before it
            text = cut
        elif text.endswith("\ufffd"):  # half a multi-byte character
            return ""
        else:
            text = text[: len(text) - self.stops.held(text)]
        return self._show(text)

    def finish(self) -> str:
        """What was held back when the answer ended without completing a stop string."""
        return self._show(self.stops.cut(self.stops.text(self.tokens)))

    def _show(self, text: str) -> str:
        piece = text[len(self.shown) :]
        if len(text) <= len(self.shown):
            return ""
        self.shown = text
        return piece
