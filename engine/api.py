"""`HybridLLM`: load a model, generate from a long context with the hybrid cache,
and report where the time and the bytes went."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from engine.cache import HybridCache
from engine.config import OffloadConfig
from engine.decode.recheck import forward_step
from engine.models import BUNDLED_NAME, check_supported, load_model


@dataclass
class GenerationReport:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    index_build_s: float = 0.0  # after the prefill: what its overlapped index builds left to wait for
    decode_s: float = 0.0
    decode_steps: int = 0  # forward passes after prefill (the first token comes from prefill)
    device_bytes: dict[str, int] = field(default_factory=dict)
    host_bytes: dict[str, int] = field(default_factory=dict)
    kv_read_frac: float = 0.0  # mean over decode steps of gathered / host tokens
    keys_scored_frac: float = 0.0  # mean over decode steps of keys scored by the host index / host tokens
    rechecked_steps: int = 0  # steps run again exactly at a near tie (engine.decode.recheck; batch: summed)

    @property
    def first_token_s(self) -> float:
        """Time to the first token: the prefill and the index builds still running after it."""
        return self.prefill_s + self.index_build_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0

    def summary(self) -> str:
        mib = 2**20
        dev = ", ".join(f"{k} {v / mib:.1f}" for k, v in self.device_bytes.items())
        host = ", ".join(f"{k} {v / mib:.1f}" for k, v in self.host_bytes.items())
        return (
            f"prompt {self.prompt_tokens} tokens: prefill {self.prefill_s:.2f} s "
            f"({self.prompt_tokens / max(self.prefill_s, 1e-9):.0f} tok/s), "
            f"host index build {self.index_build_s:.2f} s after it (first token at {self.first_token_s:.2f} s)\n"
            f"decode {self.new_tokens} tokens in {self.decode_s:.2f} s ({self.decode_tokens_per_s:.2f} tok/s); "
            f"host KV rows read per step {100 * self.kv_read_frac:.2f}%, "
            f"keys scored by the host index {100 * self.keys_scored_frac:.2f}%, "
            f"{self.rechecked_steps} near ties re-checked exactly\n"
            f"device MiB: {dev}\nhost MiB: {host}"
        )

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        d["first_token_s"] = self.first_token_s
        return d


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
        if not isinstance(offload, (OffloadConfig, type(None))):
            raise TypeError(
                f"offload must be an OffloadConfig (see OffloadConfig.preset), got {type(offload).__name__}"
            )
        check_supported(getattr(model, "config", None))
        if model.config._attn_implementation != "hybrid":
            model.set_attn_implementation("hybrid")
        self.model, self.tokenizer = model, tokenizer
        self.offload = offload or OffloadConfig()
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = BUNDLED_NAME,
        offload: OffloadConfig | None = None,
        *,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
    ) -> HybridLLM:
        """Load a local model directory, `.gguf` file, hub id or the bundled "smollm2-135m".
        dtype defaults to bfloat16 on CUDA and float32 on the CPU."""
        if not isinstance(offload, (OffloadConfig, type(None))):
            raise TypeError(
                f"offload must be an OffloadConfig (see OffloadConfig.preset), got {type(offload).__name__}"
            )
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
        offload = offload or OffloadConfig()
        device = offload.resolved_device()
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        model, tokenizer = load_model(
            name_or_path, dtype=dtype, device=device, attn_implementation="hybrid", trust_remote_code=trust_remote_code
        )
        return cls(model, tokenizer, offload)

    # ------------------------------------------------------------- prompts

    def encode(self, prompt: str | list[dict] | torch.Tensor) -> torch.Tensor:
        """Token ids [1, T]: a string is used as is; a list of chat messages goes
        through the model's chat template (with the assistant turn opened)."""
        if isinstance(prompt, torch.Tensor):
            return self._check_ids(prompt)
        if isinstance(prompt, list):
            _check_messages(prompt)
            if getattr(self.tokenizer, "chat_template", None):
                ids = self.tokenizer.apply_chat_template(
                    prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
                )["input_ids"]
                return ids.to(self.device)
            prompt = "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\nassistant:"
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, chat messages or token ids, got {type(prompt).__name__}")
        return self._check_ids(self.tokenizer(prompt, return_tensors="pt").input_ids)

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] or [1, T] -> [1, T] on the model's device, or a clear error."""
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be an integer tensor (int64), got {ids.dtype}")
        if ids.dim() == 2 and ids.shape[0] != 1:
            raise ValueError(f"one prompt at a time: token ids must have shape [T] or [1, T], got {list(ids.shape)}")
        ids = ids.reshape(1, -1)
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}")
        return ids.long().to(self.device)

    # ---------------------------------------------------------- generation

    def generate(self, prompt, max_new_tokens: int = 64, **kwargs) -> GenerationResult | list[GenerationResult]:
        """Generate up to `max_new_tokens` tokens (greedy unless temperature > 0). A list of
        prompts (strings, chat-message lists or token ids) is decoded as one batch and gives
        a list of results, one per prompt (see `generate_batch`)."""
        if isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], dict):
            return self.generate_batch(list(prompt), max_new_tokens, **kwargs)
        tokens: list[int] = []
        report = GenerationReport()
        for token in self._tokens(prompt, max_new_tokens, report, **kwargs):
            tokens.append(token)
        return GenerationResult(self.tokenizer.decode(tokens, skip_special_tokens=True), tokens, report)

    def stream(
        self, prompt, max_new_tokens: int = 64, *, report: GenerationReport | None = None, **kwargs
    ) -> Iterator[str]:
        """Yield the generated text piece by piece; `report`, if given, is filled in at the end."""
        tokens: list[int] = []
        shown = ""
        report = report if report is not None else GenerationReport()
        for token in self._tokens(prompt, max_new_tokens, report, **kwargs):
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if len(text) > len(shown) and not text.endswith("\ufffd"):  # hold back half a multi-byte character
                yield text[len(shown) :]
                shown = text

    @torch.inference_mode()
    def generate_batch(
        self,
        prompts: list,
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        stop_at_eos: bool = True,
        progress: bool = True,
    ) -> list[GenerationResult]:
        """Decode several prompts together: each is prefilled alone (its host indexes built),
        then every decode step runs the whole batch through the model at once, each sequence
        at its own position; a sequence that ends (EOS) leaves the batch, the others go on.
        Greedy, each result is what `generate` gives its prompt alone. Each report has its own
        prompt, prefill and tokens; decode time, read share and bytes are the batch's."""
        _check_sampling(max_new_tokens, temperature, seed)
        if not prompts:
            raise ValueError("the list of prompts is empty")
        ids = [self.encode(p) for p in prompts]
        reports = [GenerationReport(prompt_tokens=x.shape[1]) for x in ids]
        caches, first = [], []
        try:
            for x, report in zip(ids, reports):
                T = x.shape[1]
                cache = HybridCache(
                    self.model, self.offload, max_length=T + max_new_tokens, prompt_length=T, progress=progress
                )
                caches.append(cache)
                t0 = time.perf_counter()
                first.append(prefill(self.model, x, cache, self.offload.prefill_chunk, progress=progress))
                self._sync()
                t1 = time.perf_counter()
                cache.build_indexes()
                report.prefill_s, report.index_build_s = t1 - t0, time.perf_counter() - t1
            batch = HybridCache.stack(caches)
        finally:
            for cache in caches:
                cache.close()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        tokens = decode_batch(
            self.model,
            batch,
            torch.stack(first),
            [x.shape[1] for x in ids],
            max_new_tokens,
            lambda logits: _pick(logits, temperature, generator),
            eos_ids(self.model) if stop_at_eos else set(),
            reports,
        )
        results = []
        for toks, report in zip(tokens, reports):
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            results.append(GenerationResult(text, toks, report))
        return results

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def generate_full_attention(self, prompt, max_new_tokens: int = 64) -> str:
        """The same model with full attention and an ordinary DynamicCache (greedy):
        the reference the hybrid engine is compared against."""
        from transformers import DynamicCache

        ids = self.encode(prompt)
        # with a DynamicCache, the "hybrid" attention function is plain sdpa
        out = self.model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            cache=DynamicCache(),
            attention_mask=torch.ones_like(ids),
            pad_token_id=self.tokenizer.eos_token_id,
        )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    @torch.inference_mode()
    def _tokens(
        self,
        prompt,
        max_new_tokens: int,
        report: GenerationReport,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        stop_at_eos: bool = True,
        progress: bool = True,
    ) -> Iterator[int]:
        _check_sampling(max_new_tokens, temperature, seed)
        ids = self.encode(prompt)
        T = ids.shape[1]
        cfg = self.offload
        cache = HybridCache(self.model, cfg, max_length=T + max_new_tokens, prompt_length=T, progress=progress)
        report.prompt_tokens = T
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        read, scored = [], []
        t0 = time.perf_counter()
        try:
            logits = prefill(self.model, ids, cache, cfg.prefill_chunk, progress=progress)
            sync()
            report.prefill_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            cache.build_indexes()  # what the builds overlapped with the prefill left to do
            report.index_build_s = time.perf_counter() - t1
            generator = torch.Generator(device=self.device).manual_seed(seed)
            eos = eos_ids(self.model) if stop_at_eos else set()
            t0 = time.perf_counter()
            fed = []  # tokens fed since the prompt: a near tie runs the newest not yet exact again
            for step in range(max_new_tokens):
                token = _pick(logits, temperature, generator)
                report.new_tokens = step + 1
                yield token
                if token in eos or step == max_new_tokens - 1:
                    break
                fed.append(token)
                out = forward_step(self.model, cache, torch.tensor([[token]], device=self.device), fed=[fed])
                logits = out.logits[0]
                read.append(out.kv_read_frac)
                scored.append(out.keys_scored_frac)
                report.rechecked_steps += out.rechecked
        finally:  # also when the consumer stops early or raises: no build thread outlives the call
            cache.close()
            sync()
            report.decode_s = time.perf_counter() - t0
            report.decode_steps = len(read)
            report.kv_read_frac = sum(read) / len(read) if read else 0.0
            report.keys_scored_frac = sum(scored) / len(scored) if scored else 0.0
            memory = cache.memory_report()
            weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
            report.device_bytes = {"weights": weights, **memory["device"]}
            report.host_bytes = memory["host"]


