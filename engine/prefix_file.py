"""A prefix in a file (`Prefix.save`, `HybridLLM.load_prefix`): a long document prefilled once and
loaded again by later processes, in the time it takes to read its cache.

The file is safetensors (data, not code): the document's token ids and, per layer, the resident set,
the host store's rows, the block summaries and indexes and the host key index, each as the tensors it
holds, so that a loaded prefix is the saved one to the bit and a prompt after it decodes as after the
original. Its metadata names the format, the model (`model_fingerprint`) and the configuration's fields
that shape the cache (`OffloadConfig.state_fields`); a file loads only where all three match. The
file is written as a stream, tensor by tensor (the host store is most of it and is not copied whole),
to a temporary name first, so a failed save leaves no file behind.

The key index saved is the query lists (`key_index="qq"`, the default's) or none
(`candidates_from="blocks"`); the adaptive budget's scorer, a key sketch or the exact keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import struct
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.cache import HybridCache
from engine.cache.layer import HybridLayer
from engine.decode.sketch import KeySketch, make_scorer
from engine.index.heads import ListSelector
from engine.plan import ModelShape
from engine.prefill import RESERVED_NEW_TOKENS, sized_for

log = logging.getLogger(__name__)

# 3: the model's fingerprint reads its whole configuration (2: ten fields of it; 1: only the first and last
# layers' K/V projections of the weights, where 2 and 3 sample every weight)
FORMAT = "hybridattn-prefix/3"
FINGERPRINT_SAMPLES = 4096  # elements of each weight that the model's fingerprint reads
STALE_PARTIAL_S = 3600  # a save's temporary file left this long is a killed process's, not one being written
ROWS_PER_READ = 8192  # host rows read from the file at a time: the store's own memory, not a second copy
# the fields of a model's configuration that its K/V do not depend on (where it was loaded from, with which
# version, its token ids, its dtype: the weights' is read), left out of its fingerprint; every other field counts
# (a norm's epsilon, the activation, RoPE's and a sliding window's parameters change every layer's K/V)
UNRELATED_FIELDS = frozenset(
    (
        "architectures",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "id2label",
        "label2id",
        "problem_type",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "unk_token_id",
        "initializer_range",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "attention_dropout",
        "tie_word_embeddings",
        "auto_map",
        "tokenizer_class",
    )
)
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def model_fingerprint(model) -> str:
    """A digest of what a cache's K/V depend on, read cheaply: the model's configuration (but its
    `UNRELATED_FIELDS` and private ones), its dtype, and of every weight (a layer's K/V depend on every weight
    before it) its name, shape and `FINGERPRINT_SAMPLES` elements evenly apart (a fine-tune moves nearly every
    element of what it trains, a low-rank one too)."""
    config = model.config.to_dict()
    described = {k: v for k, v in config.items() if k not in UNRELATED_FIELDS and not k.startswith("_")}
    described["dtype"] = str(next(model.parameters()).dtype)
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    for name, weight in model.named_parameters():
        flat = weight.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)].contiguous().cpu()
        digest.update(f"{name} {tuple(weight.shape)}".encode())
        digest.update(sample.view(torch.uint8).numpy())
    return digest.hexdigest()


def state_config(cfg) -> dict:
    """The configuration's fields that shape a cache, as the file's metadata records them."""
    return {name: getattr(cfg, name) for name in cfg.state_fields()}


# ----------------------------------------------------------------------- save


def save_prefix(prefix, path, *, extra: dict[str, str] | None = None, progress: bool = True) -> int:
    """Write the engine.prefix.Prefix (between prompts: at the document's state) to `path`, with the strings
    `extra` in its metadata (`saved_extra` reads them back); returns the bytes written."""
    extra = {} if extra is None else extra
    if not isinstance(extra, dict) or not all(isinstance(v, str) and isinstance(k, str) for k, v in extra.items()):
        # (saved_extra would take the file for a damaged one)
        raise TypeError(f"extra must be a dict of strings, got {extra!r}")
    tensors = {"document": prefix.ids[0]}
    for i, layer in enumerate(prefix.cache.layers):
        tensors.update({f"layers.{i}.{name}": t for name, t in layer_state(layer).items()})
    metadata = {
        "format": FORMAT,
        "model": model_fingerprint(prefix.model),
        "config": json.dumps(state_config(prefix.cache.offload_config), sort_keys=True),
        "layers": str(len(prefix.cache.layers)),
        "extra": json.dumps(extra),
    }
    return write_safetensors(Path(path), tensors, metadata, progress=progress)


def layer_state(layer: HybridLayer) -> dict[str, torch.Tensor]:
    """The tensors that make up a layer's state between forward passes (none run again)."""
    if layer.key_index is not None and not isinstance(layer.key_index, ListSelector):
        raise ValueError(
            f"a prefix is saved with the key index 'qq' (the default's) or none; this one's is {layer.cfg.key_index!r}"
        )
    counts = [layer.n_seen, layer.n_indexed, layer.n_built, int(layer.build_waiting)]
    state = {"counts": torch.tensor(counts), "resident_k": layer.resident_k, "resident_v": layer.resident_v}
    state.update(resident_pos=torch.from_numpy(layer.resident_pos), host_k=layer.host.keys, host_v=layer.host.values)
    parts = {"summary": layer.summary, "blocks": layer.blocks if layer.own_blocks else None}
    parts.update(key_index=layer.key_index, sketch=layer.sketch if isinstance(layer.sketch, KeySketch) else None)
    parts["query_sample"] = layer.query_sample if layer.key_index is None and len(layer.query_sample) else None
    for name, part in parts.items():
        if part is not None:
            state.update({f"{name}.{k}": t for k, t in part.state().items()})
    return state


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, progress) -> int:
    """The tensors (on any device, contiguous or not) and the metadata in safetensors' layout: the header, then
    each tensor's bytes in turn, a head at a time where the tensor is not contiguous. Returns the file's size."""
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary file of its own: two saves to one path (two servers sharing a folder) wrote into one,
    # the second's truncation leaving zeros inside the first's, which it then renamed into place
    # (the name cut to leave room for its tail: a name the file system takes was refused with that tail)
    partial = path.with_name(f"{path.name[:200]}.{secrets.token_hex(8)}.partial")
    try:
        with (
            open(partial, "xb") as f,
            tqdm(
                total=offset, unit="B", unit_scale=True, desc="saving prefix", disable=not progress, leave=False
            ) as bar,
        ):
            f.write(struct.pack("<Q", len(head)) + head)
            for t in tensors.values():
                for piece in t.unbind(0) if t.ndim > 1 and not t.is_contiguous() else (t,):
                    data = piece.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
                    f.write(memoryview(data))
                    bar.update(data.nbytes)
            f.flush()
            os.fsync(f.fileno())  # on the disk before its name is: a crash after the rename leaves no hole
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return len(head) + 8 + offset


