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
            f"keys scored by the host index {100 * self.keys_scored_frac:.2f}%\n"
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

    def generate(self, prompt, max_new_tokens: int = 64, **kwargs) -> GenerationResult:
        """Generate up to `max_new_tokens` tokens (greedy unless temperature > 0)."""
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
            for step in range(max_new_tokens):
                token = _pick(logits, temperature, generator)
                report.new_tokens = step + 1
                yield token
                if token in eos or step == max_new_tokens - 1:
                    break
                out = self.model(input_ids=torch.tensor([[token]], device=self.device), cache=cache, use_cache=True)
                logits = out.logits[0, -1]
                stats = cache.step_stats()
                read.append(stats["kv_read_frac"])
                scored.append(stats["keys_scored_frac"])
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
