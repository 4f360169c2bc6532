"""One row decoded with a preallocated (static) KV cache and a compiled decode step.

At batch 1 a decoding step of a small model is a few hundred small operations, each paying
Python and dispatch overhead, around matrix-vector products that are bound by memory reads.
transformers' `StaticCache` keeps every shape fixed (the cache is allocated for a whole window and
the step writes one position into it), so `torch.compile` can turn the step into one graph of fused
kernels around the weight products, compiled once per window size and process.

The prompt is prefilled eagerly (its length varies, and compiling for every length would cost more
than it saves); only the one-token step is compiled. Windows are powers of two from 256 tokens, so a
chat that grows pays a new compile only at 256, 512, 1024, ... tokens. The first step in each window
pays the compile (tens of seconds for the bundled model on 2 CPU cores); `compile_seconds` keeps it
so the caller can say so. Used by `HFBackend` when built with ``compile_decode=True`` for a batch of
one row (`cai chat`, a lone request to `cai serve`, streaming).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Sequence

import torch

from cai.backends import prefix_attention

MIN_WINDOW = 256
GQA_IMPLEMENTATION = "cai_static_gqa"
"""The attention the compiled step runs where the model's is SDPA: grouped K/V heads read in place."""


def gqa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA that reads grouped-query K/V heads in place (transformers' calling convention).

    Under `torch.compile` transformers' SDPA path repeats every K/V head for its query heads
    (``repeat_kv``), and inductor then copies the whole static window, every layer and step: on the
    reference machine, for the bundled model's 256-token window, ~1.2 MB a layer. PyTorch's SDPA takes
    the grouped heads as they are (``enable_gqa``; the CPU flash kernel supports it with a mask).
    """
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def supported(model: Any) -> bool:
    """Whether the model's cache can be static and its forward compiled as one graph."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(config, "layer_types", None)
    full_attention = layer_types is None or set(layer_types) <= {"full_attention"}
    return full_attention and bool(getattr(model, "_can_compile_fullgraph", False))


class StaticDecoder:
    """Holds one model's compiled decode step; `start` opens a row on a fresh static cache.

    Args:
        model: a causal LM whose `supported` check passes.
        max_context: the model's context length (windows never exceed it); None for no limit.
    """

    def __init__(self, model: Any, max_context: int | None) -> None:
        self.model = model
        self.max_context = max_context
        self._step = torch.compile(model.forward, fullgraph=True, dynamic=False)
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        self._attention = (GQA_IMPLEMENTATION if config._attn_implementation == "sdpa"
                           and prefix_attention.register_attention(GQA_IMPLEMENTATION, gqa_attention) else None)
        self._compiled: set[int] = set()
        self.compile_seconds: dict[int, float] = {}
        """Window size -> seconds its first step took (the compile, with one step's work)."""

    def attention(self) -> AbstractContextManager[None]:
        """The compiled step's attention (`gqa_attention` in place of SDPA) inside the block."""
        return prefix_attention.enabled(self.model, self._attention) if self._attention else nullcontext()

    def window_for(self, tokens: int) -> int:
        """The smallest window (a power of two from `MIN_WINDOW`) holding ``tokens``."""
        window = MIN_WINDOW
        while window < tokens:
            window *= 2
        if self.max_context:
            window = min(window, max(self.max_context, tokens))
        return window

    def start(self, prompt_ids: Sequence[int], max_new_tokens: int) -> StaticRow:
        """Prefill ``prompt_ids`` into a static cache sized for them plus ``max_new_tokens``."""
        n = len(prompt_ids)
        row = StaticRow(self, self.window_for(n + max_new_tokens), n)
        positions = torch.arange(n, device=row.device)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([list(prompt_ids)], device=row.device), cache=row.cache,
                             position_ids=positions[None], cache_position=positions, use_cache=True, logits_to_keep=1)
        row.logits = out.logits[:, -1, :]
        return row

    def adopt(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], logits: torch.Tensor,
              max_new_tokens: int) -> StaticRow:
        """Continue a row whose prompt was prefilled elsewhere: its per-layer ``(keys, values)``
        (batch 1) are copied into a static cache sized for them plus ``max_new_tokens``."""
        n = layers[0][0].shape[-2]
        row = StaticRow(self, self.window_for(n + max_new_tokens), n)
        with torch.inference_mode():
            for i, (keys, values) in enumerate(layers):
                row.cache.update(keys, values, i)
        row.logits = logits
        return row


class StaticRow:
    """One row being decoded on a static cache; `logits` holds the next position's logits ``[1, vocab]``."""

    def __init__(self, decoder: StaticDecoder, window: int, position: int) -> None:
        from transformers import StaticCache  # lazy, as the rest of the backend

        self._decoder, self.window, self.position = decoder, window, position
        self.device = next(decoder.model.parameters()).device
        with torch.inference_mode():  # like the step's inputs (`step`): the same guards for every caller
            self.cache = StaticCache(config=decoder.model.config, max_cache_len=window)
        self.logits: torch.Tensor | None = None

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` (one id, any shape) at the next position; returns and keeps the new logits."""
        if self.position >= self.window:
            raise RuntimeError(f"static window of {self.window} tokens is full")
        decoder = self._decoder
        first = self.window not in decoder._compiled
        started = time.perf_counter()
        with torch.inference_mode(), decoder.attention():
            # Inputs made here are inference tensors whoever calls: a token from outside inference mode
            # (a stream's) would fail the graph's guards and compile the step a second time.
            position = torch.tensor([self.position], device=self.device)
            ids = token.reshape(1, 1).clone()
            out = decoder._step(input_ids=ids, cache=self.cache,
                                position_ids=position[None], cache_position=position, use_cache=True)
        if first:
            decoder._compiled.add(self.window)
            decoder.compile_seconds[self.window] = time.perf_counter() - started
        self.position += 1
        self.logits = out.logits[:, -1, :]
        return self.logits
