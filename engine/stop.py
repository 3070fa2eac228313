"""Stop strings: a sequence ends where its answer's text comes to contain one of them (as it ends at
an end-of-sequence token), and its text is cut just before the first; a stop string that is one special
token, where the answer has that token."""

from __future__ import annotations


def stop_list(strings: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The stop strings a user gives (none, one, or a list or tuple of them) as a list, each checked."""
    if strings is None:
        return []
    if isinstance(strings, str):
        strings = [strings]
    if not isinstance(strings, (list, tuple)):  # 0 or False read as "none" before
        raise ValueError(f"stop must be a string or a list of strings, got {strings!r}")
    for s in strings:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        if not is_text(s):  # the tokenizer would refuse it mid-generation, ending a whole batch
            raise ValueError(f"stop strings must be Unicode text, got {s!r} (a lone surrogate)")
    return list(strings)


def is_text(s: str) -> bool:
    """Whether a str is Unicode text: JSON's escapes and Python's str also hold lone surrogates, which
    no encoding (and no tokenizer) takes."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class StopStrings:
    """The stop strings of one generation and the tokenizer that turns tokens into text.

    Each new token is checked against the end of the answer only (`reached`): the text of its
    last tokens, enough to hold the longest stop string however the tokenizer splits it, so a
    check costs the same at the thousandth token as at the first."""

    def __init__(self, tokenizer, strings: str | list[str] | tuple[str, ...] | None):
        strings = stop_list(strings)
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
    they may begin a stop string, held back until the next tokens tell.

    A token costs the same at the thousandth as at the first: the text grows by what the tokens since the
    last growth decode to, decoded from the token before them and less what that one decodes to (so that a
    tokenizer that drops a text's leading space drops it from both), and a stop string is looked for only
    where the new text could have completed it."""

    def __init__(self, stops: StopStrings):
        self.stops, self.tokens = stops, []
        self.text = ""  # the answer's text so far, without half a character at its end
        self.shown = 0  # how much of it was shown
        self._start = self._read = 0  # the text of tokens[_start:_read] is the end of `text`
        self._ended = False
        self._longest = max(map(len, stops.strings), default=0)

    def add(self, token: int) -> str:
        """The text the answer's new token shows (maybe none yet)."""
        self.tokens.append(token)
        added = 0 if self._ended else self._grow(whole=False)
        if not added:  # half a multi-byte character, a token without text, or the answer ended
            return ""
        begin = max(0, len(self.text) - added - self._longest)  # where a string completed now may begin
        cut = begin + len(self.stops.cut(self.text[begin:]))
        if cut < len(self.text):  # a stop string completed (the answer ends here): the text before it
            self._ended = True
            return self._show(cut)
        return self._show(len(self.text) - self.stops.held(self.text[max(0, len(self.text) - self._longest) :]))

    def finish(self) -> str:
        """What was held back when the answer ended without completing a stop string."""
        if not self._ended:
            self._grow(whole=True)
            self._ended = True
            return self._show(len(self.stops.cut(self.text)))
        return ""

    def _grow(self, whole: bool) -> int:
        """How many characters the tokens since the last growth add to `text` (added to it): none where they
        end in half a character (unless `whole`, at the answer's end)."""
        before = self.stops.text(self.tokens[self._start : self._read])
        after = self.stops.text(self.tokens[self._start :])
        if after.endswith("\ufffd") and not whole:
            return 0
        self._start, self._read = self._read, len(self.tokens)
        if not after.startswith(before):  # a tokenizer that rewrites earlier text: the whole decoded again
            self.text = self.stops.text(self.tokens)
            return max(0, len(self.text) - self.shown)
        self.text += after[len(before) :]
        return len(after) - len(before)

    def _show(self, end: int) -> str:
        """The text from what was shown up to `end` (none where that was shown already)."""
        if end <= self.shown:
            return ""
        piece, self.shown = self.text[self.shown : end], end
        return piece
