"""The query lists' search and the blocks' products with the native bf16 ones (`ops.query_dots`:
AVX512-BF16 where the CPU has it, else the values widened to fp32 lanes; `ops.weighted_rows`) against
torch's, on one layer of a synthetic context (bench.common.caches) and the model's own decode queries.

Per context:
- product_ms / product_ms_torch: the product of a step's queries with the layer's build queries
  alone, repeated (warm);
- step_ms / step_ms_torch: the layer's decode step (engine.decode.step.native_step) with each
  product, their steps in turns, medians; `same_output`: whether the two steps' outputs were equal
  to the bit at every step compared; kv_read_frac: the host KV rows a step read, as a share (mean).
- blocks_step_ms / blocks_step_ms_torch: the step with the blocks' products (the scores of the summary's
  mean keys and of the block index's landmarks, and the estimate's weighted mean values) through the
  engine's (`engine.decode.estimate.block_dots` and `block_sums`: for bf16 landmarks on the CPU the same
  kernel and `ops.weighted_rows`, which read the expanded blocks' rows where they lie) and through
  torch's (the rows gathered first, `ann.block.head_rows`, then `block_matmul`), in turns, and
  `blocks_same_output` as above (the estimate's sums run in another order: equal up to their rounding).
`bf16_dots` says which native path ran. Where the build queries are not bf16 with a dimension that is a
multiple of 32, both use torch's product, and `native` says so.

    python -m bench.speed.query_dots [--quick] [--json PATH] [--models ...] [--contexts ...] [--threads N]
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from ann.qq import bmm_dots
from bench.common.options import parser, positive_int
from bench.common.output import save_run
from bench.common.timing import median_ms
from bench.speed.host_side import layer_args, recorded_contexts
from engine.cli import run_script
from engine.decode import estimate, step
from engine.index import heads
from engine.native import ops


@torch.inference_mode()
def measure(layer, queries: list[torch.Tensor], scale: float, rounds: int) -> dict:
    """Both products alone and within the step, steps in turns (see the module doc)."""
    lists = layer.key_index.lists
    unit = torch.nn.functional.normalize(queries[0][:, :, 0].float(), dim=-1).to(lists.dtype)  # [Hkv, G, D]
    native = lists.queries.dtype == torch.bfloat16 and ops.query_dots_native(lists.queries)
    row = {"native": native, "bf16_dots": native and ops.bf16_dots_available(), "build_queries": lists.n_queries}
    row["product_ms"] = median_ms(lambda: heads.build_query_dots(unit, lists.queries), rounds)
    row["product_ms_torch"] = median_ms(lambda: bmm_dots(unit, lists.queries), rounds)
    chosen = heads.build_query_dots

    def lists_product(name):
        heads.build_query_dots = chosen if name == "native" else bmm_dots

    try:
        step_ms, step_ms_torch, row["same_output"], reads = steps_in_turns(layer, queries, scale, rounds, lists_product)
    finally:
        heads.build_query_dots = chosen
    row["step_ms"], row["step_ms_torch"], row["kv_read_frac"] = step_ms, step_ms_torch, statistics.mean(reads)
    if layer.summary is not None:
        row |= block_products(layer, queries, scale, rounds)
    return row


def block_products(layer, queries: list[torch.Tensor], scale: float, rounds: int) -> dict:
    """The step with the blocks' products through the engine's (`estimate.block_dots` and `block_sums`: the
    native ones for bf16 landmarks on the CPU) and through torch's (`estimate.block_dots_torch` and
    `block_sums_torch`: `head_rows`, then `block_matmul`, widened where that widens), in turns:
    blocks_step_ms, blocks_step_ms_torch, blocks_same_output."""
    indexes = {id(i): i for i in (layer.blocks, layer.summary.keys) if i is not None}.values()
    chosen = estimate.block_dots, estimate.block_sums
    in_torch = estimate.block_dots_torch, estimate.block_sums_torch

    def blocks_product(name):
        estimate.block_dots, estimate.block_sums = chosen if name == "native" else in_torch
        for index in indexes:
            index.dots = estimate.block_dots

    try:
        native_ms, torch_ms, same, _ = steps_in_turns(layer, queries, scale, rounds, blocks_product)
    finally:
        blocks_product("native")
    return {"blocks_step_ms": native_ms, "blocks_step_ms_torch": torch_ms, "blocks_same_output": same}


def steps_in_turns(layer, queries: list[torch.Tensor], scale: float, rounds: int, use) -> tuple:
    """The layer's decode steps on the recorded queries, `use("native")` and `use("torch")` in turns:
    (median ms per step of each, whether their outputs were equal to the bit at every step, the read
    shares)."""
    times, same, reads = {"native": [], "torch": []}, True, []
    for r in range(rounds):
        outputs = {}
        for name in ("native", "torch") if r % 2 else ("torch", "native"):
            use(name)
            start = time.perf_counter()
            outputs[name] = []
            for q in queries:
                outputs[name].append(step.native_step([layer], q[None], scale))
                reads.append(layer.stats.gathered / (layer.n_kv_heads * layer.stats.host_tokens))
            times[name].append((time.perf_counter() - start) * 1e3 / len(queries))
        same &= all(torch.equal(a, b) for a, b in zip(outputs["native"], outputs["torch"]))
    return statistics.median(times["native"]), statistics.median(times["torch"]), same, reads


def run(args) -> list[dict]:
    rows = []
    for model_name, context, layer, queries, scale in recorded_contexts(args):
        times = measure(layer, queries, scale, args.rounds)
        row = {"model": model_name, "context": context}
        row |= {k: round(v, 4) if isinstance(v, float) else v for k, v in times.items()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    p = parser(__doc__, __spec__)
    p.add_argument("--rounds", type=positive_int, default=30, help="rounds of the recorded steps, in turns")
    args = layer_args(p, argv, [8192, 131072])
    save_run(args, {"contexts": args.contexts, "rounds": args.rounds}, run(args))


if __name__ == "__main__":
    run_script(main)
