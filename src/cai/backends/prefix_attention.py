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

    sp = q_fold Kp^T * scale    q_fold = q as [kvh, b*g*t, d]: ONE matmul per KV head for all rows
    ss = q_row Ks^T * scale     q_row  = q as [b, kvh, g*t, d], hidden where not visible
    m  = max(max sp, max ss)
    out = (exp(sp - m) Vp + exp(ss - m) Vs) / (sum exp(sp - m) + sum exp(ss - m))

Every prefix position is visible to every row and query (the prefix comes before all padding), and
the prefix is never empty, so ``m`` is finite even for a padding query that sees no suffix key.

With many query positions (prefilling a suffix) each prefix key is already read once per t queries
and the split scores would be large, so there the prefix is joined to the suffix for one ordinary
SDPA call instead (what the plain path computes); the split form serves decoding steps and the
few-token option tails of choice scoring.

It plugs in through transformers' attention registry (``AttentionInterface`` and
``AttentionMaskInterface``), not a fork of the model: during a call `enabled` switches the model's
attention implementation to ``cai_shared_prefix``, and the prefix K/V ride along as the
``shared_prefix`` keyword, which transformers passes down to every attention call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

IMPLEMENTATION = "cai_shared_prefix"
SPLIT_MAX_QUERIES = 16
"""Query positions up to which the split form is used (decoding, option tails); above it, one joined SDPA call."""

_registered: bool | None = None


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
    q_row = (query * scaling).reshape(b, kvh, g * t, d)
    q_fold = q_row.transpose(0, 1).reshape(kvh, b * g * t, d)
    prefix_scores = torch.matmul(q_fold, prefix_key[0].transpose(1, 2)).float()  # [kvh, b*g*t, P]
    suffix_scores = torch.matmul(q_row, key.transpose(2, 3)).float().view(b, kvh, g, t, s)
    suffix_scores = suffix_scores.masked_fill(~visible[:, :, None], float("-inf"))
    prefix_max = prefix_scores.amax(-1).view(kvh, b, g, t).transpose(0, 1)  # [b, kvh, g, t]
    m = torch.maximum(prefix_max, suffix_scores.amax(-1))
    m_fold = m.transpose(0, 1).reshape(kvh, b * g * t, 1)
    prefix_exp = torch.exp(prefix_scores - m_fold)
    suffix_exp = torch.exp(suffix_scores - m[..., None])  # hidden keys: exp(-inf) = 0
    total = prefix_exp.sum(-1).view(kvh, b, g, t).transpose(0, 1) + suffix_exp.sum(-1)
    dtype = value.dtype
    out = torch.matmul(prefix_exp.to(dtype), prefix_value[0]).view(kvh, b, g, t, d).transpose(0, 1)
    out = out + torch.matmul(suffix_exp.view(b, kvh, g * t, s).to(dtype), value).view(b, kvh, g, t, d)
    return (out.float() / total[..., None]).to(dtype).reshape(b, h, t, d)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    shared_prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``cai_shared_prefix`` (transformers' calling convention).

    ``key``/``value`` are this layer's suffix cache; ``shared_prefix[module.layer_idx]`` its prefix K/V.
    ``attention_mask`` is the suffix's bool mask from `_suffix_mask`. Returns ``([b, t, h, d], None)``.
    Without ``shared_prefix`` it is plain SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # lazy: only when a model runs

    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    prefix_key, prefix_value = shared_prefix[module.layer_idx]
    b, _, t, d = query.shape
    if t > SPLIT_MAX_QUERIES:
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


def register() -> bool:
    """Register ``cai_shared_prefix`` with transformers (once); False where this transformers can't take it."""
    global _registered
    if _registered is None:
        try:
            from transformers import AttentionInterface  # lazy: transformers loads only when a model runs
            from transformers.masking_utils import AttentionMaskInterface  # lazy: as above
        except ImportError:
            _registered = False
        else:
            AttentionInterface.register(IMPLEMENTATION, attention_forward)
            AttentionMaskInterface.register(IMPLEMENTATION, _suffix_mask)
            _registered = True
    return _registered


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
def enabled(model: Any) -> Iterator[None]:
    """Run the model's attention as ``cai_shared_prefix`` inside the block, its own implementation after."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    before = config._attn_implementation
    config._attn_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = before
