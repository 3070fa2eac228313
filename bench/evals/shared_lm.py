"""Several decoders answering lm-evaluation-harness's `generate_until` requests from one exact
prefill per prompt: the engine's configurations (bench.evals.probes.CONFIGS) and published
selection rules (bench.evals.peers), compared on lm-eval's tasks document by document.

A prompt's first request prefills it once (the engine's exact chunked prefill, host indexes
built with the first configuration, the prompt's last queries kept for the SnapKV-style rule;
the other configurations take copies of those indexes, as the accuracy evaluation's do), and
every method answers greedily from a copy of that state: each configuration as the engine
decodes, near ties re-checked, then each peer reading per step the share of host tokens the
configuration `peers_at` read on that document, its steps run again included (rows
"peer@config"). `answer_as(method)` chooses whose answers, and whose `reports`, lm-eval gets:
evaluating once per method costs one prefill per document in all, where a model per method
would prefill each document once per method. `bench.evals.ruler` runs it beside lm-eval's own
`hf` model (full attention). With an answer log (bench.evals.answer_log) each prompt's answers
and reports go to it as they come, and a prompt answered there by every method is not asked again.
"""

from __future__ import annotations

from dataclasses import asdict

from tqdm.auto import tqdm
from transformers import AttentionInterface

from bench.evals.answer_log import AnswerLog, request_key
from bench.evals.peers import PEER_CACHE, PEERS, WindowQueries, resident_as
from bench.evals.probes import CONFIGS, copy_state, decode_with, greedy, prefilled
from engine.api import GenerationReport, HybridLLM
from engine.generation import eos_ids
from engine.harness import HybridAttnLM, report_key
from engine.stop import StopStrings

SOURCE = CONFIGS["default"]  # every prompt's prefill: the configurations take copies of its state and indexes

CAPTURE = "hybrid_shared_capture"  # the prefill's attention function: the engine's, keeping the last queries


class SharedPrefillLM(HybridAttnLM):
    """lm-eval's view of the configurations `configs` and the peers `peers` (at the read shares of
    `peers_at`, default the first configuration) decoding `model` from one prefill per prompt
    (see the module docstring). Each method's generations' read shares and steps are kept in
    `reports_of[method]`; `reports` is the method answering now. With `log`, answers and reports
    are kept in it, and read back from it."""

    def __init__(
        self, model, tokenizer, configs: list[str], peers=(), peers_at=None, log: AnswerLog | None = None, **kwargs
    ):
        unknown = [c for c in configs if c not in CONFIGS] + [p for p in peers if p not in PEERS]
        if not configs or unknown:
            raise ValueError(f"configurations of probes.CONFIGS and peers of peers.PEERS, got {unknown or configs}")
        self.peers_at = peers_at or configs[0]
        if peers and self.peers_at not in configs:
            raise ValueError(f"the peers' shares come from {self.peers_at!r}, which is not among {configs}")
        wider = [c for c in configs if CONFIGS[c].window > SOURCE.window or CONFIGS[c].n_sink != SOURCE.n_sink]
        if wider:  # refused at the first prompt's copy otherwise, after a whole full-attention pass
            raise ValueError(f"{', '.join(wider)}: a copy of the default's prefill needs its sinks and no wider window")
        super().__init__(llm=HybridLLM(model, tokenizer, CONFIGS[configs[0]]), **kwargs)
        self.configs, self.peers = list(configs), list(peers)
        self.methods = self.configs + [f"{peer}@{self.peers_at}" for peer in self.peers]
        self.answers: dict[str, dict[str, str]] = {}  # request_key(a request's arguments) -> each method's answer
        self.log = log
        self.reports_of: dict[str, dict[tuple, GenerationReport]] = {m: {} for m in self.methods}
        self.answer_as(self.methods[0])

    def answer_as(self, method: str) -> None:
        """Answer, and report, as `method` (one of `methods`) from now on."""
        if method not in self.methods:
            raise ValueError(f"unknown method {method!r}: one of {', '.join(self.methods)}")
        self.method, self.reports = method, self.reports_of[method]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for i, request in enumerate(tqdm(requests, desc=f"{self.method} generate_until", disable=disable_tqdm)):
            seen = request_key(request.args)
            if seen not in self.answers:
                key = report_key(request, i)
                self.answers[seen] = self._logged(key, request.args) or self._answer_and_log(key, request.args)
            results.append(self.answers[seen][self.method])
            self.cache_hook.add_partial("generate_until", request.args, results[-1])
        return results

    def _logged(self, key: tuple, args) -> dict[str, str] | None:
        """Every method's answer to a request from the log, their reports kept under `key`; None
        unless the log has them all."""
        entries = {m: self.log.get(m, args) for m in self.methods} if self.log else {}
        if not entries or None in entries.values():
            return None
        for method, entry in entries.items():
            self.reports_of[method][key] = GenerationReport(**entry["report"])
        return {method: entry["answer"] for method, entry in entries.items()}

    def _answer_and_log(self, key: tuple, args) -> dict[str, str]:
        """`_answer_all`, each method's answer and report then written to the log (if any)."""
        answers = self._answer_all(key, *args)
        for method in self.methods if self.log else ():
            self.log.add(method, args, answers[method], asdict(self.reports_of[method][key]))
        return answers

    def _answer_all(self, key: tuple, context: str, gen_kwargs: dict) -> dict[str, str]:
        """Every method's answer to one request, from one prefill; their reports kept under `key`."""
        until, max_new, sampling = self._generation_args(gen_kwargs)
        if sampling["temperature"]:
            raise ValueError(f"the methods are compared decoding greedily; task {key[0]!r} asks for sampling")
        model, eos = self.llm.model, eos_ids(self.llm.model)
        ids = self._prompt_ids(context, max_new).to(self.device)[None]
        window = WindowQueries()
        AttentionInterface.register(CAPTURE, window)
        # the default's prefill, whichever configuration comes first: its window is the widest and it builds the key
        # index the others' copies take (the first of ["exact", ...] built none; ["fixed", ...] had too short a window)
        source, logits = prefilled(model, ids, SOURCE, self.llm.offload.prefill_chunk, CAPTURE)
        tokens, steps = {}, {m: [] for m in self.methods}
        try:
            model.set_attn_implementation("hybrid")
            for name in self.configs:
                cache = copy_state(source, model, CONFIGS[name])
                tokens[name] = greedy(model, cache, logits, max_new, eos, steps[name])
            share = min(1.0, _mean([s["kv_read_frac"] for s in steps[self.peers_at]]))
            for peer, method in zip(self.peers, self.methods[len(self.configs) :]):
                rule = PEERS[peer](share, window)
                cache = resident_as(PEER_CACHE, CONFIGS[self.peers_at])
                tokens[method] = decode_with(model, source, logits, max_new, eos, rule, cache, steps[method])
        finally:
            source.release()
        for method in self.methods:
            self.reports_of[method][key] = GenerationReport(
                prompt_tokens=ids.shape[1],
                new_tokens=len(tokens[method]),
                decode_steps=len(steps[method]),
                kv_read_frac=_mean([s["kv_read_frac"] for s in steps[method]]),
                rechecked_steps=sum(s["rechecked"] for s in steps[method]),
                widened_steps=sum(s["widened"] for s in steps[method]),
                wider_runs=sum(s["wider_runs"] for s in steps[method]),
            )
        stops = StopStrings(self.tokenizer, until)  # answers cut at them; the read shares are of every step taken
        return {m: stops.cut(stops.text(t)) for m, t in tokens.items()}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
