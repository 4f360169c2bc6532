"""`cai export`: write a trained model as one GGUF file for llama.cpp, Ollama and LM Studio.

Why: a run's models are Hugging Face folders, which the llama.cpp family of tools does not read.
One GGUF file holds all they need: the weights (f32, f16 or q8_0), the model's shape (layers,
heads, rope theta, norm epsilon, context length), the tokenizer (tokens, token types, BPE merges,
special ids, whether to add BOS) and the chat template.

It follows llama.cpp's conventions, the ones transformers' GGUF reader undoes:

- tensor names come from the `gguf` library's own map (``model.layers.0.self_attn.q_proj`` ->
  ``blk.0.attn_q``), so no name table lives here;
- for ``llama`` the q and k rows are reordered within each head (`interleave_rotary_halves`), since
  llama.cpp's llama kernel rotates adjacent pairs where transformers rotates halves (its qwen2
  kernel rotates halves too, so qwen2 is written as is);
- tied embeddings are written once: no ``output.weight`` is how readers know they are tied;
- 1-D tensors (norms, biases) stay f32; with q8_0 a matrix whose rows don't split into 32-value
  blocks is written f16.

Supported: llama (SmolLM2, the bundled model, and others with the default rope), mistral (written
as llama, as llama.cpp runs it, without its sliding window) and qwen2, each with a byte-level BPE
tokenizer (described by `cai.export_tokenizer`); anything else is refused in one sentence.
Weights are read one tensor at a time, so memory stays near the largest tensor, and the file is
renamed into place only when complete.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai import __version__
from cai.errors import CaiError
from cai.export_tokenizer import GGUFVocab, gguf_vocab, write_vocab
from cai.io import ensure_dir
from cai.models import BUNDLED, BUNDLED_FILE, resolve_model_path
from cai.progress import progress_bar
from cai.runs import STAGES, read_manifest

if TYPE_CHECKING:
    import numpy as np

EXPORT_TYPES = ("f32", "f16", "q8_0")
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
"""transformers ``model_type`` -> GGUF architecture name."""
PERMUTED_ARCHS = ("llama",)
"""GGUF architectures whose q/k rows llama.cpp expects in interleaved (adjacent-pair) order."""
SKIPPED_TENSORS = ("rotary_emb.inv_freq",)
"""Buffers some checkpoints carry that llama.cpp recomputes."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_gguf` wrote."""

    path: Path
    architecture: str
    tensor_type: str
    tensors: int
    size_bytes: int
    has_chat_template: bool

    def summary(self) -> str:
        note = "" if self.has_chat_template else " (the tokenizer has no chat template, so none was written)"
        return (f"wrote {self.path} ({self.architecture}, {self.tensor_type}, {self.tensors} tensors, "
                f"{self.size_bytes / 1e6:.1f} MB){note}")


def check_export_type(tensor_type: str) -> str:
    """The type name, lower-cased; a clear error for anything but f32, f16 or q8_0."""
    name = tensor_type.lower()
    if name not in EXPORT_TYPES:
        raise CaiError(f"unknown --type '{tensor_type}'; use one of {', '.join(EXPORT_TYPES)}")
    return name


def resolve_export_source(spec: str) -> Path:
    """The local HF model folder a spec names: a folder (a run's stage such as ``runs/demo/sft``),
    ``bundled`` or a ``.gguf`` file (both through cai's safetensors cache).

    Raises:
        CaiError: the spec names no finished local model folder, with what would fix it.
    """
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        manifest = read_manifest(path)
        if manifest is not None:
            raise CaiError(f"{path} holds no model yet: its {manifest.get('stage', 'stage')} stage is "
                           f"{manifest.get('status', 'not done')} (see `cai status {path.parent}`)")
        models = [f"{path / s.folder}" for s in STAGES if (path / s.folder / "config.json").is_file()]
        if models:
            raise CaiError(f"{path} is a run folder; export one of its models: {', '.join(models)}")
    if spec != BUNDLED and path.suffix != ".gguf" and not path.exists():
        raise CaiError(f"model folder {path} does not exist; give a model folder (e.g. runs/demo/sft), "
                       "'bundled' or a .gguf file")
    resolved, is_local = resolve_model_path(spec)
    if not is_local:
        raise CaiError(f"'{spec}' is not a local model; cai export reads model folders, so download it first")
    return Path(resolved)


