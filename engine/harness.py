"""The engine as an lm-evaluation-harness model, registered as `hybridattn`
(`pip install -e ".[eval]"`; importing this module registers it).

    import lm_eval
    import engine.harness

    lm_eval.simple_evaluate(
        model="hybridattn",
        model_args="pretrained=smollm2-135m,preset=default,window=512",
        tasks=["ruler_vt"],
        metadata={"max_seq_lengths": [4096], "tokenizer": engine.harness.tokenizer_source("smollm2-135m")},
    )

or `hybridattn eval --lm-eval ruler_vt --seq-lengths 4096` from the command line.

Model arguments: `pretrained` (the bundled name, a local directory, a `.gguf` file or a hub
id served from the local cache), `preset`, any OffloadConfig field, `dtype`, `device`,
`batch_size`, `max_length`, `max_gen_toks`, `trust_remote_code` (off unless given), and
`tokenizer` (read by tasks that build their data with it, such as RULER; the model uses
its own).

What the engine changes, by request type:
- `generate_until`: everything a user of the engine gets. The prompt is prefilled exactly,
  every new token comes from the retrieval decode step, near ties are re-checked as the
  preset says; generation stops at an `until` string, the end-of-sequence token or
  `max_gen_toks`. Requests with the same generation arguments run as batches of
  `batch_size` (each result what its prompt gives alone). Each request's GenerationReport
  (read share, re-checks) is kept in `reports`, by task and document.
- `loglikelihood`, `loglikelihood_rolling`: nothing. Scoring a continuation is a prefill,
  and the engine's prefill is exact (chunked through its cache, so a long context stays
  within the device's memory): the log-probabilities are full attention's.
"""

from __future__ import annotations

import json
import logging

import torch
from tqdm.auto import tqdm

from engine.api import GenerationReport, HybridLLM
from engine.cache import HybridCache
from engine.config import OffloadConfig
from engine.models import BUNDLED_NAME
from engine.prefill import chunk_bounds

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ModuleNotFoundError as exc:  # an optional extra
    raise ModuleNotFoundError(
        'the lm-evaluation-harness model needs lm-eval: pip install -e ".[eval]"', name=exc.name
    ) from exc

log = logging.getLogger(__name__)

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tokenizer_source(pretrained: str) -> str:
    """Where a task that builds its own data (RULER) can load the model's tokenizer from."""
    if pretrained == BUNDLED_NAME:
        from engine.models import _bundled_safetensors_dir

        return str(_bundled_safetensors_dir())
    return pretrained


