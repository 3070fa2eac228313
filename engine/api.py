"""`HybridLLM`: load a model, generate from a long context with the hybrid cache,
and report where the time and the bytes went."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass

import torch

from engine.batch_run import run_batch
from engine.cache.cache import check_offload_fits
from engine.cache.store import StorePool
from engine.config import OffloadConfig, offload_or_default
from engine.conversation import Conversation
from engine.generation import Ending, GenerationReport, eos_ids, sampler
from engine.models import BUNDLED_NAME, check_supported, load_model
from engine.prefill import (
    RESERVED_NEW_TOKENS,
    prefill,  # noqa: F401  (re-exported: callers import it from engine.api)
    prefill_chunk,
    prefill_prompt,
)
from engine.prefix import Prefix
from engine.sampling import Sampling, check_sampling
from engine.stop import StopStrings, TextStream

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    report: GenerationReport


class HybridLLM:
    """A causal LM whose KV cache lives in host memory, decoded with retrieval attention.

    >>> llm = HybridLLM.from_pretrained("smollm2-135m", offload=OffloadConfig.preset("default"))
    >>> llm.generate(long_text + "\\nQuestion: ...", max_new_tokens=32).text
    """

    def __init__(self, model, tokenizer, offload: OffloadConfig | None = None):
        self.offload = offload_or_default(offload)
        check_supported(getattr(model, "config", None))
        if not (callable(tokenizer) and hasattr(tokenizer, "decode")):
            raise TypeError(
                "tokenizer must be the model's tokenizer (it encodes the prompts and decodes the answers), "
                f"got {type(tokenizer).__name__}"
            )
        if model.config._attn_implementation != "hybrid":
            model.set_attn_implementation("hybrid")
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.stores = StorePool()  # host stores kept from one generation to the next (free_host_memory)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = BUNDLED_NAME,
        offload: OffloadConfig | None = None,
        *,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        rope_scale: float | None = None,
    ) -> HybridLLM:
        """Load a local model directory, `.gguf` file, hub id or the bundled "smollm2-135m".
        dtype defaults to bfloat16 on CUDA and float32 on the CPU; `rope_scale` stretches the
        model's context by YaRN (`engine.models.stretched`)."""
        offload = offload_or_default(offload)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
        device = offload.resolved_device()
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        model, tokenizer = load_model(
            name_or_path,
            dtype=dtype,
            device=device,
            attn_implementation="hybrid",
            trust_remote_code=trust_remote_code,
            rope_scale=rope_scale,
            check_config=lambda config: check_offload_fits(config, offload),
        )
        return cls(model, tokenizer, offload)

    # ------------------------------------------------------------- prompts

    def encode(self, prompt: str | list[dict] | list[int] | torch.Tensor) -> torch.Tensor:
        """Token ids [1, T]: a string is used as is; a list of chat messages goes
        through the model's chat template (with the assistant turn opened); token ids
        (a tensor [T] or [1, T], or a list of ints, as a tokenizer gives them) are taken as they are."""
        if _token_id_list(prompt):
            self._check_vocab(int(min(prompt)), int(max(prompt)))  # before a tensor, which holds 64 bits
            prompt = torch.tensor([int(t) for t in prompt])
        if isinstance(prompt, torch.Tensor):
            return self._check_ids(prompt)
        if isinstance(prompt, list):
            _check_messages(prompt)
            if getattr(self.tokenizer, "chat_template", None):
                from jinja2 import TemplateError

                try:
                    ids = self.tokenizer.apply_chat_template(
                        prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
                    )["input_ids"]
                except TemplateError as error:  # e.g. roles that do not alternate, as the template requires
                    raise ValueError(f"the model's chat template refused the messages: {error}") from error
                return ids.to(self.device)
            prompt = "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\nassistant:"
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, chat messages or token ids, got {type(prompt).__name__}")
        return self._check_ids(self.tokenizer(prompt, return_tensors="pt").input_ids)

    def _encode_all(self, prompts: list) -> list[torch.Tensor]:
        """`encode` of each prompt; in a batch of several, an error names the prompt it is about."""
        if len(prompts) == 1:
            return [self.encode(prompts[0])]
        ids = []
        for i, prompt in enumerate(prompts):
            try:
                ids.append(self.encode(prompt))
            except (TypeError, ValueError) as error:
                raise type(error)(f"prompt {i} of the batch's {len(prompts)}: {error}") from error
        return ids

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] or [1, T] -> [1, T] on the model's device, or a clear error."""
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be an integer tensor (int64), got {ids.dtype}")
        if ids.dim() == 2 and ids.shape[0] != 1:
            raise ValueError(f"one prompt at a time: token ids must have shape [T] or [1, T], got {list(ids.shape)}")
        ids = ids.reshape(1, -1)
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty")
        self._check_vocab(int(ids.min()), int(ids.max()))
        return ids.long().to(self.device)

    def _check_vocab(self, low: int, high: int) -> None:
        vocab = self.model.config.vocab_size
        if low < 0 or high >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}), got {low}..{high}")

    def encode_continuation(self, prompt) -> torch.Tensor:
        """Token ids [1, T] of a prompt that continues a prefix: text (with no special tokens of its own,
        such as a BOS) or token ids; chat messages are refused (ValueError)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return self._check_ids(self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            raise ValueError(_CHAT_AFTER_PREFIX)
        return self.encode(prompt)

    # ------------------------------------------------------------ prefixes

    @torch.inference_mode()
    def prefix(self, document, *, progress: bool = True, leave: Callable[[], bool] | None = None) -> Prefix:
        """Prefill `document` (text, the beginning of a prompt, or token ids) once, for several prompts
        that continue it: `generate(prompt, prefix=...)` then prefills only the prompt (engine.prefix).
        The prefix holds a host store until its `release()`. `leave()`, asked as it prefills,
        gives it up where true (engine.prefill.PrefillLeft)."""
        ids = self.document_ids(document)
        room = RESERVED_NEW_TOKENS  # the prompts after it and their answers; the stores grow past it
        _check_function("leave", leave)
        keywords = dict(progress=progress, stores=self.stores, leave=leave)
        prefilled = prefill_prompt(self.model, ids[:, :-1], self.offload, room, **keywords)
        try:
            return Prefix(self.model, prefilled, ids)
        except BaseException:
            prefilled.cache.release()
            raise

    def document_ids(self, document) -> torch.Tensor:
        """A prefix's document as token ids [1, T] (what `encode` takes, but chat messages); refused under
        2 tokens, since its last token is prefilled with each prompt after it."""
        if isinstance(document, list) and document and isinstance(document[0], dict):
            raise ValueError(_CHAT_AFTER_PREFIX)
        ids = self.encode(document)
        if ids.shape[1] < 2:
            raise ValueError(f"a prefix holds at least 2 tokens, got {ids.shape[1]}")
        return ids

    def load_prefix(self, path, *, document=None, progress: bool = True) -> Prefix:
        """A prefix saved by `Prefix.save` (in this process or another) loaded from the file `path`, as it was
        saved: prompts after it decode as after the original. The file must be of this model, under a
        configuration equal to this one in the fields that shape the cache (`OffloadConfig.state_fields`);
        `document` (what `prefix` takes), when given, is the document it must hold. ValueError otherwise."""
        expected = None if document is None else self.encode(document)
        return Prefix.load(self, path, document=expected, progress=progress)

    def conversation(self, messages: list[dict] | None = None) -> Conversation:
        """A chat whose turns each prefill only what is new (engine.conversation): `ask(text)` or
        `stream(text)` per user message; `messages` (a system prompt, say) begin it."""
        if messages:
            _check_messages(messages)
        return Conversation(self, messages)

    def load_conversation(self, path, *, progress: bool = True) -> Conversation:
        """A conversation saved by `Conversation.save` (in this process or another), its messages and their
        cache loaded from the file `path`, ready for its next turn (the file's checks are `load_prefix`'s)."""
        return Conversation.load(self, path, progress=progress)

    # ---------------------------------------------------------- generation

    def generate(self, prompt, max_new_tokens: int = 64, **kwargs) -> GenerationResult | list[GenerationResult]:
        """Generate up to `max_new_tokens` tokens (greedy unless temperature > 0; the keywords
        are `generate_batch`'s). A prompt is what `encode` takes; a list of them (strings,
        chat-message lists or token ids) is decoded as one batch and gives a list of results, one
        per prompt (see `generate_batch`). A list of ints is one prompt's token ids, not a batch."""
        if _is_batch(prompt):
            return self.generate_batch(list(prompt), max_new_tokens, **kwargs)
        return self.generate_batch([prompt], max_new_tokens, **kwargs)[0]

    def stream(
        self, prompt, max_new_tokens: int = 64, *, report: GenerationReport | None = None, **kwargs
    ) -> Iterator[str]:
        """Yield the generated text piece by piece (the keywords are `generate_batch`'s); `report`, if
        given, is filled in at the end (also when the consumer stops early)."""
        if _is_batch(prompt):
            raise ValueError("stream decodes one prompt; a list of prompts is a batch, for generate(prompts)")
        report = report if report is not None else GenerationReport()
        text = TextStream(StopStrings(self.tokenizer, kwargs.pop("stop", None)))
        sampling = {k: kwargs.pop(k) for k in SAMPLING_KEYWORDS if k in kwargs}
        pick = self._pick(max_new_tokens, stop_at_eos=kwargs.get("stop_at_eos", True), **sampling)
        ends = _stopping(text.stops)
        with closing(self._decode([prompt], max_new_tokens, [report], pick=pick, ends=ends, **kwargs)) as picks:
            for _, token, _ in picks:  # (closed when the consumer stops early; no token: it left in its prefill)
                if token is not None and (piece := text.add(token)):
                    yield piece
            if piece := text.finish():
                yield piece

    def stream_batch(
        self,
        prompts: list,
        sampling: Sampling | list[Sampling] | None = None,
        *,
        reports: list[GenerationReport] | None = None,
        leave: Callable[[int], bool] | None = None,
        progress: bool = True,
        more: Callable[[], list[tuple]] | None = None,
        prefix: Prefix | None = None,
    ) -> Iterator[tuple[int, str, str]]:
        """Decode `prompts` as one batch, each with its own `Sampling` (one for all, or a list of one per prompt),
        and yield (prompt's index, text piece, finish) as each prompt's text grows: the pieces `stream` gives
        the prompt alone (greedy, the same text), finish "" until its last piece (maybe empty), then why it
        ended ("eos", "stop", "length", "left", or "error"). `reports`, one per prompt, are each filled when its prompt
        ends. `leave(i)`, asked as prompt i is prefilled and after each of its tokens, ends it
        there where true (its client gone, say; its finish "left"): the batch goes on without it. `more()`, asked
        before a step while the batch runs and no prompt is on its way in, gives prompts that join it (continuous
        batching): a list of (prompt, Sampling) pairs, each asking for a token or more, prefilled one after
        another a chunk a step while the batch decodes (a step waits for one chunk at most; where the batch ends
        first, the rest at once), which take the next indices (len(prompts), len(prompts) + 1, ...) and each get
        a report appended to `reports`. A prompt from `more()` whose prefill fails (its host store not allocated,
        say) ends with finish "error", its report's `error` the exception, and the batch goes on without it; so
        does one of `prompts` whose prefill fails (a prompt that cannot be encoded raises, as the call's own
        prompts do).
        After a `prefix` (`HybridLLM.prefix`), `prompts` is one prompt that continues it, which the prompts from
        `more()` may join."""
        _check_prompts(prompts)
        if prefix is not None and len(prompts) > 1:
            raise ValueError(f"after a prefix, stream_batch takes one prompt (more() adds others), got {len(prompts)}")
        _check_function("more", more)
        sampling = Sampling() if sampling is None else sampling
        samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(samplings) != len(prompts) or not all(isinstance(s, Sampling) for s in samplings):
            raise ValueError(f"sampling must be one Sampling or a list of one per prompt ({len(prompts)})")
        reports = reports if reports is not None else [GenerationReport() for _ in prompts]
        if len(reports) != len(prompts):
            raise ValueError(f"reports must be one GenerationReport per prompt ({len(prompts)}), got {len(reports)}")
        texts: list[TextStream] = []

        def row_settings(sampling: Sampling) -> tuple:
            """A prompt's max_new_tokens, pick, end check and stop_at_eos, for `_decode`."""
            texts.append(TextStream(StopStrings(self.tokenizer, sampling.stop)))
            ends = _stopping(texts[-1].stops)
            return sampling.max_new_tokens, sampling.pick(self.device), ends, sampling.stop_at_eos

        def joining() -> list[tuple]:
            joined = more()
            if not isinstance(joined, list) or not all(_is_joining(x) for x in joined):
                raise ValueError(f"more() gives a list of (prompt, Sampling) pairs, got {joined!r}")
            reports.extend(GenerationReport() for _ in joined)
            return [(prompt, *row_settings(s)) for prompt, s in joined]

        limits, picks, ends, stop_at_eos = map(list, zip(*map(row_settings, samplings)))
        decoding = dict(pick=picks, ends=ends, stop_at_eos=stop_at_eos, progress=progress, prefix=prefix)
        decoding.update(leave=leave, fail_alone=True)  # a prompt whose prefill fails: finish "error", the others go on
        ended = set()
        with closing(self._decode(prompts, limits, reports, more=None if more is None else joining, **decoding)) as run:
            for row, token, finish in run:
                piece = texts[row].add(token) if token is not None else ""
                if finish:
                    piece += texts[row].finish()
                    ended.add(row)
                if piece or finish:
                    yield row, piece, finish
        for row in sorted(set(range(len(prompts))) - ended):  # those with no token to decode
            yield row, "", "length"

    def generate_batch(
        self,
        prompts: list,
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_at_eos: bool = True,
        stop: str | list[str] | None = None,
        prefix: Prefix | None = None,
        progress: bool = True,
        leave: Callable[[int], bool] | None = None,
    ) -> list[GenerationResult]:
        """Decode several prompts together: each is prefilled alone (its host indexes built),
        then every decode step runs the whole batch through the model at once, each sequence
        at its own position; a sequence that ends (EOS) leaves the batch, the others go on.
        Greedy, each result is what `generate` gives its prompt alone; temperature > 0 samples
        with a generator seeded with `seed`, among the `top_k` most likely tokens (0: all) and the
        fewest most likely whose probabilities reach `top_p` (1: all); a sequence whose text comes to
        contain one of the `stop` strings ends there, its text cut just before it (its token_ids keep
        every token picked); after a `prefix` (`HybridLLM.prefix`), only the prompts are prefilled, and
        they are decoded one after another (each continues the document as it was left); `progress`
        shows the prefill and index-build bars (stderr); `leave(i)`, asked as prompt i is prefilled
        and after each of its tokens, ends it there where true (another thread stopping the work, say;
        its finish "left"; one that leaves in its prefill has no token).
        Each report is its own sequence's (GenerationReport); the bytes are the batch's."""
        _check_prompts(prompts)
        _check_function("leave", leave)
        stops = StopStrings(self.tokenizer, stop)
        pick = self._pick(
            max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_at_eos=stop_at_eos
        )
        decoding = dict(pick=pick, ends=_stopping(stops), stop_at_eos=stop_at_eos, progress=progress)
        if prefix is None or len(prompts) == 1:
            return self._generate(prompts, max_new_tokens, stops, prefix=prefix, leave=leave, **decoding)
        out = []  # after a prefix, one after another, each from the document's state
        for i, prompt in enumerate(prompts):
            alone = dict(leave=None if leave is None else lambda _row, i=i: leave(i))
            try:
                out += self._generate([prompt], max_new_tokens, stops, prefix=prefix, **alone, **decoding)
            except (TypeError, ValueError) as error:
                raise type(error)(f"prompt {i} of the {len(prompts)} after the prefix: {error}") from error
        return out

    def _pick(self, max_new_tokens, *, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_at_eos=True):
        """The arguments checked, and the batch's pick: one generator seeded with `seed` for all its rows."""
        check_sampling(max_new_tokens, temperature, seed, top_k, top_p, stop_at_eos)
        return sampler(temperature, torch.Generator(device=self.device).manual_seed(seed), top_k, top_p)

    def _generate(self, prompts: list, max_new_tokens: int, stops: StopStrings, **decoding):
        """The results of decoding `prompts` together, as one batch (`_decode`'s keywords)."""
        reports = [GenerationReport() for _ in prompts]
        tokens: list[list[int]] = [[] for _ in prompts]
        for row, token, _ in self._decode(prompts, max_new_tokens, reports, **decoding):
            if token is not None:  # none: the prompt left in its prefill
                tokens[row].append(token)
        return [GenerationResult(stops.cut(stops.text(toks)), toks, report) for toks, report in zip(tokens, reports)]

    def _decode(
        self,
        prompts: list,
        max_new_tokens: int | list[int],
        reports: list[GenerationReport],
        *,
        prefix: Prefix | None = None,
        more: Callable[[], list[tuple]] | None = None,
        **decoding,
    ) -> Iterator[tuple[int, int | None, str]]:
        """`run_batch` of `prompts` (the rest of its keywords are `run_batch`'s), each encoded (with a `prefix`,
        the one prompt that continues it); `more()` gives prompts that join as (prompt, max_new_tokens, pick,
        ends, stop_at_eos), encoded as they come."""
        _check_function("leave", decoding.get("leave"))
        if prefix is not None:
            self._check_prefix(prefix)
            ids = [self.encode_continuation(prompts[0])]
        else:
            ids = self._encode_all(prompts)

        def joining() -> list[tuple]:
            return [(self.encode(prompt), *settings) for prompt, *settings in more()]

        joins = None if more is None else joining
        return run_batch(
            self.model, self.offload, self.stores, ids, max_new_tokens, reports, prefix=prefix, more=joins, **decoding
        )

    def _check_prefix(self, prefix) -> None:
        if not isinstance(prefix, Prefix):
            raise TypeError(f"prefix must be what HybridLLM.prefix returns, got {type(prefix).__name__}")
        if prefix.model is not self.model:
            raise ValueError("the prefix was made by another engine: a prefix continues prompts of its own model")

    def free_host_memory(self) -> None:
        """Free the host stores kept for the next generation (they are allocated again when needed)."""
        self.stores.clear()

    @torch.inference_mode()
    def generate_full_attention(self, prompt, max_new_tokens: int = 64) -> str:
        """The same model with full attention and an ordinary DynamicCache, decoded greedily as `generate`
        decodes (up to an end-of-sequence token): the reference the hybrid engine is compared against.
        A plain loop, not transformers' `generate`, which would apply the model's generation config
        (a repetition penalty, say) that the engine's decoding does not."""
        from transformers import DynamicCache

        check_sampling(max_new_tokens, 0.0)
        ids, cache, ends, tokens = self.encode(prompt), DynamicCache(), eos_ids(self.model), []
        step = ids  # with a DynamicCache, the "hybrid" attention function is plain sdpa
        for _ in range(max_new_tokens):
            token = int(prefill_chunk(self.model, step, cache).argmax())
            if token in ends:
                break
            tokens.append(token)
            step = ids.new_tensor([[token]])
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


