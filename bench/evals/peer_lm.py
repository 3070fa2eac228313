"""A published selection rule (bench.evals.peers) as an lm-evaluation-harness model, for comparing
it with the engine on lm-eval's tasks at the engine's read share, document by document.

`PeerLM` answers `generate_until` requests greedily with the peer: each prompt prefilled exactly
(keeping its last queries for the SnapKV-style rule), then decoded reading, per step, the share of
host tokens given for that document, in practice the share the engine configuration read on it
(its `GenerationReport.kv_read_frac`, wider and exact runs included, from `HybridAttnLM.reports`
after a run on the same documents). Scoring requests are the engine's: exact prefills.
`bench.evals.ruler --peers` runs it.
"""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers import AttentionInterface

from bench.evals.peers import PEER_CACHE, PEERS, WindowQueries
from bench.evals.probes import decode_with, prefilled
from engine.api import GenerationReport, HybridLLM
from engine.generation import eos_ids
from engine.harness import HybridAttnLM, cut_at

CAPTURE = "hybrid_peer_capture"  # the prefill's attention function: the engine's, keeping the last queries


def document_shares(reports: dict[tuple, GenerationReport]) -> dict[tuple, float]:
    """(task, document) -> the share of host tokens read per step in that document's generation."""
    return {key: report.kv_read_frac for key, report in reports.items()}


class PeerLM(HybridAttnLM):
    """lm-eval's view of a peer selection rule decoding `model` (see the module docstring);
    `shares`: (task, document) -> the share of host tokens the peer reads per step there. Each
    generation's read share and steps are kept in `reports`, as the engine's model keeps them."""

    def __init__(self, peer: str, shares: dict[tuple, float], model, tokenizer, **kwargs):
        if peer not in PEERS:
            raise ValueError(f"unknown peer {peer!r}: one of {', '.join(PEERS)}")
        super().__init__(llm=HybridLLM(model, tokenizer, PEER_CACHE), **kwargs)
        self.peer, self.shares = peer, shares

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        model, chunk, eos = self.llm.model, self.llm.offload.prefill_chunk, eos_ids(self.llm.model)
        results = []
        for i, request in enumerate(tqdm(requests, desc=f"{self.peer} generate_until", disable=disable_tqdm)):
            key = getattr(request, "task_name", None), getattr(request, "doc_id", i)
            if key not in self.shares:
                raise KeyError(f"no read share for task {key[0]!r}, document {key[1]}: run the engine on it first")
            until, max_new, sampling = self._generation_args(request.args[1])
            if sampling["temperature"]:
                raise ValueError(f"the peers decode greedily; task {key[0]!r} asks for sampling")
            ids = self._prompt_ids(request.args[0], max_new).to(self.device)[None]
            window = WindowQueries()
            AttentionInterface.register(CAPTURE, window)
            source, logits = prefilled(model, ids, PEER_CACHE, chunk, CAPTURE)
            steps = []
            try:
                rule = PEERS[self.peer](min(1.0, self.shares[key]), window)
                tokens = decode_with(model, source, logits, max_new, eos, rule, PEER_CACHE, steps)
            finally:
                source.release()
            read = sum(s["kv_read_frac"] for s in steps) / len(steps) if steps else 0.0
            self.reports[key] = GenerationReport(
                prompt_tokens=ids.shape[1], new_tokens=len(tokens), decode_steps=len(steps), kv_read_frac=read
            )
            results.append(cut_at(self.tokenizer.decode(tokens, skip_special_tokens=True), until))
            self.cache_hook.add_partial("generate_until", request.args, results[-1])
        return results
