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
  `max_gen_toks` (or its other spellings, as lm-eval reads them). Requests with the same
  generation arguments run as batches of `batch_size` (greedy, each result what its prompt
  gives alone); sampling, each batch draws with its own seed (the task's `seed` for the first,
  else one from torch's generator, which lm-eval seeds), so a repeated request draws again.
  Each request's GenerationReport (read share, re-checks) is kept in `reports`, by task and
  document (a repeated request's k-th repeat by task, document and k).
- `loglikelihood`, `loglikelihood_rolling`: nothing. Scoring a continuation is a prefill,
  and the engine's prefill is exact (chunked through its cache, so a long context stays
  within the device's memory): the log-probabilities are full attention's.
"""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

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
    from lm_eval.models.utils import normalize_gen_kwargs
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


@contextmanager
def tokenizer_folder(tokenizer):
    """A temporary folder holding `tokenizer` (the one the engine loaded), for tasks that load the model's
    tokenizer to build their data (RULER): they load it with `trust_remote_code`, so they get one without
    the model folder's code (its `auto_map` dropped), which the engine never ran unless asked to."""
    with tempfile.TemporaryDirectory(prefix="hybridattn-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        config = Path(folder) / "tokenizer_config.json"
        if config.is_file():
            settings = json.loads(config.read_text())
            settings.pop("auto_map", None)
            config.write_text(json.dumps(settings, indent=2))
        yield folder


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


def report_key(request, i: int) -> tuple:
    """A generation's report's key in `reports`: the request's task and document (its index i in the
    requests where lm-eval gave no document id)."""
    doc = getattr(request, "doc_id", None)
    return getattr(request, "task_name", None), i if doc is None else doc


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
        if max_length is not None and (
            not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2
        ):
            raise ValueError(f"max_length must be an int >= 2 (tokens of context and answer), got {max_length!r}")
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
        # (task, doc id) -> its generation's report; a request repeated keeps its k-th repeat's under (task, doc id, k)
        self.reports: dict[tuple, GenerationReport] = {}
        config = llm.model.config
        self._max_length = max_length or getattr(config, "max_position_embeddings", 0) or 2048

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
        """The string's tokens; by default with the special tokens the tokenizer adds (BOS, for Llama's),
        unless the string begins with BOS already (as lm-eval's `hf` model)."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

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
        repeats: dict[tuple, int] = {}  # a request lm-eval repeats (a task's `repeats`) comes as often
        bar = tqdm(total=len(requests), desc="hybridattn generate_until", disable=disable_tqdm)
        for members in groups.values():
            until, max_new, sampling = self._generation_args(requests[members[0]].args[1])
            # each batch its own seed, so that a request repeated draws another sample each time; drawn
            # from torch's generator, which lm-eval seeds, where the task gives none
            first_seed = sampling.pop("seed")
            if first_seed is None:
                first_seed = int(torch.randint(2**62, ())) if sampling["temperature"] else 0
            for n, start in enumerate(range(0, len(members), self.batch_size)):
                batch = members[start : start + self.batch_size]
                prompts = [self._prompt_ids(requests[i].args[0], max_new) for i in batch]
                seed = (first_seed + n) % 2**64
                out = self.llm.generate(prompts, max_new, stop=until, progress=False, seed=seed, **sampling)
                for i, result in zip(batch, out):
                    results[i] = result.text  # ended at the first `until` string, cut before it
                    key = report_key(requests[i], i)
                    repeats[key] = repeats.get(key, -1) + 1
                    self.reports[(*key, repeats[key]) if repeats[key] else key] = result.report
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                bar.update(len(batch))
        bar.close()
        return results

    def _generation_args(self, gen_kwargs: dict) -> tuple[list[str], int, dict]:
        """The stop strings, the most new tokens and the sampling arguments, read as lm-eval's other models
        read them (`normalize_gen_kwargs`: `max_new_tokens` for `max_gen_toks`, say; a temperature above 0
        without `do_sample` samples). The seed is the first batch's; the sampler draws one where none is given."""
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generation arguments must be a dict, got {gen_kwargs!r}")
        args = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = [u for u in args.pop("until") if u]  # an empty one stops nothing
        max_new = args.pop("max_gen_toks")
        if max_new < 1:
            raise ValueError(f"max_gen_toks must be >= 1, got {max_new}")
        do_sample = bool(args.pop("do_sample"))
        temperature = float(args.pop("temperature", 0.0) or 0.0)
        top_k = int(args.pop("top_k", 0) or 0)
        top_p = args.pop("top_p", None)
        top_p = 1.0 if top_p is None else float(top_p)  # 0 is refused by the sampler's check, not read as 1
        seed = args.pop("seed", None)
        if args:
            log.warning("hybridattn: generation arguments not used: %s", ", ".join(sorted(args)))
        sampling = {"temperature": temperature if do_sample else 0.0, "top_k": top_k, "top_p": top_p, "seed": seed}
        return until, max_new, sampling

    def _prompt_ids(self, context: str, max_new: int) -> torch.Tensor:
        """The context's tokens, the oldest dropped if they and max_new would not fit in max_length."""
        if max_new >= self.max_length:
            raise ValueError(
                f"max_gen_toks ({max_new}) leaves no room for the prompt within max_length ({self.max_length})"
            )
        ids = self.tok_encode(context)
        keep = self.max_length - max_new
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