def model_name(spec: str, folder: Path) -> str:
    """``general.name``: ``<run>-<stage>`` for a run's stage folder, else the model's own name."""
    if spec == BUNDLED:
        return BUNDLED_FILE.split(".")[0]
    if spec.endswith(".gguf"):
        return Path(spec).stem
    if (folder / "manifest.json").is_file():
        return f"{folder.parent.name}-{folder.name}"
    return folder.name


def interleave_rotary_halves(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder a q or k projection's rows from transformers' rotary layout to llama.cpp's.

    Within each head of ``d`` rows, transformers rotates row ``i`` with row ``i + d/2``; llama.cpp's
    llama kernel rotates rows ``2i`` and ``2i + 1``. So head rows ``[0, 1, ..., d-1]`` are written
    in the order ``[0, d/2, 1, d/2 + 1, ...]``. transformers' GGUF reader applies the inverse.

    Args:
        weight: ``(n_heads * d, in_features)`` weight or ``(n_heads * d,)`` bias.
        n_heads: heads the rows belong to (the key/value head count for k).

    Returns:
        A new array of the same shape.
    """
    head_dim = weight.shape[0] // n_heads
    halves = weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def ggml_type_for(shape: tuple[int, ...], tensor_type: str):
    """The GGML storage type of one tensor: 1-D stays F32; q8_0 needs rows in 32-value blocks."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) < 2 or tensor_type == "f32":
        return Q.F32
    if tensor_type == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16


def _stored_bytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def _config_value(config: Any, name: str, default: Any = None) -> Any:
    value = getattr(config, name, None)
    return default if value is None else value


def check_config(config: Any) -> str:
    """The GGUF architecture for a transformers config; one sentence for what can't be exported."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in ARCHITECTURES:
        raise CaiError(f"cannot export a '{model_type}' model to GGUF; cai export supports "
                       f"{', '.join(ARCHITECTURES)} causal LMs")
    classes = getattr(config, "architectures", None) or []
    if classes and not any(c.endswith("ForCausalLM") for c in classes):
        raise CaiError(f"cannot export a {classes[0]} to GGUF: only causal LMs are exported (a preference "
                       "model has no language-model head)")
    if _config_value(config, "hidden_act", "silu") != "silu":
        raise CaiError(f"cannot export a {model_type} model with hidden_act '{config.hidden_act}'; llama.cpp "
                       "runs these architectures with silu")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CaiError(f"cannot export a model with rope type '{rope.get('rope_type', rope.get('type'))}'; "
                       "cai export supports the default rope only")
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise CaiError("cannot export a qwen2 model with use_sliding_window on; llama.cpp has no sliding window for it")
    return ARCHITECTURES[model_type]


def rope_theta(config: Any) -> float:
    """Rope base frequency from a transformers 5 (``rope_parameters``) or 4 (``rope_theta``) config."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or _config_value(config, "rope_theta", 10000.0))


def _write_metadata(writer: Any, config: Any, vocab: GGUFVocab, name: str, tensor_type: str) -> None:
    """The model's shape and tokenizer, under llama.cpp's key names (``{arch}.*``, ``tokenizer.*``)."""
    import gguf

    heads = config.num_attention_heads
    head_dim = _config_value(config, "head_dim", config.hidden_size // heads)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_description(f"exported by cai {__version__} (cai export --type {tensor_type})")
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[tensor_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(_config_value(config, "num_key_value_heads", heads))
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(len(vocab.tokens))

    write_vocab(writer, vocab)


@dataclass(frozen=True)
class _PlannedTensor:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Any
    permute_heads: int | None


def _plan_tensors(shapes: dict[str, tuple[int, ...]], config: Any, arch: str, tensor_type: str) -> list[_PlannedTensor]:
    """Which safetensors tensor goes where, in which type, and which need their rows reordered.

    Raises:
        CaiError: a tensor the architecture has no GGUF place for, or an untied model without lm_head.
    """
    import gguf

    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    name_map = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    tied = bool(_config_value(config, "tie_word_embeddings", False))
    heads = config.num_attention_heads
    row_heads = {"attn_q": heads, "attn_k": _config_value(config, "num_key_value_heads", heads)}
    plan = []
    for hf_name, shape in shapes.items():
        if hf_name.endswith(SKIPPED_TENSORS) or (tied and hf_name.startswith("lm_head.")):
            continue
        found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in gguf.MODEL_TENSORS[model_arch]:
            raise CaiError(f"the checkpoint has a tensor '{hf_name}' that a GGUF {arch} model has no place for; "
                           "only plain causal-LM checkpoints can be exported")
        gguf_name = found[1]
        role = gguf_name.split(".")[-2]  # blk.N.attn_q.weight -> attn_q
        permute = row_heads.get(role) if arch in PERMUTED_ARCHS else None
        plan.append(_PlannedTensor(hf_name, gguf_name, shape, ggml_type_for(shape, tensor_type), permute))
    if not tied and not any(p.gguf_name == "output.weight" for p in plan):
        raise CaiError("the checkpoint has no lm_head weight and its config says the embeddings are not tied")
    return plan


def _checkpoint_shapes(folder: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Path]]:
    """Every tensor's shape and file, from the safetensors headers alone (no weights are read)."""
    from safetensors import safe_open

    shapes, where = {}, {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key], where[key] = tuple(f.get_slice(key).get_shape()), file
    if not shapes:
        raise CaiError(f"model folder {folder} has no .safetensors weights; save it with safe_serialization=True")
    return shapes, where


def export_gguf(model: str | Path, out: str | Path, tensor_type: str = "f16", *,
                show_progress: bool = True) -> ExportResult:
    """Write the model a spec names (see `resolve_export_source`) as one GGUF file.

    Args:
        model: a model folder (e.g. ``runs/demo/sft``), ``bundled`` or a ``.gguf`` file.
        out: the ``.gguf`` file to write (its folder is created).
        tensor_type: ``f32``, ``f16`` or ``q8_0`` for the matrices; 1-D tensors stay f32.
        show_progress: draw a per-tensor progress bar on stderr.

    Raises:
        CaiError: a bad type, a missing or unsupported model, or an unwritable output path.
    """
    import gguf
    import gguf.quants
    import numpy as np
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    tensor_type = check_export_type(tensor_type)
    out = Path(out)
    if out.is_dir():
        raise CaiError(f"output path {out} is a folder; give a .gguf file name")
    folder = resolve_export_source(str(model))
    config = AutoConfig.from_pretrained(folder)
    arch = check_config(config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    shapes, where = _checkpoint_shapes(folder)
    plan = _plan_tensors(shapes, config, arch, tensor_type)
    embed = [p.shape for p in plan if p.gguf_name == "token_embd.weight"]
    if not embed:
        raise CaiError(f"model folder {folder} has no token embedding (model.embed_tokens.weight)")
    vocab = gguf_vocab(tokenizer, embed[0][0])

    ensure_dir(out.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the export unreadable to others
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _write_metadata(writer, config, vocab, model_name(str(model), folder), tensor_type)
        for p in plan:
            writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), _stored_bytes(p.shape, p.qtype),
                                   raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with progress_bar("export", len(plan), enabled=show_progress) as advance:
            for p in plan:
                with safe_open(str(where[p.hf_name]), framework="pt") as f:
                    array = f.get_tensor(p.hf_name).float().numpy()
                if p.permute_heads is not None:
                    array = interleave_rotary_halves(array, p.permute_heads)
                writer.write_tensor_data(np.ascontiguousarray(gguf.quants.quantize(array, p.qtype)))
                advance(1, 0)
        writer.close()
        os.replace(tmp, out)
    except OSError as err:
        raise CaiError(f"could not write {out}: {err.strerror or err}") from err
    finally:
        writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ExportResult(path=out, architecture=arch, tensor_type=tensor_type, tensors=len(plan),
                        size_bytes=out.stat().st_size, has_chat_template=bool(vocab.chat_template))
