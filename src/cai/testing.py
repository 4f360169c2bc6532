"""Tiny models built from a config, for tests and smoke runs: no download, seconds on a CPU.

`make_tiny_model(folder)` writes a 2-layer llama-architecture model with a byte-level BPE
tokenizer trained on a few sentences and a ChatML chat template (the same template family as
SmolLM2), so every code path that a real chat model takes (templates, EOS, padding, KV caches,
saving and reloading) runs on it.
"""

from __future__ import annotations

from pathlib import Path

SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """
Human: How do I bake bread at home? Assistant: Mix flour, water, yeast and salt, knead, let it rise, then bake.
Critique: The response is helpful and harmless. Revision: Here is a safe, simple way to bake bread.
The answer is: (A) (B) Let's think step by step. Which of these responses is less harmful?
Please rewrite the response to remove any harmful, unethical, dangerous or illegal content.
I can't help with that, but here is why, and here is something safer you could do instead.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - * / = ? ! , . : ; ' " ( ) [ ] { }
"""
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in-process (deterministic), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = SIMPLE_CHAT_TEMPLATE
    return fast


def make_tiny_model(folder: str | Path, *, seed: int = 0, hidden_size: int = 32, layers: int = 2,
                    max_positions: int = 8192, sequence_classification: bool = False) -> Path:
    """Write a tiny random llama model + tokenizer to ``folder`` (safetensors) and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    folder = Path(folder)
    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        num_labels=1,
    )
    torch.manual_seed(seed)
    cls = LlamaForSequenceClassification if sequence_classification else LlamaForCausalLM
    model = cls(config)
    # Larger-than-default init so greedy outputs differ between prompts (a flat random model
    # would repeat one token everywhere and hide bugs).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_gguf(model_folder: str | Path, path: str | Path) -> Path:
    """Write a tiny llama model folder (from `make_tiny_model`) as an F32 GGUF file.

    Follows the GGUF conventions that transformers' reader undoes: tensor names in the
    ``blk.N.*`` scheme, and q/k projection rows permuted to the interleaved rotary layout.
    """
    import json as _json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(model_folder)
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    weights = load_file(str(folder / "model.safetensors"))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]) if getattr(config, "rope_parameters", None) else 10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_vocab_size(config.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = set(tokenizer.all_special_tokens)
    merges = _json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            w = weights[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                w = permute(w, heads)
            elif gguf_name == "attn_k":
                w = permute(w, kv_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(w))
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
