"""`Prefix`: the beginning of several prompts (a long document) prefilled once, its host indexes built,
which each prompt then continues (`HybridLLM.generate(prompt, prefix=...)`).

A continuation runs from the state the document left: its tokens are prefilled after the document's
(exactly, in chunks), its answer decoded, and then the cache goes back to that state
(`HybridCache.rewind`): the host store keeps the document's rows only, the block summaries and the
key index drop what the continuation added, the resident set is the document's again. The next
prompt finds what the first found, as if the document had just been prefilled.

The document's last token is held back and prefilled with each continuation: a continuation is then
at least two tokens, a prefill chunk, which attends exactly; one token alone would be a decode step,
which reads part of the host store."""

from __future__ import annotations

import torch

from engine.prefill import Prefilled, PrefillLeft, timed_prefill
from engine.prefix_file import load_prefix, save_prefix


class Prefix:
    """A document prefilled into its own cache (`HybridLLM.prefix`, or loaded from a file: `HybridLLM.load_prefix`),
    continued by one prompt at a time. `ids`: the document's token ids [1, tokens] (on the host), all but the
    last in the cache; `prefill_s`, `index_build_s`: what its prefill took. It holds its host store until
    `release()`; `save(path)` writes it to a file."""

    def __init__(self, model, prefilled: Prefilled, ids: torch.Tensor):
        if ids.shape != (1, prefilled.prompt_tokens + 1):
            raise ValueError(f"a prefix of {prefilled.prompt_tokens} cached tokens takes their ids and the next one")
        self.model, self.cache, self.ids = model, prefilled.cache, ids.cpu()
        self.prefill_s, self.index_build_s = prefilled.prefill_s, prefilled.index_build_s
        self.marks = self.cache.mark()
        self.layers = list(self.cache.layers)  # its sequence's, which prompts that join a continuation share
        self.in_use = False

    def continued(self, ids: torch.Tensor, *, progress: bool = True, leave=None) -> Prefilled:
        """The prompt ids [1, T] prefilled after the document, into the prefix's cache; `rewind` after its
        generation. `leave()`, asked as it prefills, gives it up where true (PrefillLeft, the document's
        state again)."""
        self._claim()
        try:
            ids = torch.cat([self.last.to(ids.device), ids], dim=1)
            chunk = self.cache.offload_config.prefill_chunk
            logits, seconds = timed_prefill(self.model, ids, self.cache, chunk, progress=progress, leave=leave)
        except BaseException:
            self.rewind()
            raise
        return Prefilled(self.cache, logits, self.tokens - 1 + ids.shape[1], seconds, 0.0, prefix_tokens=self.tokens)

    @torch.inference_mode()
    def extend(self, ids: torch.Tensor, *, progress: bool = True, leave=None) -> float:
        """The document grown by the token ids [1, T] (T >= 2), prefilled after it: the prompts after it
        continue the longer document from now on (a conversation's turns, each kept for the next). Returns
        the prefill's seconds. `leave()`, asked as it prefills, gives it up where true (PrefillLeft, the
        document as it was)."""
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
            raise ValueError(f"a prefix is extended by at least 2 token ids [1, T], got shape {list(ids.shape)}")
        chunk = torch.cat([self.last.to(ids.device), ids[:, :-1]], dim=1)  # the new last is held back in turn
        self._claim()
        try:
            _, seconds = timed_prefill(
                self.model, chunk, self.cache, self.cache.offload_config.prefill_chunk, progress=progress, leave=leave
            )
            marks = self.cache.mark()
        except BaseException:
            self.rewind()
            raise
        self.marks, self.ids = marks, torch.cat([self.ids, ids.cpu()], dim=1)
        self.prefill_s += seconds
        self.in_use = False
        return seconds

    @classmethod
    def load(cls, llm, path, *, document=None, progress: bool = True) -> Prefix:
        """The prefix saved at `path` (`save`), loaded into a new cache for `llm` (its model, offload
        configuration and pool of host stores: engine.prefix_file.load_prefix); `document`, token ids
        [1, T], when given, is what the file must hold."""
        cache, ids = load_prefix(llm, path, document=document, progress=progress)
        try:
            return cls(llm.model, Prefilled(cache, None, ids.shape[1] - 1, 0.0, 0.0), ids)
        except BaseException:
            cache.release()
            raise

    @property
    def tokens(self) -> int:
        return self.ids.shape[1]

    @property
    def last(self) -> torch.Tensor:
        """The held-back token [1, 1]: each prompt after the document is prefilled after it."""
        return self.ids[:, -1:]

    def save(self, path, *, extra: dict[str, str] | None = None, progress: bool = True) -> int:
        """The prefix written to the file `path` (safetensors; engine.prefix_file), for `HybridLLM.load_prefix`
        in this process or another, with the strings `extra` beside it (prefix_file.saved_extra); returns the
        bytes written."""
        self._claim()
        try:
            return save_prefix(self, path, extra=extra, progress=progress)
        finally:
            self.in_use = False

    def _claim(self) -> None:
        """The prefix taken for one prompt (or an extension) until its rewind."""
        if self.cache is None:
            raise ValueError("this prefix was released: make a new one with HybridLLM.prefix")
        if self.in_use:
            raise RuntimeError("a prefix continues one prompt at a time, and a generation after it is not finished")
        self.in_use = True

    def nbytes(self) -> dict[str, dict[str, int]]:
        """What it holds to go back to the document's state, beyond its cache: {"device": {...}, "host": {...}}."""
        marks = [mark.nbytes() for mark in self.marks or []]
        return {where: {"prefix_copies": sum(m[where] for m in marks)} for where in ("device", "host")}

    def rewind(self) -> None:
        """The cache back to the document's state, for the next prompt: its own sequence alone again (the
        prompts that joined a continuation's batch leave it), at the document's positions."""
        self.cache.keep_only(self.layers)
        self.cache.rewind(self.marks)
        self.in_use = False

    def release(self) -> None:
        """Give its host store back (to the engine's pool of stores, for the next generation)."""
        if self.in_use:
            raise RuntimeError("a generation after this prefix is not finished: finish or close it first")
        if self.cache is not None:
            self.cache.release()
            self.cache = self.marks = self.layers = None


