"""The GPU check's correctness cases (bench.gpu_check), on a toy random-weight Llama on the device:
exactness against full attention with budgets that read every token, conservation of positions,
and a prefix's rewind (engine.prefix) and its file (engine.prefix_file). Without CUDA they run on the CPU at
the same sizes."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import DynamicCache

from bench.common.device import peak_bytes, reset_peak
from bench.common.models import LONG_CONTEXT, random_llama
from engine import HybridCache, OffloadConfig
from engine.generation import Decoding
from engine.prefill import prefill_prompt
from engine.prefix import Prefix

BF16_TOL = 0.1  # bf16 logits: max abs difference allowed against bf16 full attention (summation order)
FP32_TOL = 1e-4
# budgets that read every host token (the estimate is then empty): the engine must be exact
COVER_ALL = OffloadConfig.preset("fixed", n_sink=4, window=64, block_size=16, n_blocks=10**6, block_frac=1.0)
TOY = dict(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=32, hidden_size=256)
TOY.update(intermediate_size=512, vocab_size=1000)


def llama(shape: dict, layers: int, dtype: torch.dtype, device, impl: str = "hybrid"):
    """A random-weight Llama of `shape`, built in its dtype on the device, with peaked attention
    (query and key projections x4, as in trained models), so that a wrong token would show."""
    return random_llama(
        shape, layers=layers, dtype=dtype, device=device, attn_implementation=impl, qk_scale=4.0, **LONG_CONTEXT
    )


def exactness_case(dtype: torch.dtype) -> str:
    return f"exactness-{str(dtype).split('.')[-1]}"


@torch.inference_mode()
def exactness(device, dtype, prompt: int, new: int) -> dict:
    """Engine logits and greedy tokens against full attention on the same device, conservation."""
    reset_peak(device)
    model = llama(TOY, 2, dtype, device)
    ids = torch.randint(0, TOY["vocab_size"], (1, prompt + new), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    full = model(ids, use_cache=False).logits.float()  # sdpa without a cache: "hybrid" falls back to it
    cache = HybridCache(model, COVER_ALL.replace(device=device.type), progress=False)
    logits = [
        model(ids[:, s : min(s + 256, prompt)], cache=cache, use_cache=True).logits for s in range(0, prompt, 256)
    ]
    for t in range(prompt, prompt + new):
        logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    diff = float((torch.cat(logits, 1).float() - full).abs().max())
    stats = cache.step_stats()
    conserved = all(
        sorted(torch.cat([torch.from_numpy(p) for p in layer.positions().values()]).tolist())
        == list(range(layer.n_seen))
        for layer in cache.layers
    )
    start = ids[:, :prompt]
    kwargs = dict(max_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(start), pad_token_id=0)
    hybrid = model.generate(
        start, cache=HybridCache(model, COVER_ALL.replace(device=device.type), progress=False), **kwargs
    )
    reference = model.generate(start, cache=DynamicCache(), output_scores=True, return_dict_in_generate=True, **kwargs)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    same = (hybrid[0, prompt:] == reference.sequences[0, prompt:]).tolist()
    first = same.index(False) if False in same else len(same)
    # where the tokens part, full attention's own top two logits must lie within the tolerance
    margin = None
    if first < len(same):
        top2 = reference.scores[first][0].float().topk(2).values
        margin = float(top2[0] - top2[1])
    return {
        "case": exactness_case(dtype),
        "max_abs_logit_diff": diff,
        "tolerance": tol,
        "logits_ok": diff <= tol,
        "greedy_equal": first == len(same),
        "greedy_first_difference": first,
        "greedy_ok": first == len(same) or (dtype != torch.float32 and margin <= tol),
        "reference_margin_there": margin,
        "all_read": stats["gathered"] == stats["host_tokens"],
        "conservation_ok": conserved,
        "evictions_per_layer": cache.layers[0].host.n,
        "peak_device_bytes": peak_bytes(device),
    }


def prefix_case(dtype: torch.dtype) -> str:
    return f"prefix-{str(dtype).split('.')[-1]}"


@torch.inference_mode()
def prefix_rewind(device, dtype, document: int, new: int) -> dict:
    """A document prefilled once (engine.prefix) on the device, two questions after it in turn, the
    first asked again: it must give the same tokens and logits (the rewind undid the second's rows,
    landmarks and lists); with budgets that cover everything, in fp32, the whole prompt's tokens too,
    also after the prefix is extended by the first question (`Prefix.extend`) and the second follows."""
    reset_peak(device)
    model = llama(TOY, 2, dtype, device)
    ids = torch.randint(0, TOY["vocab_size"], (1, document + 40), generator=torch.Generator().manual_seed(2))
    ids, cfg = ids.to(device), COVER_ALL.replace(device=device.type)
    questions = ids[:, document : document + 20], ids[:, document + 20 :]

    def greedy(prefilled) -> tuple[list[int], torch.Tensor]:
        run = Decoding(model, prefilled.cache, prefilled.logits, new)
        tokens = [token for _, token in run]
        return tokens, prefilled.logits.float()

    prefix = Prefix(model, prefill_prompt(model, ids[:, : document - 1], cfg, 256, progress=False), ids[:, :document])
    answers = []
    try:
        for question in (questions[0], questions[1], questions[0]):
            answers.append(greedy(prefix.continued(question, progress=False)))
            prefix.rewind()
        prefix.extend(questions[0], progress=False)  # a conversation's turn kept: the second question after it
        answers.append(greedy(prefix.continued(questions[1], progress=False)))
        prefix.rewind()
        loaded = saved_and_loaded(prefix, cfg)  # the extended state, as a later process would load it
        try:
            answers.append(greedy(loaded.continued(questions[1], progress=False)))
            loaded.rewind()
        finally:
            loaded.release()
    finally:
        prefix.release()
    want = [whole_prompt(model, ids[:, :end], cfg, new, greedy) for end in (document + 20, document + 40)]
    again = answers[2][0] == answers[0][0] and torch.equal(answers[2][1], answers[0][1])
    exact = answers[0][0] == want[0] and answers[3][0] == want[1]
    same_loaded = answers[4][0] == answers[3][0] and torch.equal(answers[4][1], answers[3][1])
    return {
        "case": prefix_case(dtype),
        "same_after_rewind": again,
        "loaded_equals_saved": same_loaded,
        "equals_whole_prompt": answers[0][0] == want[0],
        "extended_equals_whole_prompt": answers[3][0] == want[1],
        "prefix_ok": again and same_loaded and (exact or dtype != torch.float32),
        "peak_device_bytes": peak_bytes(device),
    }


def saved_and_loaded(prefix: Prefix, cfg: OffloadConfig) -> Prefix:
    """The prefix saved to a file and loaded into a new cache on the device (engine.prefix_file)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "document.prefix"
        prefix.save(path, progress=False)
        engine = SimpleNamespace(model=prefix.model, offload=cfg, stores=None)  # what a load takes of a HybridLLM
        return Prefix.load(engine, path, progress=False)


def whole_prompt(model, ids, cfg, new: int, greedy) -> list[int]:
    """The greedy tokens of the prompt prefilled whole."""
    prefilled = prefill_prompt(model, ids, cfg, new, progress=False)
    try:
        return greedy(prefilled)[0]
    finally:
        prefilled.cache.release()