# ----------------------------------------------------------------------- load


@torch.inference_mode()  # as a prefill: host stores taken from the pool may have been made in it
def load_prefix(llm, path, *, document=None, progress: bool = True) -> tuple[HybridCache, torch.Tensor]:
    """The cache saved at `path`, loaded into a new HybridCache for `llm` (a HybridLLM: its model, configuration
    and pool of host stores), and its document's token ids [1, T] (the cache holds all but the last).
    `document` (ids [1, T]), when given, is what the file must hold. ValueError where the file is not a
    prefix for this model and configuration, or not of that document."""
    path = Path(path)
    with _opened(path) as f:
        ids = _checked_document(f, path, llm, document)
        return _loaded(f, path, llm, ids.shape[1] - 1, progress), ids


def saved_extra(path) -> dict[str, str]:
    """The strings saved beside the prefix at `path` (`save_prefix`'s `extra`; {} where none)."""
    path = Path(path)
    with _opened(path) as f:
        meta = f.metadata() or {}
    try:
        extra = json.loads(meta.get("extra", "{}"))
    except json.JSONDecodeError:
        extra = None
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise ValueError(f"{path} holds a damaged prefix file: its extra metadata is not a map of strings")
    return extra


@contextmanager
def _opened(path: Path):
    """The prefix file at `path` open for reading, its format checked; an unreadable file is a ValueError."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no prefix file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                found = meta.get("format")
                raise ValueError(f"{path} is not a prefix file of this engine (format {found!r}, not {FORMAT!r})")
            yield f
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable prefix file: {error}") from error


def _checked_document(f, path: Path, llm, document) -> torch.Tensor:
    """The file's document ids [1, T], after its model and configuration are checked against `llm`'s."""
    meta = f.metadata()
    if meta.get("model") != model_fingerprint(llm.model):
        raise ValueError(f"{path} holds a prefix of another model (or other weights, dtype or RoPE scaling)")
    saved, mine = json.loads(meta.get("config", "{}")), json.loads(json.dumps(state_config(llm.offload)))
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is damaged: its configuration is not a map of fields")
    differ = [name for name in mine if saved.get(name) != mine[name]]
    if differ:
        fields = ", ".join(f"{name}={saved.get(name)!r}" for name in differ)
        raise ValueError(f"{path} was saved under another configuration: load it with {fields}")
    ids = read_tensor(f, "document").long()[None]
    if ids.shape[1] < 2:
        raise ValueError(f"{path} holds a document of {ids.shape[1]} tokens; a prefix holds at least 2")
    vocab = llm.model.get_input_embeddings().num_embeddings
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"{path} is damaged: its document holds token ids outside the vocabulary [0, {vocab})")
    if document is not None and not torch.equal(document.cpu().long(), ids):
        raise ValueError(f"{path} holds another document ({ids.shape[1]} tokens), not this one")
    return ids


def _loaded(f, path: Path, llm, cached: int, progress: bool) -> HybridCache:
    """The file's cache of `cached` positions, layer by layer, in a new HybridCache."""
    _check_sizes(f, path, ModelShape.of(llm.model.config).num_hidden_layers, cached)
    room = sized_for(llm.model, cached, RESERVED_NEW_TOKENS)
    cache = HybridCache(
        llm.model, llm.offload, max_length=room, prompt_length=cached, progress=progress, stores=llm.stores
    )
    try:
        weight, names = next(llm.model.parameters()), set(f.keys())
        for i, layer in enumerate(tqdm(cache.layers, desc="loading prefix", unit="layer", disable=not progress)):
            try:
                restore_layer(layer, LayerFile(f, i, names), weight.device, weight.dtype)
            except torch.OutOfMemoryError:
                raise  # not the file's fault: it stays as it is
            except (KeyError, IndexError, TypeError, RuntimeError, OverflowError) as error:  # a part missing, say
                why = f"{type(error).__name__}: {error}"
                raise ValueError(f"{path} is damaged: its layer {i} does not load ({why})") from error
            if layer.n_seen != cached:
                raise ValueError(f"{path} is damaged: its layer {i} holds other positions than its document's")
    except BaseException:
        cache.release()
        raise
    return cache