class KeptCache:
    """One prefilled cache kept from one prompt to the next, so that each prefills only what is new to it:
    a prompt, which the next prompt may begin with (a conversation's next turn: the messages so far, the
    answer, a new message) and then extends; or a document, which the prompts after it that name the same
    continue as it was left. A prompt that continues neither replaces it. `llm`: the HybridLLM; `folder`
    (engine.prefix_file.PrefixFolder), where given, keeps documents' prefixes as files, so that a document
    that comes back is loaded from its file rather than prefilled again."""

    def __init__(self, llm, folder=None):
        self.llm, self.folder = llm, folder
        self.prefix: Prefix | None = None
        self.document: str | None = None  # a kept document's text
        self.loaded = False  # whether the kept document was loaded from the folder

    def prompt(self, ids: torch.Tensor, leave=None) -> tuple[torch.Tensor, Prefix, int] | None:
        """The prompt's token ids [1, T] kept: (the ids left to prefill after the kept Prefix, the Prefix, how
        many of the prompt's tokens were found kept). None where it is too short to keep (under 3 tokens:
        a prefix holds 2 at least, and a prompt after it 1 more); what was kept is then given back. `leave()`,
        asked as it prefills, gives the prefill up where true (PrefillLeft; what was kept stays,
        or where it was given up for this prompt, nothing)."""
        _stay(leave)
        if ids.shape[1] < 3:
            self.release()
            return None
        if self.continues(ids):
            n = self.prefix.tokens
            rest = ids[:, n:]
            if rest.shape[1] >= 3:  # kept for the next turn: all but its last token, the prompt after it
                self.prefix.extend(rest[:, :-1], progress=False, leave=leave)
                rest = rest[:, -1:]
            return rest, self.prefix, n
        self.release()
        self.prefix = self.llm.prefix(ids[:, :-1], progress=False, leave=leave)
        return ids[:, -1:], self.prefix, 0

    def continues(self, ids: torch.Tensor) -> bool:
        """Whether the prompt's ids [1, T] begin with the kept prompt's (a document kept: no) and go on."""
        if self.prefix is None or self.document is not None:
            return False
        kept = self.prefix.ids[0]
        return ids.shape[1] > len(kept) and torch.equal(ids[0, : len(kept)].cpu(), kept)

    def keep(self, prefix: Prefix) -> None:
        """Keep `prefix` (loaded from a file, say) as the prompt the next may begin with."""
        self.release()
        self.prefix = prefix

    def with_document(self, text: str, leave=None) -> tuple[Prefix, int]:
        """The document's Prefix, kept from before, loaded from the folder or prefilled now, and how many of its
        tokens were found kept (0 or all; `loaded` says whether they came from the folder). `leave()`, asked
        as it prefills, gives the prefill up where true (PrefillLeft; nothing kept). A document under 2 tokens is
        refused (ValueError) before what was kept is given back."""
        if self.document == text:
            self.loaded = False
            return self.prefix, self.prefix.tokens
        ids = self.llm.document_ids(text)  # refused here, before what was kept is given back
        _stay(leave)
        self.release()
        if self.folder is not None:
            self.prefix, self.loaded = self.folder.prefix(text, progress=False, leave=leave)
        else:
            self.prefix = self.llm.prefix(ids, progress=False, leave=leave)
        self.document = text
        return self.prefix, self.prefix.tokens if self.loaded else 0

    def release(self) -> None:
        """Give the kept cache's host store back."""
        if self.prefix is not None:
            self.prefix.release()
        self.prefix, self.document, self.loaded = None, None, False


def _stay(leave) -> None:
    """PrefillLeft where the prompt has left already (its client gone while it waited): what is kept is not
    given back for a prefill that would be given up at once."""
    if leave is not None and leave():
        raise PrefillLeft
