"""Shared-prefix ("cascade") attention: a batch's common prompt prefix is read once per step, not once per row.

The transformers backend prefills a shared few-shot prefix once. Copied into every row's KV cache, that
prefix is then read b times at each decoding step (measured on 2 CPU cores, SmolLM2-135M, batch 16,
a 1.5k-token prefix: 167 ms a step against 74 ms without the prefix). Here the prefix's K/V stay at
batch 1, each row's cache holds only its own suffix, and attention is one softmax over
[prefix keys; the row's suffix keys], computed in two parts that share one max and one sum.

Notation::

    b rows, h query heads, kvh key/value heads, g = h / kvh query heads per KV head (grouped-query
    attention), t query positions, P prefix keys, S suffix keys (this row's cache), d head dim.

    q              [b, h, t, d]      the queries (RoPE applied)
    Kp, Vp         [1, kvh, P, d]    the shared prefix, stored once
    Ks, Vs         [b, kvh, S, d]    each row's suffix (left padding included)
    visible        [b, 1, t, S]      padding + causal mask of the suffix (True = attend)

    prefix part:  q_fold = q as [1, kvh, b*g*t, d]: ONE attention per KV head for all rows over Kp, Vp
                  -> out_p, lse_p (each query's log-sum-exp of its scaled scores)
    suffix part:  q_row = q as [b, kvh, g*t, d] over the row's own Ks, Vs where visible -> out_s, lse_s
    m = max(lse_p, lse_s)
    out = (exp(lse_p - m) out_p + exp(lse_s - m) out_s) / (exp(lse_p - m) + exp(lse_s - m))

Every prefix position is visible to every row and query (the prefix comes before all padding), and
the prefix is never empty, so ``m`` is finite even for a padding query that sees no suffix key
(its ``lse_s`` is -inf and its suffix part weighs nothing).

On CPU each part is PyTorch's fused flash kernel, which hands back the log-sum-exp with the output,
so the split form serves every call: decoding steps, the option tails of choice scoring and the
prefill of the rows' suffixes (where joining the prefix to every row's keys cost a copy of the
prefix per row and per layer: a batch of 16 suffixes over a 1.6k-token prefix prefilled in 1.2 s
split, 3.9 s joined, on 2 cores). Elsewhere the parts are plain matmuls, and with many query positions (prefilling a
suffix) the prefix is joined to the suffix for one ordinary SDPA call instead, so the scores stay
small.

It plugs in through transformers' attention registry (``AttentionInterface`` and
``AttentionMaskInterface``), not a fork of the model: during a call `enabled` switches the model's
attention implementation to ``cai_shared_prefix``, and the prefix K/V ride along as the
``shared_prefix`` keyword, which transformers passes down to every attention call.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

IMPLEMENTATION = "cai_shared_prefix"
SPLIT_MAX_QUERIES = 16
"""Without the fused CPU kernel: query positions up to which the split form is used (decoding, option
tails); above it, one joined SDPA call, so the matmul form's scores stay small."""
FUSED_CPU = True
"""Use PyTorch's fused CPU flash kernel for the split form's two parts (tests turn it off to check the other path)."""
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

_registered: dict[str, bool] = {}


@dataclass(frozen=True)
class Packed:
    """Where the tokens of a packed pass sit in the left-padded ``[rows, width]`` grid of a batch.

    A packed pass feeds the model only the batch's real tokens, as one sequence ``[1, N]``, so the
    weight products (most of a prefill's arithmetic) skip the padding; attention unpacks the queries,
    keys and values into the padded grid, where the batch's mask applies as before, and packs the
    output back. ``index`` holds each real token's flat position ``row * width + column``, in order.
    """

    rows: int
    width: int
    index: torch.Tensor

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, heads, N, d]`` -> ``[rows, heads, width, d]``, zeros at the padding."""
        heads, d = x.shape[1], x.shape[3]
        grid = x.new_zeros(self.rows * self.width, heads, d)
        grid.index_copy_(0, self.index, x[0].transpose(0, 1))
        return grid.view(self.rows, self.width, heads, d).transpose(1, 2)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, width, ...]`` -> ``[1, N, ...]``: the real positions only."""
        return x.reshape(self.rows * self.width, *x.shape[2:]).index_select(0, self.index)[None]