def read_tensor(f, name: str) -> torch.Tensor:
    """The tensor `name` of the open file, in memory of its own. The file's own is a mapping of it that
    outlives the file's closing: a cache holding it changed as the file was written over, and a file cut
    short under it ended the process (SIGBUS)."""
    return f.get_tensor(name).clone()


def _check_sizes(f, path: Path, n_layers: int, cached: int) -> None:
    """The file's layers, each holding the document's `cached` positions, checked before a cache is sized for
    them: a file whose document alone was long had a cache of its length allocated before its layers were read
    (pinned host memory, on a GPU machine)."""
    if f.metadata().get("layers") != str(n_layers):
        raise ValueError(f"{path} holds {f.metadata().get('layers')} layers; the model has {n_layers}")
    names = set(f.keys())
    for i in range(n_layers):
        parts = [f"layers.{i}.{part}" for part in ("resident_pos", "host_k")]
        if not all(name in names for name in parts):
            raise ValueError(f"{path} is damaged: its layer {i} lacks {', '.join(n for n in parts if n not in names)}")
        slots, host = (f.get_slice(name).get_shape() for name in parts)
        if len(slots) != 1 or len(host) != 3 or slots[0] + host[1] < cached:  # rows the file holds, whatever else
            raise ValueError(f"{path} is damaged: its layer {i} holds fewer rows than its document's positions")