_CHAT_AFTER_PREFIX = (
    "a prefix and the prompts after it are text or token ids, not chat messages: render the messages with the "
    "tokenizer's chat template (apply_chat_template(..., tokenize=False)) and split the text where the question begins"
)


SAMPLING_KEYWORDS = ("temperature", "top_k", "top_p", "seed")


def _stopping(stops: StopStrings) -> Ending | None:
    """The end check of stop strings: "stop" once one is reached, else "" (None: there are none)."""
    return (lambda tokens: "stop" if stops.reached(tokens) else "") if stops else None


def _check_function(name: str, value) -> None:
    """A TypeError naming `name` where `value` is neither None nor something to call."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a function (or None), got {type(value).__name__}")


def _is_joining(entry) -> bool:
    """Whether `entry` is a (prompt, Sampling) pair, as `stream_batch`'s `more` gives them."""
    return isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], Sampling) and not _is_batch(entry[0])


def _check_prompts(prompts) -> None:
    """A batch's prompts: a list of them, not one prompt (a string was a batch of its characters)."""
    if not isinstance(prompts, list) or not prompts or any(_is_batch(p) for p in prompts):
        raise ValueError("prompts must be a non-empty list of prompts (each a string, messages or token ids)")


def _is_batch(prompt) -> bool:
    """Whether `prompt` is a list of prompts, not one prompt given as a list (chat messages, token ids)."""
    return (
        isinstance(prompt, (list, tuple))
        and bool(prompt)
        and not isinstance(prompt[0], dict)
        and not _token_id_list(prompt)
    )


def _token_id_list(prompt) -> bool:
    """Whether `prompt` is token ids as a list (or tuple) of ints, as a tokenizer returns them."""
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt)
    )


def _check_messages(messages: list) -> None:
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"chat message {i} must be a dict with string 'role' and 'content', got {m!r}")
    if not messages:
        raise ValueError("the prompt is empty (no chat messages)")