def split_prefix_attention(
    query: torch.Tensor,
    prefix_key: torch.Tensor,
    prefix_value: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Attention over [shared prefix; each row's suffix], the prefix read once for the whole batch.

    Args:
        query: ``[b, h, t, d]``.
        prefix_key, prefix_value: ``[1, kvh, P, d]``, visible to every row and query; ``P >= 1``.
        key, value: ``[b, kvh, S, d]``, each row's own keys after the prefix.
        visible: ``[b, 1, t, S]`` bool, True where a query may attend a suffix key.
        scaling: the softmax scale (usually ``d ** -0.5``).

    Returns:
        ``[b, h, t, d]``: softmax over all ``P + S`` keys (masked suffix keys excluded), times values.
    """
    b, h, t, d = query.shape
    kvh, s = prefix_key.shape[1], key.shape[2]
    g = h // kvh
    q_row = query.reshape(b, kvh, g * t, d)
    q_fold = q_row.transpose(0, 1).reshape(1, kvh, b * g * t, d)
    prefix_out, prefix_lse = _attend(q_fold, prefix_key, prefix_value, None, scaling)
    prefix_out = prefix_out[0].view(kvh, b, g * t, d).transpose(0, 1)  # [b, kvh, g*t, d]
    prefix_lse = prefix_lse[0].view(kvh, b, g * t).transpose(0, 1)
    row_visible = visible[:, :, None].expand(b, 1, g, t, s).reshape(b, 1, g * t, s)
    suffix_out, suffix_lse = _attend(q_row, key, value, row_visible, scaling)
    m = torch.maximum(prefix_lse, suffix_lse)  # finite: the prefix is never empty
    prefix_weight = torch.exp(prefix_lse - m)[..., None]
    suffix_weight = torch.exp(suffix_lse - m)[..., None]  # 0 where the query sees no suffix key
    out = (prefix_out.float() * prefix_weight + suffix_out.float() * suffix_weight) / (prefix_weight + suffix_weight)
    return out.to(query.dtype).reshape(b, h, t, d)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor | None,
            scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``query [B, H, L, d]`` over ``key``/``value [B, H, S, d]``, and each query's
    log-sum-exp of its scaled scores (float32, ``[B, H, L]``; -inf where ``visible [B, 1, L, S]`` hides
    every key, whose output is then 0).

    On CPU (`_fused`) this is PyTorch's fused flash kernel, which returns the log-sum-exp it already
    keeps and never materialises the scores (alone, the prefix part of a 16-row decoding step over a
    1.6k-token prefix took 0.5 ms a layer on 2 cores against 1.3 ms in the matmul form; inside the
    model a step's attention came out about even, and the gain is in prefill). Elsewhere, or where
    that kernel is missing, the matmul form below.
    """
    if _fused(query):
        mask = None if visible is None else torch.zeros(visible.shape, dtype=query.dtype,
                                                         device=query.device).masked_fill(~visible, float("-inf"))
        out, lse = _FLASH_CPU(query, key, value, attn_mask=mask, scale=scaling)[:2]
        if visible is not None:  # the kernel gives 0, not -inf, for a query that sees nothing
            lse = lse.masked_fill(~visible.any(-1), float("-inf"))
        return out, lse.float()
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.matmul(weights.to(value.dtype), value), lse


def _fused(query: torch.Tensor) -> bool:
    """Whether the split form's parts run on PyTorch's fused CPU flash kernel for this query."""
    return query.device.type == "cpu" and FUSED_CPU and _FLASH_CPU is not None


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    shared_prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    packed: Packed | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``cai_shared_prefix`` (transformers' calling convention).

    ``key``/``value`` are this layer's suffix cache; ``shared_prefix[module.layer_idx]`` its prefix K/V.
    ``attention_mask`` is the suffix's bool mask from `_suffix_mask`. Returns ``([b, t, h, d], None)``.
    Without ``shared_prefix`` it is plain SDPA. With ``packed`` the query is the packed ``[1, h, N, d]``
    (`Packed`), the cache and ``attention_mask`` are in the padded grid, and the output comes back packed.
    """
    if packed is not None:
        out, _ = attention_forward(module, packed.unpack(query), key, value, attention_mask, dropout, scaling,
                                   shared_prefix, **kwargs)
        return packed.pack(out), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # lazy: only when a model runs

    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    prefix_key, prefix_value = shared_prefix[module.layer_idx]
    b, _, t, d = query.shape
    if t > SPLIT_MAX_QUERIES and not _fused(query):
        prefix_visible = attention_mask.new_ones((b, 1, t, prefix_key.shape[2]))
        visible = torch.cat([prefix_visible, attention_mask.expand(b, 1, t, -1)], dim=-1)
        joined_key = torch.cat([prefix_key.expand(b, -1, -1, -1), key], dim=2)
        joined_value = torch.cat([prefix_value.expand(b, -1, -1, -1), value], dim=2)
        return sdpa_attention_forward(module, query, joined_key, joined_value, visible, dropout=dropout,
                                      scaling=scaling, **kwargs)
    out = split_prefix_attention(query, prefix_key, prefix_value, key, value, attention_mask,
                                 d ** -0.5 if scaling is None else scaling)
    return out.transpose(1, 2).contiguous(), None


def _suffix_mask(*args: Any, **kwargs: Any) -> torch.Tensor:
    """SDPA's bool mask, always materialised: the split form needs the causal part spelled out
    (plain SDPA may return None and lean on ``is_causal``, which knows nothing of the prefix)."""
    from transformers.masking_utils import sdpa_mask  # lazy: transformers loads only when a model runs

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register_attention(name: str, attention: Any, mask: Any = None) -> bool:
    """Register ``attention`` with transformers as implementation ``name`` (once), with ``mask`` as its mask
    function (SDPA's when None); False where this transformers can't take it."""
    if name not in _registered:
        try:
            from transformers import AttentionInterface  # lazy: transformers loads only when a model runs
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # lazy: as above
        except ImportError:
            _registered[name] = False
        else:
            AttentionInterface.register(name, attention)
            AttentionMaskInterface.register(name, mask or sdpa_mask)
            _registered[name] = True
    return _registered[name]


def register() -> bool:
    """Register ``cai_shared_prefix`` with transformers (once); False where this transformers can't take it."""
    return register_attention(IMPLEMENTATION, attention_forward, _suffix_mask)


def supported(model: Any) -> bool:
    """Whether this model can run shared-prefix attention: its attention goes through transformers'
    registry, every layer is full attention, and its scores are plain ``q.k * scale`` (no soft-capping,
    no sliding window). Registers the implementation as a side effect."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(config, "layer_types", None)
    return (
        bool(getattr(model, "_supports_attention_backend", False))
        and (layer_types is None or set(layer_types) <= {"full_attention"})
        and getattr(config, "sliding_window", None) is None
        and getattr(config, "attn_logit_softcapping", None) is None
        and register()
    )


@contextmanager
def enabled(model: Any, implementation: str = IMPLEMENTATION) -> Iterator[None]:
    """Run the model's attention as ``implementation`` (``cai_shared_prefix``; registered) inside the block,
    its own implementation after."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    before = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before