@dataclasses.dataclass
class LayerFile:
    """One layer's tensors in an open file."""

    f: object
    layer: int
    names: set

    def __contains__(self, part: str) -> bool:
        return f"layers.{self.layer}.{part}" in self.names

    def get(self, part: str) -> torch.Tensor:
        name = f"layers.{self.layer}.{part}"
        if name not in self.names:
            raise ValueError(f"the prefix file lacks {name}")
        return read_tensor(self.f, name)

    def rows(self, part: str):
        """The tensor [H, n, D], a block of rows at a time."""
        view = self.f.get_slice(f"layers.{self.layer}.{part}")
        n = view.get_shape()[1]
        for start in range(0, n, ROWS_PER_READ):
            yield view[:, start : min(n, start + ROWS_PER_READ)]

    def state(self, part: str) -> dict[str, torch.Tensor]:
        """The tensors of the component `part` (`summary`, `key_index`, ...) under their own names."""
        prefix = f"layers.{self.layer}.{part}."
        return {name[len(prefix) :]: read_tensor(self.f, name) for name in self.names if name.startswith(prefix)}


def restore_layer(layer: HybridLayer, saved: LayerFile, device: torch.device, dtype: torch.dtype) -> None:
    """A new layer given the state `layer_state` saved (its K/V on `device` in `dtype`, the model's)."""
    n_seen, n_indexed, n_built, waiting = (int(x) for x in saved.get("counts"))
    empty = torch.empty(1, layer.n_kv_heads, 0, layer.head_dim, device=device, dtype=dtype)
    layer.lazy_initialization(empty, empty)
    resident_k, resident_v, pos = saved.get("resident_k"), saved.get("resident_v"), saved.get("resident_pos")
    slots = pos.shape[0]
    shape = (layer.n_kv_heads, slots, layer.head_dim)
    if slots > layer.cfg.resident_tokens or tuple(resident_k.shape) != shape or resident_v.shape != resident_k.shape:
        raise ValueError(f"the prefix file's layer {layer.layer_idx} holds a resident set of another shape")
    if resident_k.dtype != dtype:
        raise ValueError(f"the prefix file's layer {layer.layer_idx} holds K/V in {resident_k.dtype}, not {dtype}")
    layer.resident_k, layer.resident_v = resident_k.to(device), resident_v.to(device)
    layer.resident_pos = pos.numpy().astype(np.int64)
    for k, v in zip(saved.rows("host_k"), saved.rows("host_v")):
        if k.shape != v.shape or (k.shape[0], k.shape[2]) != shape[::2] or k.dtype != layer.host.dtype:
            raise ValueError(f"the prefix file's layer {layer.layer_idx} holds host rows of another shape or dtype")
        layer.host.append_from_host(k, v)
    if layer.summary is not None:
        layer.summary.load_state(saved.state("summary"))
    if layer.own_blocks:
        layer.blocks.load_state(saved.state("blocks"))
    if "key_index.raw" in saved:
        _restore_key_index(layer, saved, n_indexed)
    if "query_sample.queries" in saved:
        layer.query_sample.load_state(saved.state("query_sample"))
    filled, host = int((layer.resident_pos >= 0).sum()), layer.host.n
    summarised = [] if layer.summary is None else [layer.summary.keys.n]
    summarised += [layer.blocks.n] if layer.own_blocks else []
    sketched = layer.sketch.n if isinstance(layer.sketch, KeySketch) else n_indexed
    if filled + host != n_seen or not 0 <= n_built <= n_indexed <= host or sketched != n_indexed:
        raise ValueError(f"the prefix file's layer {layer.layer_idx} is damaged: its counts do not add up")
    if any(n != host for n in summarised) or (layer.summary is not None and not layer.summary.consistent()):
        raise ValueError(f"the prefix file's layer {layer.layer_idx} is damaged: its blocks are not its host rows'")
    where = layer.positions()  # each of the document's positions once: resident or on the host
    held = np.sort(np.concatenate([where["sinks"], where["window"], where["host"]]))
    if not np.array_equal(held, np.arange(n_seen)):
        raise ValueError(f"the prefix file's layer {layer.layer_idx} is damaged: its positions are not its document's")
    layer.n_seen, layer.n_indexed, layer.n_built, layer.build_waiting = n_seen, n_indexed, n_built, bool(waiting)