def task_manager(tasks: list[str], include_path=None, metadata: dict | None = None):
    """lm-eval's TaskManager for `tasks`: the tasks of `include_path` alone when every one asked
    for is a task there, else lm-eval's own tasks too. Indexing lm-eval's own reads thousands of
    YAML files (about 10 s on 2 cores), which a run of local tasks does not need; groups and tags
    may name lm-eval's tasks, so asking for one indexes them all."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False, metadata=metadata)
        if set(tasks) <= set(local.all_subtasks):
            return local
    return TaskManager(include_path=include_path, metadata=metadata)


def offload_config(preset: str, fields: dict) -> OffloadConfig:
    """The preset with the OffloadConfig fields given as model arguments (values as lm-eval parses
    them: numbers and booleans converted, the rest strings; a dict field as JSON)."""
    known = {item.name: item for item in OffloadConfig.described()}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(
            f"unknown model argument(s) {', '.join(unknown)}: the hybridattn model takes pretrained, preset, "
            "dtype, device, batch_size, max_length, max_gen_toks, trust_remote_code, tokenizer and the "
            "OffloadConfig fields"
        )
    values = {}
    for name, value in fields.items():
        kind = known[name].type
        if kind is dict and isinstance(value, str):
            value = json.loads(value)
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        values[name] = value
    return OffloadConfig.preset(preset, **values)


@register_model("hybridattn")
class HybridAttnLM(TemplateLM):
    """lm-evaluation-harness's view of a HybridLLM (see the module docstring)."""

    def __init__(
        self,
        pretrained: str = BUNDLED_NAME,
        preset: str = "default",
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        trust_remote_code: bool = False,
        tokenizer: str | None = None,
        llm: HybridLLM | None = None,
        **fields,
    ):
        super().__init__()
        if device is not None:
            fields["device"] = device
        batch = batch_size if isinstance(batch_size, int) and not isinstance(batch_size, bool) else 0
        if isinstance(batch_size, str) and batch_size.isdigit():
            batch = int(batch_size)
        if batch < 1:
            raise ValueError(f"batch_size must be an int >= 1 (sequences decoded together), got {batch_size!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            raise ValueError(f"max_gen_toks must be an int >= 1, got {max_gen_toks!r}")
        if trust_remote_code not in (True, False):  # lm-eval hands "no" on as a string: bool("no") is True
            raise ValueError(f"trust_remote_code must be True or False, got {trust_remote_code!r}")
        if llm is None:
            offload = offload_config(preset, fields)
            llm = HybridLLM.from_pretrained(
                pretrained, offload=offload, dtype=DTYPES[dtype], trust_remote_code=bool(trust_remote_code)
            )
        elif fields:
            raise ValueError("give a HybridLLM (llm=) or offload fields, not both: the HybridLLM has its configuration")
        self.llm, self.tokenizer = llm, llm.tokenizer
        self.pretrained, self.batch_size, self.max_gen_toks = pretrained, batch, max_gen_toks
        self.reports: dict[tuple, GenerationReport] = {}  # (task, doc id) -> its generation's report
        config = llm.model.config
        self._max_length = int(max_length or getattr(config, "max_position_embeddings", 0) or 2048)

    # ------------------------------------------------------- what lm-eval asks

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is scored after: BOS where the tokenizer has one (as lm-eval's `hf`
        model), else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self.llm.device

    @property
    def tokenizer_name(self) -> str:
        return str(self.pretrained).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # ------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same generation arguments, in order
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="hybridattn generate_until", disable=disable_tqdm)
        for members in groups.values():
            until, max_new, sampling = self._generation_args(requests[members[0]].args[1])
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                prompts = [self._prompt_ids(requests[i].args[0], max_new) for i in batch]
                out = self.llm.generate(prompts, max_new, stop=until, progress=False, **sampling)
                for i, result in zip(batch, out):
                    results[i] = result.text  # ended at the first `until` string, cut before it
                    self.reports[getattr(requests[i], "task_name", None), getattr(requests[i], "doc_id", i)] = (
                        result.report
                    )
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                bar.update(len(batch))
        bar.close()
        return results

    def _generation_args(self, gen_kwargs: dict) -> tuple[list[str], int, dict]:
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generation arguments must be a dict, got {gen_kwargs!r}")
        args = dict(gen_kwargs)
        until = args.pop("until", None) or []
        until = [u for u in ([until] if isinstance(until, str) else until) if u]  # an empty one stops nothing
        max_new = int(args.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(args.pop("do_sample", False))
        temperature = float(args.pop("temperature", 0.0) or 0.0)
        top_k = int(args.pop("top_k", 0) or 0)
        top_p = float(args.pop("top_p", 1.0) or 1.0)
        seed = int(args.pop("seed", 0) or 0)
        if args:
            log.warning("hybridattn: generation arguments not used: %s", ", ".join(sorted(args)))
        sampling = {"temperature": temperature if do_sample else 0.0, "top_k": top_k, "top_p": top_p, "seed": seed}
        return until, max_new, sampling

    def _prompt_ids(self, context: str, max_new: int) -> torch.Tensor:
        """The context's tokens, the oldest dropped if they and max_new would not fit in max_length."""
        ids = self.tok_encode(context)
        keep = max(1, self.max_length - max_new)
        if len(ids) > keep:
            log.warning("hybridattn: a prompt of %d tokens is cut to its last %d", len(ids), keep)
            ids = ids[-keep:]
        return torch.tensor(ids, dtype=torch.long)

    # --------------------------------------------------------------- scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for key, context, continuation in tqdm(requests, desc="hybridattn loglikelihood", disable=disable_tqdm):
            logprob, greedy = self.score(context, continuation)
            out.append((logprob, greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (logprob, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in tqdm(requests, desc="hybridattn loglikelihood_rolling", disable=disable_tqdm):
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            total = sum(self.score(*make_disjoint_window(w))[0] for w in windows)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    @torch.inference_mode()
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log p(continuation | context) and whether greedy decoding gives the continuation:
        one exact prefill of context + continuation (without its last token) through a
        HybridCache, logits kept for the continuation's positions only."""
        if not continuation:
            raise ValueError("a continuation to score must have at least one token")
        whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
        ids = torch.tensor(whole[:-1], dtype=torch.long, device=self.device)[None]
        T = ids.shape[1]
        n = min(len(continuation), T)  # a continuation longer than max_length: its last tokens
        model, chunk = self.llm.model, self.llm.offload.prefill_chunk
        cache = HybridCache(model, self.llm.offload, max_length=T, progress=False, stores=self.llm.stores)
        try:
            logits = []
            for start, end in chunk_bounds(T, chunk):
                keep = end - max(start, T - n)  # the chunk's positions that predict continuation tokens
                out = model(input_ids=ids[:, start:end], cache=cache, use_cache=True, logits_to_keep=max(1, keep))
                if keep > 0:
                    logits.append(out.logits[0, -keep:])
        finally:
            cache.release()
        logprobs = torch.log_softmax(torch.cat(logits).float(), dim=-1)  # [n, vocab]
        target = torch.tensor(continuation[-n:], device=logprobs.device)
        total = float(logprobs.gather(1, target[:, None]).sum())
        return total, bool((logprobs.argmax(dim=-1) == target).all())