def prefill(model, ids: torch.Tensor, cache, chunk: int, *, progress: bool = True) -> torch.Tensor:
    """Feed the prompt ids [1, T] through the model in chunks of `chunk` tokens
    (bounded activation memory); returns the last position's logits [vocab]."""
    starts = range(0, ids.shape[1], chunk)
    for start in tqdm(starts, desc="prefill", unit="chunk", disable=not progress or len(starts) < 2, leave=False):
        out = model(input_ids=ids[:, start : start + chunk], cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]


def decode_batch(model, cache, logits, lengths, max_new_tokens, pick, eos, reports) -> list[list[int]]:
    """Decode the sequences of a stacked cache (HybridCache.stack) together from their
    prefills' last logits [B, vocab]: each step feeds every unfinished sequence its last
    token at its own position; a sequence leaves the batch (and the cache) once it picks an
    EOS token or has max_new_tokens. Fills the reports; returns each sequence's tokens."""
    B = len(lengths)
    tokens: list[list[int]] = [[] for _ in range(B)]
    rows, positions = list(range(B)), torch.tensor(lengths, device=logits.device)
    memory = cache.memory_report()  # the whole batch's, before any sequence leaves
    read, t0, steps, rechecked = [], time.perf_counter(), 0, 0
    while rows and max_new_tokens:
        picked = [pick(logits[i]) for i in range(len(rows))]
        keep = []
        for i, (b, token) in enumerate(zip(rows, picked)):
            tokens[b].append(token)
            if token not in eos and len(tokens[b]) < max_new_tokens:
                keep.append(i)
        if not keep:
            break
        if len(keep) < len(rows):
            cache.batch_select_indices(keep)
            rows = [rows[i] for i in keep]
        latest = torch.tensor([[picked[i]] for i in keep], device=logits.device)
        pos = (positions[rows] + torch.tensor([len(tokens[b]) - 1 for b in rows], device=logits.device))[:, None]
        # every sequence left has fed as many tokens: a near tie runs the newest not yet exact again
        step = forward_step(model, cache, latest, pos, fed=[tokens[b] for b in rows])
        logits = step.logits
        read.append(step.kv_read_frac)
        rechecked += step.rechecked
        steps += 1
    seconds = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for b, report in enumerate(reports):
        report.new_tokens = len(tokens[b])
        report.decode_s, report.decode_steps, report.rechecked_steps = seconds, steps, rechecked
        report.kv_read_frac = sum(read) / len(read) if read else 0.0
        report.device_bytes, report.host_bytes = {"weights": weights, **memory["device"]}, memory["host"]
    return tokens


def _check_messages(messages: list) -> None:
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"chat message {i} must be a dict with string 'role' and 'content', got {m!r}")
    if not messages:
        raise ValueError("the prompt is empty (no chat messages)")


def _check_sampling(max_new_tokens, temperature, seed) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")


def eos_ids(model) -> set[int]:
    return set(_as_list(model.generation_config.eos_token_id))


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