def _restore_key_index(layer: HybridLayer, saved: LayerFile, n_indexed: int) -> None:
    """The layer's query lists (and with the adaptive budget, its scorer) as saved; their ids within the host
    keys they index, which the host kernel reads."""
    cfg = layer.cfg
    if cfg.key_index != "qq" or not cfg.uses_key_index:
        raise ValueError(f"the prefix file's layer {layer.layer_idx} holds query lists; this configuration has none")
    index = ListSelector(layer.n_kv_heads, layer.head_dim, layer.device, layer.dtype, cfg.index_params)
    index.load_state(saved.state("key_index"))
    lists = index.lists.lists
    if len(index) != n_indexed or (lists.numel() and not (-1 <= int(lists.min()) and int(lists.max()) < n_indexed)):
        raise ValueError(f"the prefix file's layer {layer.layer_idx} holds query lists of other keys than its store's")
    layer.key_index = index
    if cfg.budget == "adaptive":
        layer.sketch = make_scorer(cfg.sketch_rank, layer.host, cfg.host_threads)
        if isinstance(layer.sketch, KeySketch):
            layer.sketch.load_state(saved.state("sketch"))


# --------------------------------------------------------------------- folder


class PrefixFolder:
    """Documents' prefixes kept as files in a folder (the server's `--prefix-dir`), so that a document prefilled
    once is loaded, not prefilled, whenever it comes back, in this process or a later one. A file is named by a
    digest of the document, the model and the configuration's fields that shape the cache; the folder holds at
    most `max_bytes` of them, the files used least recently removed first."""

    def __init__(self, llm, folder, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"a prefix folder holds a positive number of bytes, got {max_bytes}")
        self.llm, self.folder, self.max_bytes = llm, Path(folder), max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = model_fingerprint(llm.model) + json.dumps(state_config(llm.offload), sort_keys=True)

    def path(self, text: str) -> Path:
        return self.folder / (hashlib.sha256((self.key + text).encode()).hexdigest()[:40] + ".prefix")

    def prefix(self, text: str, *, progress: bool = True, leave=None):
        """The document's engine.prefix.Prefix, loaded from its file where the folder holds one, else prefilled
        (`leave()`, asked as it prefills, gives that up where true: PrefillLeft) and saved there; and whether
        it was loaded."""
        path = self.path(text)
        if path.is_file():
            try:
                prefix = self.llm.load_prefix(path, document=text, progress=progress)
            except (ValueError, OSError) as error:  # damaged, or gone (another server's trim): prefilled again
                log.warning("%s was not loaded, and its document is prefilled again: %s", path, error)
            else:
                with suppress(OSError):  # gone since: the prefix is loaded all the same
                    os.utime(path)  # used now: the last to go
                return prefix, True
        prefix = self.llm.prefix(text, progress=progress, leave=leave)
        try:
            prefix.save(path, progress=progress)
            self._trim(keep=path)
        except (OSError, ValueError) as error:  # a full disk, or a key index no file holds: served all the same
            log.warning("the document's prefix was not kept in %s: %s", self.folder, error)
        return prefix, False

    def _trim(self, keep: Path) -> None:
        """The files used least recently removed until the folder holds at most max_bytes (`keep` stays), and
        the temporary files of saves that a killed process left behind (untouched for STALE_PARTIAL_S)."""
        for f in self.folder.glob("*.prefix.*partial"):
            with suppress(FileNotFoundError):  # renamed by the process that wrote it, meanwhile
                if time.time() - f.stat().st_mtime > STALE_PARTIAL_S:  # one being written changes as it grows
                    f.unlink()
        found = {}  # each file's (last use, size), read once: another server's trim may remove it meanwhile
        for f in self.folder.glob("*.prefix"):
            with suppress(FileNotFoundError):
                stat = f.stat()
                found[f] = (stat.st_mtime, stat.st_size)
        total = sum(size for _, size in found.values())
        for f in sorted(found, key=lambda f: found[f][0]):
            if total <= self.max_bytes:
                break
            if f != keep:
                total -= found[f][1]
                f.unlink(missing_ok=True)
