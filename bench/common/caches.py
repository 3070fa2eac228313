"""Caches that hold a long context without its prefill (a prefill of 128K tokens is far out
of a CPU's reach): keys, values and the prefill queries the host indexes are built from,
drawn per channel with the means and spreads a short real prefill of the model shows.
Decode then runs the real model on them.

Two kinds of context. `flat`: every position drawn alike, so the decode token's attention
is flat and a selection that reads the likely tokens reads next to nothing. `prose` (the
default): the same draw, and then a share of the positions, in runs that gather in clusters,
gets a heavy-tailed push along the decode token's query direction, so that its attention
has the shape real text gives it (see `Prose`) and a step reads what it reads on text."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AttentionInterface

from bench.common.timing import Synced
from bench.evals.tasks import FILLER
from engine import HybridCache
from engine.attention import hybrid_attention_forward
from engine.decode.merge import attend, merge_states

FILL_CHUNK = 65536  # positions a hybrid cache's layer takes at a time, as a prefill hands them over
PIECE = 4096  # positions drawn from one seed: a context is the same however a cache takes it in
RECORD_STATS = "record_stats"
FILL_PROSE = "fill_prose"
DECODE_TOKEN = 17  # the token the speed benchmarks decode; a prose context answers its queries
DECODE_SPAN = 64  # ... at the positions a benchmark decodes, the first this many after the context,
PROBES = 16  # ... of which this many, evenly spaced, are run through the model to learn where its queries point
CONTEXTS = ("prose", "flat")


def add_context_arg(p) -> None:
    """--context: the synthetic context a benchmark decodes in (`fill`'s `context`)."""
    p.add_argument(
        "--context",
        choices=CONTEXTS,
        default="prose",
        help="synthetic context: `prose` (attention in runs and clusters, as on text) or `flat` (i.i.d. draws)",
    )


ChannelStats = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (mean, std) of keys, values [Hkv, D], queries [Hq, D]


@dataclass(frozen=True)
class Stats:
    """The channel statistics of a short real prefill of `model`, per layer (iterating a Stats
    gives them layer by layer), and the model itself: a prose context runs the decode token
    through it to learn where its queries point."""

    layers: list[ChannelStats]
    model: torch.nn.Module = field(repr=False)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> ChannelStats:
        return self.layers[i]

    @property
    def device(self) -> torch.device:
        return self.layers[0][0][0].device


@torch.inference_mode()
def channel_stats(model, tok, n_tokens: int = 1024) -> Stats:
    """Per layer: the mean and std per channel of keys, values [Hkv, D] and queries [Hq, D]
    over a short real prefill (filler prose, or random token ids for a model without a
    tokenizer), on the model's device. The model's attention implementation is left as it was."""
    if tok is not None:
        ids = tok(" ".join([FILLER] * (n_tokens // 20)), return_tensors="pt").input_ids[:, :n_tokens]
    else:
        ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    seen = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = tuple((t[0].float().mean(1), t[0].float().std(1)) for t in (key, value, query))
        return hybrid_attention_forward(module, query, key, value, attention_mask, **kwargs)

    with attention_implementation(model, RECORD_STATS, record):
        model(ids.to(next(model.parameters()).device), use_cache=False)
    return Stats([seen[i] for i in range(model.config.num_hidden_layers)], model)


@contextlib.contextmanager
def attention_implementation(model, name: str, function):
    """`model` attends through `function` (registered as `name`) inside the block. Registrations
    are global and outlive the block: `name` is left to a stub, so that `function` and what its
    closure holds (a whole cache, for `fill`) can go when the block ends."""
    AttentionInterface.register(name, function)
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
        AttentionInterface.register(name, _outside_its_block)


def _outside_its_block(module, *args, **kwargs):
    raise RuntimeError("this attention implementation is registered only inside attention_implementation()")


@dataclass(frozen=True)
class Prose:
    """Where the tokens the decode token attends to lie in a prose context, and how much.

    A share `run_share` of the positions lies in runs of `shortest` to `longest` consecutive
    positions (log-uniform: many short runs, a few long ones), and the runs gather in
    clusters of `runs_per_cluster` around a centre (normal, `cluster_spread` positions), as
    the sentences about one thing do. Each run's keys get a component along its KV head's
    decode query direction that raises the group's logits by `boost` plus an exponential
    extra of mean `tail` nats (weights with a Pareto tail of index 1 / tail: a few heavy
    hitters); the other positions stay as drawn, diffuse. The same layout holds at every
    length, so the tokens that matter grow with the context as they do in text."""

    run_share: float = 0.05
    shortest: int = 2
    longest: int = 40
    runs_per_cluster: int = 8
    cluster_spread: float = 256.0
    boost: float = 7.0
    tail: float = 1.0

    def __post_init__(self):
        if not 0 < self.run_share <= 1:
            raise ValueError(f"Prose.run_share must lie in (0, 1], got {self.run_share!r}")
        if not 1 <= self.shortest <= self.longest:
            raise ValueError(f"Prose needs 1 <= shortest <= longest, got {self.shortest!r} and {self.longest!r}")
        if self.runs_per_cluster < 1:
            raise ValueError(f"Prose.runs_per_cluster must be at least 1, got {self.runs_per_cluster!r}")
        for name in ("cluster_spread", "boost", "tail"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ValueError(f"Prose.{name} must be a finite number >= 0, got {value!r}")

    def strengths(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """[n] fp32 (CPU): each position's logit boost in nats, 0 outside the runs."""
        budget = max(1, round(self.run_share * n))
        longest = min(self.longest, n)
        shortest = min(self.shortest, longest)
        u = torch.rand(budget // shortest + 1, generator=gen, dtype=torch.float64)
        lengths = torch.exp(math.log(shortest) + u * math.log((longest + 1) / shortest)).long().clamp(max=longest)
        lengths = lengths[: max(1, int((lengths.cumsum(0) <= budget).sum()))]  # [R]: the share, overlaps aside
        n_runs = len(lengths)
        centres = torch.randint(0, n, (-(-n_runs // self.runs_per_cluster),), generator=gen)
        spread = torch.randn(n_runs, generator=gen, dtype=torch.float64) * self.cluster_spread
        cluster = centres[torch.randint(0, len(centres), (n_runs,), generator=gen)]
        starts = (cluster + spread.round().long() - lengths // 2).clamp(min=0)
        starts = torch.minimum(starts, n - lengths)
        boosts = self.boost - self.tail * torch.log(torch.rand(n_runs, generator=gen, dtype=torch.float64))
        first = torch.cumsum(lengths, 0) - lengths  # [R] where each run's offsets start
        positions = (
            starts.repeat_interleave(lengths) + torch.arange(int(lengths.sum())) - first.repeat_interleave(lengths)
        )
        out = torch.zeros(n)
        return out.scatter_reduce_(0, positions, boosts.float().repeat_interleave(lengths), "amax")


PROSE = Prose()


def draw(mean: torch.Tensor, std: torch.Tensor, count: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """[H, count, D] rows drawn per channel from N(mean, std²) of each head's mean, std [H, D],
    on the generator's device; head by head: a million fp32 rows of every head at once would not fit."""
    out = torch.empty(mean.shape[0], count, mean.shape[1], dtype=dtype, device=gen.device)
    for h in range(mean.shape[0]):
        noise = torch.randn(count, mean.shape[1], generator=gen, device=gen.device)
        out[h] = (mean[h] + std[h] * noise).to(dtype)
    return out


def seeded(device: torch.device, *key: int) -> torch.Generator:
    """A generator on `device` seeded from the integers `key` (a seed per piece of a context)."""
    return torch.Generator(device=device).manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def decode_push(q: torch.Tensor, scale: float) -> torch.Tensor:
    """The key component [Hkv, D] fp32 of one nat: a key moved by s times it raises the mean
    logit of the decode queries q [Hkv, G, S, D] (G heads of a group, S positions) by s."""
    mean = q.float().mean(dim=(1, 2))  # [Hkv, D]: along its direction the group's logits rise
    length = mean.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return mean / (length * length * scale)


class PieceAttention:
    """Exact attention of queries q [Hkv, G, S, D] over keys and values handed over in chunks
    of any size, merged piece by piece (PIECE positions): the same sums in the same order
    however the chunks fall, so that every cache gets the same context from a seed."""

    def __init__(self, q: torch.Tensor, scale: float, o: torch.Tensor, lse: torch.Tensor):
        self.q, self.scale, self.o, self.lse = q, scale, o, lse
        self.k = self.v = None  # [Hkv, < PIECE, D] waiting for their piece to fill

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        while self.k.shape[1] >= PIECE:
            self._attend(self.k[:, :PIECE], self.v[:, :PIECE])
            self.k, self.v = self.k[:, PIECE:], self.v[:, PIECE:]

    def result(self) -> torch.Tensor:
        """o [Hkv, G, S, D] fp32 over everything added."""
        if self.k is not None and self.k.shape[1]:
            self._attend(self.k, self.v)
            self.k = self.v = None
        return self.o

    def _attend(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.o, self.lse = merge_states(self.o, self.lse, *attend(self.q, k, v, self.scale))


class LayerContext:
    """One layer's context of n positions: `rows(start, stop)` gives the keys and values
    [Hkv, stop - start, D] of those positions, the same however the positions are split,
    `build_queries(count)` the queries [Hq, count, D] a host key index is built from. With
    `push` ([Hkv, D], `decode_push`) the keys of `prose`'s runs move along it by their strength."""

    KEYS, VALUES, QUERIES, LAYOUT = range(4)  # the parts of a layer, each drawn from its own seeds

    def __init__(self, stats: Stats, layer: int, n: int, dtype: torch.dtype, seed: int, prose=None, push=None):
        self.layer, self.n, self.dtype, self.seed, self.device = layer, n, dtype, seed, stats.device
        self.key_stats, self.value_stats, self.query_stats = stats[layer]
        self.strengths = None  # [Hkv, n] fp32 nats
        if push is not None:
            gen = seeded(torch.device("cpu"), seed, layer, self.LAYOUT)
            self.strengths = torch.stack([prose.strengths(n, gen) for _ in range(push.shape[0])]).to(self.device)
            self.push = push.to(self.device)

    def _drawn(self, part: int, start: int, stop: int) -> torch.Tensor:
        """Positions [start, stop) of keys or values [Hkv, stop - start, D] fp32, from the
        pieces of PIECE positions that hold them (each piece its own seed)."""
        mean, std = self.key_stats if part == self.KEYS else self.value_stats
        out = torch.empty(mean.shape[0], stop - start, mean.shape[1], device=self.device)
        for piece in range(start // PIECE, -(-stop // PIECE)):
            lo, hi = max(start, piece * PIECE), min(stop, (piece + 1) * PIECE)
            rows = draw(mean, std, PIECE, torch.float32, seeded(self.device, self.seed, self.layer, part, piece))
            out[:, lo - start : hi - start] = rows[:, lo - piece * PIECE : hi - piece * PIECE]
        return out

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self._drawn(self.KEYS, start, stop)
        if self.strengths is not None:
            keys.add_(self.strengths[:, start:stop, None] * self.push[:, None, :])  # [Hkv, count, D]
        return keys.to(self.dtype), self._drawn(self.VALUES, start, stop).to(self.dtype)

    def build_queries(self, count: int) -> torch.Tensor:
        return draw(*self.query_stats, count, self.dtype, seeded(self.device, self.seed, self.layer, self.QUERIES))


def fill(
    cache,
    stats: Stats,
    n: int,
    *,
    dtype: torch.dtype,
    seed: int = 0,
    context: str = "prose",
    prose: Prose = PROSE,
    chunk: int = FILL_CHUNK,
) -> float:
    """Put n synthetic positions in every layer of `cache`, drawn from `stats` (`channel_stats`)
    on their device, as a `context` of CONTEXTS: "flat", or "prose" laid out by `prose` along the
    decode token's queries at position n (the token runs through the model once, layer by layer,
    attending exactly to each layer's context as it is drawn, so that every layer's push follows
    the queries the layers before give it). The same seed gives every cache the same positions.
    A HybridCache's layers take them chunk by chunk, as a prefill hands them over (a million
    positions' copies at once would not fit), with the build queries its configuration keeps,
    and then build their host indexes; another cache (a DynamicCache) takes each layer's at once.
    Returns the seconds of the index build (synchronised; 0 for other caches)."""
    if context not in CONTEXTS:
        raise ValueError(f"unknown context {context!r}; contexts: {', '.join(CONTEXTS)}")
    for name, value, least in (("n", n, 1), ("chunk", chunk, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"fill: {name} must be an int >= {least}, got {value!r}")
    if not isinstance(stats, Stats):
        raise TypeError(f"fill takes the Stats of channel_stats, got {type(stats).__name__}")
    if not isinstance(prose, Prose):
        raise TypeError(f"fill: prose must be a Prose, got {type(prose).__name__}")
    hybrid = isinstance(cache, HybridCache)

    def put(i: int, source: LayerContext, seen=None) -> None:
        """Layer i's positions into the cache, chunk by chunk; `seen(keys, values)` sees each chunk."""
        if not hybrid:  # one tensor per layer, filled chunk by chunk: a million fp32 rows would not fit
            Hkv, D = stats[i][0][0].shape
            keys, values = (torch.empty(1, Hkv, n, D, dtype=dtype, device=stats.device) for _ in range(2))
        for start in range(0, n, chunk):
            k, v = source.rows(start, min(n, start + chunk))
            if seen is not None:
                seen(k, v)
            if hybrid:
                cache.layers[i].load_kv(k, v)
            else:
                keys[0, :, start : start + k.shape[1]], values[0, :, start : start + k.shape[1]] = k, v
        if hybrid:
            cache.layers[i].add_build_queries(source.build_queries(cache.offload_config.max_build_queries))
        else:
            cache.update(keys, values, i)

    def prose_layer(module, query, key, value, attention_mask, scaling=None, **kwargs):
        """Layer i for the decode token at S positions (a batch of S rows, query [S, Hq, 1, D]):
        its context drawn along their queries and put in the cache; each row attends exactly to
        the context and to itself -> [S, 1, Hq, D]."""
        S, Hq, _, D = query.shape
        Hkv = key.shape[1]
        scale = scaling if scaling is not None else D**-0.5
        q = query[:, :, 0].transpose(0, 1).reshape(Hkv, Hq // Hkv, S, D)  # [Hkv, G, S, D]
        own_k, own_v = (t[:, :, 0].transpose(0, 1).float() for t in (key, value))  # [Hkv, S, D]
        lse = (q.float() * own_k[:, None]).sum(-1) * scale  # [Hkv, G, S]: each row sees its own key alone
        attention = PieceAttention(q, scale, own_v[:, None].expand(q.shape), lse)
        i = module.layer_idx
        put(i, LayerContext(stats, i, n, dtype, seed, prose, decode_push(q, scale)), attention.add)
        return attention.result().to(query.dtype).permute(2, 0, 1, 3).reshape(S, 1, Hq, D), None

    model = stats.model
    with torch.inference_mode():
        if context == "flat":
            for i in range(len(stats)):
                put(i, LayerContext(stats, i, n, dtype, seed))
        else:
            positions = torch.arange(n, n + DECODE_SPAN, DECODE_SPAN // PROBES, device=stats.device)[:, None]
            with attention_implementation(model, FILL_PROSE, prose_layer):
                model(input_ids=torch.full_like(positions, DECODE_TOKEN), position_ids=positions, use_cache=False)
    if not hybrid:
        return 0.0
    with Synced(stats.device) as t:
        cache.build_indexes()
    return t.seconds


def cache_bytes(cache, device: torch.device) -> tuple[int, int]:
    """(device bytes, host bytes) a cache holds, by where its tensors are."""
    if isinstance(cache, HybridCache):
        report = cache.memory_report()
        return sum(report["device"].values()), sum(report["host"].values())
    on_device = on_host = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t.device == device:
                on_device += t.nbytes
            else:
                on_host += t.nbytes
    return on_device, on_host
