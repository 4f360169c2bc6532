"""How `cai export` describes a Hugging Face tokenizer in GGUF metadata (``tokenizer.ggml.*``).

llama.cpp does not run a tokenizer.json: it rebuilds the tokenizer from the token list, the token
types, the BPE merges, the special ids and the *name* of the pre-tokenizer (the rule that splits
text before BPE), which it knows a fixed set of. So a byte-level BPE tokenizer is supported when
its pre-tokenizer is one llama.cpp has a name for (GPT-2, SmolLM, Llama 3, Qwen2), and any other
tokenizer (sentencepiece, WordPiece, an unknown split rule) is refused rather than exported to
tokenize differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cai.errors import CaiError

# The pre-tokenizers (how text is split before BPE) that llama.cpp knows by name, described by
# what a tokenizer.json holds. Split patterns are compared as written.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass(frozen=True)
class GGUFVocab:
    """A tokenizer as GGUF metadata describes it (llama.cpp's ``tokenizer.ggml.*`` keys)."""

    pre: str
    """llama.cpp's name for the pre-tokenizer: ``gpt-2``, ``smollm``, ``llama-bpe`` or ``qwen2``."""
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    """``bos``/``eos``/``unk``/``pad`` -> token id, for the ones the tokenizer has."""
    add_bos: bool
    add_eos: bool
    chat_template: str | list[dict[str, str]] | None


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer given as tokenizer.json's ``pre_tokenizer``.

    Raises:
        CaiError: a pre-tokenizer llama.cpp has no name for (so it would split text differently).
    """
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    kinds = [(s or {}).get("type") for s in steps]
    last = steps[-1] or {}
    if kinds and kinds[-1] == "ByteLevel" and not last.get("add_prefix_space", False):
        if kinds == ["ByteLevel"] and last.get("use_regex", True):
            return "gpt-2"
        if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
                and last.get("use_regex", True)):
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
            pattern = (steps[0].get("pattern") or {}).get("Regex")
            if pattern in _SPLIT_NAMES and steps[0].get("behavior") == "Isolated":
                return _SPLIT_NAMES[pattern]
    raise CaiError(f"cannot describe the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) to llama.cpp; "
                   "cai export supports the GPT-2, SmolLM, Llama 3 and Qwen2 byte-level BPE tokenizers")


def _encodes_with(tokenizer: Any, token_id: int | None, position: int) -> bool:
    """Whether the tokenizer adds ``token_id`` at ``position`` (0 or -1) when asked for special tokens."""
    if token_id is None:
        return False
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    return len(full) > len(plain) and full[position] == token_id


def gguf_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """Describe a fast byte-level BPE tokenizer the way GGUF stores one (``tokenizer.ggml.model = gpt2``).

    Ids the tokenizer leaves unused below ``vocab_size`` (embedding rows added for alignment) become
    ``[PADn]`` tokens of type UNUSED, since llama.cpp wants one token per embedding row.

    Raises:
        CaiError: not a byte-level BPE tokenizer, or more tokens than the model has embeddings.
    """
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CaiError("cannot export a slow (Python) tokenizer; save the model with a fast tokenizer (tokenizer.json)")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "sentencepiece-style (byte-fallback BPE)" if model.get("byte_fallback") else model.get("type")
        raise CaiError(f"cannot export a {kind} tokenizer; cai export supports byte-level BPE tokenizers")
    normalizer = (spec.get("normalizer") or {}).get("type", "NFC")
    if normalizer != "NFC":
        raise CaiError(f"cannot export a tokenizer with a {normalizer} normalizer; llama.cpp would not apply it")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise CaiError(f"the tokenizer has token id {max(by_id)} but the model has only {vocab_size} embeddings")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append((T.CONTROL if added[i].get("special") else T.USER_DEFINED) if i in added else T.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    names = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
             "pad": tokenizer.pad_token_id}
    return GGUFVocab(pre=pre, tokens=tokens, token_types=[int(t) for t in types], merges=merges,
                     special_ids={k: int(v) for k, v in names.items() if v is not None},
                     add_bos=_encodes_with(tokenizer, tokenizer.bos_token_id, 0),
                     add_eos=_encodes_with(tokenizer, tokenizer.eos_token_id, -1),
                     chat_template=getattr(tokenizer, "chat_template", None) or None)


def write_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Add a `GGUFVocab` to a ``gguf.GGUFWriter`` under llama.cpp's key names."""
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    K = gguf.Keys.Tokenizer
    for key, token_id in vocab.special_ids.items():
        writer.add_uint32({"bos": K.BOS_ID, "eos": K.EOS_ID, "unk": K.UNK_ID, "pad": K.PAD_ID}[key], token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
