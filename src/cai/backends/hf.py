"""The transformers backend: batched generation and exact choice scoring on CPU or GPU.

Why a hand-written decode loop instead of ``model.generate``: it lets us (1) reuse the KV cache
of a long shared prefix (the constitution's few-shot examples) across every row and every call,
(2) give each row its own seeded generator so samples don't depend on batching, and (3) drop
finished rows from the batch as they stop. On this project's CPUs, reusing a 1.5k-token prefix
made generation 2-3x and (A)/(B) scoring ~7x faster with identical greedy output.

Layout of one batch (``P`` = shared prefix, cached once; ``.`` = padding)::

    no reuse:   . . P P P P s s s        reuse:  [P P P P] . . s s s
                . P P P P s s s s                [P P P P] . s s s s
                P P P P s s s s s                [P P P P] s s s s s

Padding sits between the cached prefix and each row's suffix; the attention mask hides it and
position ids skip it, so every real token sees exactly what it would see unpadded.

With ``cascade`` (the default where the model allows it) the prefix is not copied into the rows at
all: it stays at batch 1 and each row's cache holds only its suffix, so a decoding step reads the
prefix once instead of once per row (`cai.backends.prefix_attention`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from cai.backends import prefix_attention, static_decode
from cai.backends.base import Prompt, ProgressFn, count_prompt_tokens, cut_at_stop, encode_rendered, render_with_template, seeds_per_row
from cai.backends.kv_cache import KV, PrefixCache, common_prefix_length, preallocated_layer_class
from cai.errors import CaiError
from cai.memory import keep_freed_memory
from cai.models import load_model, prepare_tokenizer
from cai.padding import pad_rows
from cai.types import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


GROUP_MIN_TOKENS = 16
"""Neighbouring rows sharing at least this many tokens past the common prefix have them prefilled once."""
GROUP_MAX_COST = 0.85
"""The grouped prefill runs where it computes at most this share of the positions one plain pass would."""


def _shared_runs(rows: Sequence[Sequence[int]], start: int, min_tokens: int) -> list[tuple[int, list[int]]]:
    """Runs of consecutive rows that share ``min_tokens`` or more tokens past ``start``.

    Returns ``(shared tokens past start, row indices)`` per run, in order, covering every row; a row in
    no run is a run of its own with 0. Each row keeps at least one token outside the shared stretch.
    """
    runs: list[tuple[int, list[int]]] = []
    i = 0
    while i < len(rows):
        members, length, common, shortest = [i], 0, len(rows[i]), len(rows[i])
        while i + len(members) < len(rows):
            j = i + len(members)
            common = min(common, common_prefix_length([rows[i], rows[j]]))
            shortest = min(shortest, len(rows[j]))
            shared = min(common, shortest - 1) - start
            if shared < min_tokens:
                break
            members, length = members + [j], shared
        runs.append((length, members))
        i += len(members)
    return runs


@dataclass
class Generation:
    """One generated continuation with its exact tokens."""

    prompt_ids: list[int]
    token_ids: list[int]
    """Sampled tokens, without the EOS that ended the row (stop strings stay in the ids)."""
    text: str
    ended: bool
    """True when the row stopped on EOS or a stop string, False when it hit max_new_tokens."""
    end_token: int | None = None
    """The EOS id the model sampled to stop (None for a stop string or the length limit)."""


class HFBackend:
    """`Backend` over a transformers causal LM.

    Args:
        model: a causal LM (eval mode).
        tokenizer: its tokenizer; a pad token is set to EOS when missing.
        batch_size: rows per forward pass (sequences per pass for ``choice_logprobs``).
        reuse_prefix: compute the KV cache of a shared prompt prefix once and reuse it.
        min_prefix_tokens: shorter shared prefixes are not worth caching.
        prefix_cache_entries: how many distinct prefixes to keep between calls.
        cascade: attend to a reused prefix stored once for the whole batch instead of copied into
            every row (same results, less memory traffic per decoding step); used where the model's
            layers are all full attention and its attention goes through transformers' registry.
        compile_decode: decode a batch of one row (chat, a lone server request, streaming) on a
            static cache with a compiled step (`cai.backends.static_decode`): faster per token,
            after a one-time compile per window size; ignored where the model can't compile.
        pack: prefill a padded batch as one packed sequence of its real tokens, so the weight
            products skip the padding (attention still runs in the padded grid; same results); used
            where the model's layers are all full attention and its attention goes through the registry.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 16,
        reuse_prefix: bool = True,
        min_prefix_tokens: int = 64,
        prefix_cache_entries: int = 4,
        cascade: bool = True,
        compile_decode: bool = False,
        pack: bool = True,
    ) -> None:
        if batch_size < 1:
            raise CaiError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        prepare_tokenizer(tokenizer)
        self.batch_size = batch_size
        self.reuse_prefix = reuse_prefix
        self.min_prefix_tokens = min_prefix_tokens
        self.prefix_cache = PrefixCache(prefix_cache_entries)
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            keep_freed_memory()  # each pass would otherwise fault its activations' pages in afresh
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.context_length = self.max_context
        self.has_chat_template = getattr(tokenizer, "chat_template", None) is not None
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.pad_id = tokenizer.pad_token_id
        text_config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        layer_types = getattr(text_config, "layer_types", None)
        self._n_layers = int(getattr(text_config, "num_hidden_layers", 0) or 0)
        self._can_preallocate = bool(self._n_layers) and (layer_types is None or set(layer_types) <= {"full_attention"})
        self.cascade = cascade
        self._can_cascade = self._can_preallocate and prefix_attention.supported(model)
        self.pack = pack
        self.static_decoder = (static_decode.StaticDecoder(model, self.max_context)
                               if compile_decode and static_decode.supported(model) else None)
        self.stats = {"prompt_tokens": 0, "prefill_tokens": 0, "generated_tokens": 0, "prefix_reused_tokens": 0,
                      "prefill_shared_rows": 0,
                      "prefill_padding_skipped": 0}

    @classmethod
    def from_spec(
        cls,
        spec: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> HFBackend:
        """Load a model spec (``bundled``, a folder, a ``.gguf``, a hub id) into a backend."""
        loaded = load_model(
            spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
            own_memory=True,
        )
        return cls(loaded.model, loaded.tokenizer, **kwargs)

    # ----------------------------------------------------------------------------- prompts

    def render(self, prompt: Prompt) -> str:
        return render_with_template(
            self.tokenizer, prompt, "this model's tokenizer has no chat template; pass plain-text prompts or use a chat model"
        )

    def count_tokens(self, prompt: Prompt) -> int:
        return count_prompt_tokens(self.tokenizer, prompt)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of rendered texts. Special tokens come from the chat template, except a BOS
        that the tokenizer would normally add to raw text."""
        return encode_rendered(self.tokenizer, texts)

    # ------------------------------------------------------------------------ shared prefix

    def _prefix_for(self, rows: Sequence[Sequence[int]], allow_new: bool) -> tuple[int, KV | None]:
        """Pick (and if worthwhile compute) the cached prefix to use for these rows.

        Every row keeps at least one token outside the prefix, because the logits that start
        generation (or score an option) come from the last prompt position.
        """
        if not self.reuse_prefix or not rows:
            return 0, None
        limit = min(common_prefix_length(rows), min(len(r) for r in rows) - 1)
        best = self.prefix_cache.longest_match(rows[0], limit)
        have = len(best) if best else 0
        if allow_new and limit >= self.min_prefix_tokens and limit - have >= self.min_prefix_tokens:
            key = tuple(rows[0][:limit])
            kv = self._prefill_prefix(key, best)
            self.prefix_cache.put(key, kv)
            return limit, kv
        if best is not None:
            return have, self.prefix_cache.entries[best]
        return 0, None

    @torch.inference_mode()
    def _prefill_prefix(self, key: tuple[int, ...], start: tuple[int, ...] | None) -> KV:
        from transformers import DynamicCache

        done = len(start) if start else 0
        cache = DynamicCache(ddp_cache_data=self.prefix_cache.entries[start]) if start else DynamicCache()
        ids = torch.tensor([key[done:]], device=self.device)
        positions = torch.arange(done, len(key), device=self.device)[None]
        mask = torch.ones(1, len(key), dtype=torch.long, device=self.device)
        self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                   logits_to_keep=1)
        self.stats["prefill_tokens"] += len(key) - done
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _batch_inputs(
        self, rows: Sequence[Sequence[int]], prefix_len: int, prefix_kv: KV | None, extra: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, KV | None]:
        """Left-pad the rows' suffixes after the shared prefix: (ids, mask, positions, cache, shared prefix).

        The cache is preallocated for ``prefix + suffix + extra`` tokens when the model's layers
        are all full attention (the common case); otherwise transformers' default cache is used.
        With cascade attention the prefix stays out of the cache and the mask: both cover the
        suffix only, and the prefix K/V come back as the last item, for `_forward` (positions
        still count the prefix, so RoPE is unchanged).
        """
        from transformers import DynamicCache

        b = len(rows)
        ids, suffix_mask = pad_rows([r[prefix_len:] for r in rows], self.pad_id, "left")
        width = ids.shape[1]
        positions = (suffix_mask.cumsum(1) - 1).clamp(min=0) + prefix_len
        shared = prefix_kv if prefix_kv is not None and self.cascade and self._can_cascade else None
        cached_prefix = 0 if shared is not None else prefix_len
        mask = torch.cat([torch.ones((b, cached_prefix), dtype=torch.long), suffix_mask], dim=1)
        cache = DynamicCache()
        if self._can_preallocate:
            layer = preallocated_layer_class()
            cache.layers = [layer(cached_prefix + width + extra) for _ in range(self._n_layers)]
        if prefix_kv is not None:
            if shared is None:
                for i, (k, v) in enumerate(prefix_kv):
                    cache.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), i)
            self.stats["prefix_reused_tokens"] += prefix_len * b
        self.stats["prefill_tokens"] += int(suffix_mask.sum())
        return ids.to(self.device), mask.to(self.device), positions.to(self.device), cache, shared

    def _prefill(self, rows: Sequence[Sequence[int]], prefix_len: int, prefix_kv: KV | None, extra: int,
                 trees: Sequence[tuple[list[int], list[int]]] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, KV | None]:
        """Run the rows' suffixes after the shared prefix: (last-position logits, mask, positions, cache, shared prefix).

        Runs of neighbouring rows that share a further stretch past the prefix (a pair's prompt in both
        orders, one conversation under several principles) have that stretch prefilled once per run and
        its cache copied to each row, whose own tail then runs on top of it, where that computes fewer
        positions (padding included) than one pass over every row's whole suffix. ``mask`` and
        ``positions`` cover what `_batch_inputs` would give, ``positions`` those of the last pass.
        Off with ``reuse_prefix=False`` (that backend computes every row's whole prompt) and for models
        with other than full-attention layers.

        ``trees`` (only where the backend packs, `_can_pack`): per row, tokens that branch off its end,
        as ``(tokens, parents)`` with ``parents[k]`` the index of token k's parent among them (-1: the
        prompt's last token). They run in the last pass, each seeing the prompt and its own ancestors
        only, at the position after its parent's; the logits come back ``[rows + all tokens, vocab]``:
        the rows' last positions, then each row's branch tokens in order. Mask, positions and cache then
        hold the branches too, so they are for reading logits only.
        """
        branches = [list(t[0]) for t in trees] if trees is not None else [[] for _ in rows]
        # Full-attention models only: a sliding window counts cache slots, and this adds a padded stretch.
        groups = _shared_runs(rows, prefix_len, GROUP_MIN_TOKENS) if self.reuse_prefix and self._can_preallocate else []
        multi = [(length, members) for length, members in groups if len(members) > 1]
        widest = max(len(r) + len(n) for r, n in zip(rows, branches)) - prefix_len
        part_width = max((length for length, _ in multi), default=0)
        tail_width = max((len(rows[i]) + len(branches[i]) - prefix_len - length for length, members in groups
                          for i in members), default=0)
        if not multi or len(multi) * part_width + len(rows) * tail_width > GROUP_MAX_COST * len(rows) * widest:
            ids, mask, positions, cache, shared = self._batch_inputs(
                [list(r) + n for r, n in zip(rows, branches)], prefix_len, prefix_kv, extra)
            return self._prefill_pass(shared, ids, mask, positions, cache, trees), mask, positions, cache, shared
        parts = [rows[members[0]][:prefix_len + length] for length, members in multi]
        ids, mask, positions, cache, shared = self._batch_inputs(parts, prefix_len, prefix_kv, tail_width + extra)
        self._prefill_pass(shared, ids, mask, positions, cache)
        source, shared_len = [0] * len(rows), [0] * len(rows)
        for g, (length, members) in enumerate(multi):
            for i in members:
                source[i], shared_len[i] = g, length
        index = torch.tensor(source, device=self.device)
        cache.batch_select_indices(index)
        if prefix_kv is not None:  # _batch_inputs counted the runs; every row reads the prefix
            self.stats["prefix_reused_tokens"] += prefix_len * (len(rows) - len(multi))
        mask = mask[index]
        alone = torch.tensor([length == 0 for length in shared_len], device=self.device)
        mask[:, mask.shape[1] - ids.shape[1]:] *= ~alone[:, None]  # a row in no run sees none of the first pass
        tails, tail_mask = pad_rows([list(r[prefix_len + n:]) + b for r, n, b in zip(rows, shared_len, branches)],
                                    self.pad_id, "left")
        tail_positions = (tail_mask.cumsum(1) - 1).clamp(min=0) + prefix_len + torch.tensor(shared_len)[:, None]
        mask = torch.cat([mask, tail_mask.to(self.device)], dim=1)
        tail_positions = tail_positions.to(self.device)
        self.stats["prefill_tokens"] += int(tail_mask.sum())
        logits = self._prefill_pass(shared, tails.to(self.device), mask, tail_positions, cache, trees)
        return logits, mask, tail_positions, cache, shared

    @property
    def _can_pack(self) -> bool:
        """Whether prefill passes run packed (`_prefill_pass`): needs transformers' attention registry."""
        return self.pack and self._can_cascade

    def _prefill_pass(self, shared: KV | None, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                      cache: Any, trees: Sequence[tuple[list[int], list[int]]] | None = None) -> torch.Tensor:
        """One prefill pass over left-padded rows ``ids [b, w]`` (``mask`` covers the cache and them):
        each row's last-position logits ``[b, vocab]`` (with ``trees``, see `_prefill`: the last
        ``len(tokens)`` columns of each row are its branch tokens, and their logits follow).

        A batch with padding (or branches) runs packed where the backend can (`_can_pack`): the model
        reads its real tokens only, as one sequence, and attention and the cache work in the padded grid
        (`prefix_attention.Packed`), with the mask given ready-made, causal within the pass.
        """
        b, width = ids.shape
        real = mask[:, -width:].bool()
        padding = b * width - int(real.sum())
        if trees is None and not (padding and self._can_pack):
            return self._forward(shared, input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                 logits_to_keep=1).logits[:, -1, :]
        within = torch.ones((b, width, width), dtype=torch.bool).tril()  # built here, then moved: many small writes
        keep = [r * width + width - 1 for r in range(b)]
        if trees is not None:
            positions = positions.to("cpu", copy=True)
            for r, (tokens, parents) in enumerate(trees):
                start = width - len(tokens)
                keep[r] = r * width + start - 1
                for k, parent in enumerate(parents):
                    column = start + k
                    above = start - 1 if parent < 0 else start + parent
                    positions[r, column] = positions[r, above] + 1
                    within[r, column, start:] = False  # a branch token sees the prompt, itself and its ancestors only
                    within[r, column, column] = True
                    while parent >= 0:
                        within[r, column, start + parent] = True
                        parent = parents[parent]
            keep += [r * width + width - len(tokens) + k for r, (tokens, _) in enumerate(trees) for k in range(len(tokens))]
            positions = positions.to(self.device)
        index = real.reshape(-1).nonzero().squeeze(1)
        packed = prefix_attention.Packed(b, width, index)
        order = torch.full((b * width,), -1, dtype=torch.long, device=self.device)
        order[index] = torch.arange(len(index), device=self.device)
        past = mask.shape[1] - width
        visible = mask.bool()[:, None, None, :].repeat(1, 1, width, 1)  # [b, 1, w, cached + w]: True = attend
        visible[:, 0, :, past:] &= within.to(self.device)
        self.stats["prefill_padding_skipped"] += padding
        for layer in cache.layers:
            layer.packed = packed
        try:
            out = self._forward(shared, input_ids=packed.pack(ids), attention_mask=visible,
                                position_ids=packed.pack(positions), cache=cache, packed=packed,
                                logits_to_keep=order[torch.tensor(keep, device=self.device)])
        finally:
            for layer in cache.layers:
                layer.packed = None
        return out.logits[0]

    def _forward(self, shared_prefix: KV | None, **inputs: Any) -> Any:
        """One cached forward pass; over a shared prefix kept apart from the rows when one is given, and
        packed (`_prefill_pass`) when ``packed`` is."""
        if shared_prefix is None and inputs.get("packed") is None:
            return self.model(use_cache=True, **inputs)
        with prefix_attention.enabled(self.model):
            return self.model(use_cache=True, shared_prefix=shared_prefix, **inputs)

    def close(self) -> None:
        """Drop this backend's hold on the model and its cached prefixes, and return the memory.

        The weights are freed once nothing else holds the model (a trainer that passed its own
        model in keeps it).
        """
        import gc

        self.prefix_cache.clear()
        on_cuda = self.device.type == "cuda"
        self.model = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    def _check_open(self) -> None:
        if self.model is None:
            raise CaiError("this model backend was closed; load the model again to use it")

    # --------------------------------------------------------------------------- generate

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
        progress: ProgressFn | None = None,
    ) -> list[str]:
        """Batched, length-sorted generation; see `cai.backends.base.Backend.generate`."""
        return [g.text for g in self.generate_tokens(prompts, params, seeds=seeds, progress=progress)]

    def generate_tokens(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
        progress: ProgressFn | None = None,
    ) -> list[Generation]:
        """Like `generate`, with the exact prompt and sampled token ids (what RL trains on)."""
        self._check_open()
        if not prompts:
            return []
        row_seeds = seeds_per_row(seeds, params.seed, len(prompts))
        texts = [self.render(p) for p in prompts]
        rows = self.encode(texts)
        for i, row in enumerate(rows):
            if not row:
                raise CaiError(f"prompt {i} is empty")
            if self.max_context and len(row) + params.max_new_tokens > self.max_context:
                raise CaiError(
                    f"prompt {i} has {len(row)} tokens, which with max_new_tokens={params.max_new_tokens} exceeds "
                    f"the model's context of {self.max_context} tokens; shorten it or lower max_new_tokens"
                )
        self.stats["prompt_tokens"] += sum(len(r) for r in rows)
        prefix_len, prefix_kv = self._prefix_for(rows, allow_new=len(rows) > 1)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        outputs: list[Generation | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            results = self._generate_batch(
                [rows[i] for i in batch], prefix_len, prefix_kv, params, [row_seeds[i] for i in batch]
            )
            for i, (text, tokens, ended, end_token) in zip(batch, results):
                outputs[i] = Generation(prompt_ids=list(rows[i]), token_ids=tokens, text=text, ended=ended,
                                        end_token=end_token)
            if progress is not None:
                progress(len(batch), sum(len(r[1]) for r in results))
        return outputs  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(
        self,
        rows: list[Sequence[int]],
        prefix_len: int,
        prefix_kv: KV | None,
        params: SamplingParams,
        seeds: list[int],
    ) -> list[tuple[str, list[int], bool, int | None]]:
        """(text, generated token ids, whether it ended by EOS/stop, the EOS id sampled) per row.

        Identical prompts in the batch (K samples of one prompt, N votes on one question) are
        prefilled once and their cache copied to each row, so only decoding is paid per sample.
        A lone row goes to the compiled single-row path when the backend has one.
        """
        if self.static_decoder is not None and len(rows) == 1:
            return [self._decode_static(rows[0], params, seeds[0])]
        unique = list(dict.fromkeys(tuple(r) for r in rows))
        logits, mask, positions, cache, shared = self._prefill(unique, prefix_len, prefix_kv, params.max_new_tokens)
        if len(unique) < len(rows):
            where = {row: i for i, row in enumerate(unique)}
            index = torch.tensor([where[tuple(r)] for r in rows], device=self.device)
            cache.batch_select_indices(index)
            logits, mask, positions = logits[index], mask[index], positions[index]
            self.stats["prefill_shared_rows"] += len(rows) - len(unique)
        next_pos = positions[:, -1] + 1
        generators = None
        if not params.greedy:
            generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        active = list(range(len(rows)))
        generated: list[list[int]] = [[] for _ in rows]
        ended = [False] * len(rows)
        end_tokens: list[int | None] = [None] * len(rows)
        for step in range(params.max_new_tokens):
            tokens = self.next_tokens(logits, params, generators)
            keep: list[int] = []
            for a, (i, tok) in enumerate(zip(active, tokens.tolist())):
                if tok in self.eos_ids:
                    ended[i] = True
                    end_tokens[i] = tok
                    continue
                generated[i].append(tok)
                if params.stop and cut_at_stop(self.tokenizer.decode(generated[i]), params.stop)[1]:
                    ended[i] = True
                    continue
                keep.append(a)
            if not keep or step == params.max_new_tokens - 1:
                break
            if len(keep) < len(active):
                # Finished rows leave the batch: no more compute is spent on them.
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, next_pos, tokens = mask[index], next_pos[index], tokens[index]
                active = [active[a] for a in keep]
                if generators is not None:
                    generators = [generators[a] for a in keep]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=self.device)], dim=1)
            logits = self._forward(
                shared, input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None], cache=cache,
            ).logits[:, -1, :]
            next_pos = next_pos + 1
        self.stats["generated_tokens"] += sum(len(g) for g in generated)
        texts = [cut_at_stop(self.tokenizer.decode(g, skip_special_tokens=True), params.stop)[0] for g in generated]
        return list(zip(texts, generated, ended, end_tokens))

    def _decode_static(self, row: Sequence[int], params: SamplingParams, seed: int
                       ) -> tuple[str, list[int], bool, int | None]:
        """One row on a static cache with the compiled step; the same tokens as the batched loop."""
        stream = self.static_decoder.start(row, params.max_new_tokens)
        self.stats["prefill_tokens"] += len(row)
        generators = None if params.greedy else [torch.Generator(device=self.device).manual_seed(seed)]
        logits, generated, ended, end_token = stream.logits, [], False, None
        for step in range(params.max_new_tokens):
            tok = int(self.next_tokens(logits, params, generators)[0])
            if tok in self.eos_ids:
                ended, end_token = True, tok
                break
            generated.append(tok)
            if params.stop and cut_at_stop(self.tokenizer.decode(generated), params.stop)[1]:
                ended = True
                break
            if step < params.max_new_tokens - 1:
                logits = stream.step(torch.tensor([tok], device=self.device))
        self.stats["generated_tokens"] += len(generated)
        text = cut_at_stop(self.tokenizer.decode(generated, skip_special_tokens=True), params.stop)[0]
        return text, generated, ended, end_token

    @staticmethod
    def next_tokens(
        logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None
    ) -> torch.Tensor:
        """Pick each row's next token: the one decoding step every sampler here shares.

        `generate` calls it once per step, and `stream` for its one row, so a seeded request
        samples the same tokens either way.

        Args:
            logits: ``(rows, vocab)`` next-token logits (the last position of each row).
            params: greedy when ``params.temperature == 0``; otherwise temperature, then top-k,
                then top-p filtering.
            generators: one seeded generator per row, or None for greedy decoding.

        Returns:
            ``(rows,)`` token ids (long), on the logits' device.
        """
        if generators is None:
            return logits.argmax(dim=-1)
        logits = logits.float() / params.temperature
        if params.top_k:
            kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            return HFBackend._sample_nucleus(logits.softmax(-1), params.top_p, generators)
        return HFBackend._sample(logits.softmax(-1), generators)

    @staticmethod
    def _sample(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """One token per row of ``probs [rows, vocab]``, drawn with the row's own generator (inverse CDF).

        Each row takes one uniform number from its generator and the batch one search of the cumulative
        probabilities (float64, so a token's share of the sum is kept to ~1e-16), so a row's token never
        depends on the other rows. `torch.multinomial` draws one random number per vocabulary entry
        instead: ~1 ms a row for a 49k vocabulary on the reference CPU (17 against ~1.5 ms for 16 rows).
        A token of probability 0 is never drawn; probabilities that are not numbers raise `CaiError`.
        """
        cdf = probs.cumsum(-1, dtype=torch.float64)
        if not bool(torch.isfinite(cdf[:, -1]).all()):
            raise CaiError("the model's next-token probabilities are not numbers (NaN or infinite logits): "
                           "check the model's weights and dtype")
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64, device=probs.device) for g in generators])
        picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        # u * total can round up to the total itself: then take the row's last token that has any probability.
        last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.uint8).argmax(-1)
        return torch.minimum(picked, last)

    def stream(self, prompt_ids: Sequence[int], *, score_prompt: bool = False,
               lock: AbstractContextManager | None = None) -> TokenStream:
        """One prompt, run through the model once and then decoded a token at a time (streaming).

        This is the token-level path of ``cai serve`` (streaming, log-probs, ``echo``): the prompt's
        forward pass happens here, and each further forward pass only when the caller asks the
        returned `TokenStream` for the next token, so a caller that stops asking stops the work.
        Tokens are picked by `next_tokens` with a generator seeded like a row of `generate`, so a
        seeded request gives the same tokens on either path (no shared-prefix cache is used here).

        Args:
            prompt_ids: the prompt's token ids (already rendered and encoded).
            score_prompt: keep the logits of every prompt position (`TokenStream.prompt_logits`),
                for scoring the prompt's own tokens; otherwise only the last position's.
            lock: held around each forward pass, for a model that several threads share.

        Raises:
            CaiError: the backend was closed.
        """
        self._check_open()
        return TokenStream(self, prompt_ids, score_prompt, lock or nullcontext())

    @staticmethod
    def _sample_nucleus(probs: torch.Tensor, top_p: float, generators: list[torch.Generator],
                        candidates: int = 1024) -> torch.Tensor:
        """Top-p sampling: each row's token from the smallest set of its most likely tokens whose mass
        reaches ``top_p`` (a token is in while the mass of the more likely ones is under ``top_p``),
        in proportion to their probabilities.

        Sorting a 50k vocabulary every step is slow on CPUs, so a row draws among its top ``candidates``
        (sorted by `torch.topk`) when its nucleus ends there, as it nearly always does, and only the
        other rows sort the whole vocabulary. Either way the row draws with `_sample` over its tokens in
        descending order of probability, so its token depends on its own logits and generator only.
        """
        rows, vocab = probs.shape
        k = min(candidates, vocab)
        top_probs, top_idx = torch.topk(probs, k, dim=-1)
        fits = (top_probs.sum(-1) >= top_p) | (k == vocab)  # the next token's preceding mass reaches top_p
        out = torch.empty(rows, dtype=torch.long, device=probs.device)
        for where, ordered in ((fits, None), (~fits, True)):
            index = where.nonzero().squeeze(1)
            if not len(index):
                continue
            if ordered is None:
                sorted_probs, sorted_idx = top_probs[index], top_idx[index]
            else:
                sorted_probs, sorted_idx = torch.sort(probs[index], descending=True, dim=-1)
            kept = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p, 0.0)
            picked = HFBackend._sample(kept, [generators[i] for i in index.tolist()])
            out[index] = sorted_idx.gather(1, picked[:, None]).squeeze(1)
        return out

    # ---------------------------------------------------------------------- choice scoring

    def choice_logprobs(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """Exact log-probability of each option after each prompt (sum over the option's tokens).

        Each prompt is run once: its last position scores every option's first token, then the
        prompt's KV cache is repeated once per option and the options' remaining tokens run on
        top of it (a few tokens each). An option's tokens are those the tokenizer gives the text
        prompt + option past the prompt's own tokens, so a SentencePiece tokenizer (whose " (A)"
        alone would gain a leading "▁" token) is scored on what it really reads. Where the prompt's
        last token would merge with the option's first, the option's own tokens are used.
        """
        self._check_open()
        if not prompts:
            return []
        if not options:
            raise CaiError("choice_logprobs needs at least one option")
        prompt_ids = self.encode(list(prompts))
        alone = self.tokenizer(list(options), add_special_tokens=False)["input_ids"]
        for j, o in enumerate(alone):
            if not o:
                raise CaiError(f"option {j} ({options[j]!r}) has no tokens")
        joined = self.encode([p + o for p in prompts for o in options])
        option_ids = [[self._continuation(prompt_ids[i], joined[i * len(options) + j], alone[j])
                       for j in range(len(options))] for i in range(len(prompts))]
        for i, p in enumerate(prompt_ids):
            if not p:
                raise CaiError(f"prompt {i} is empty")
            if self.max_context and len(p) + max(map(len, option_ids[i])) > self.max_context:
                raise CaiError(
                    f"prompt {i} has {len(p)} tokens, more than the model's context of {self.max_context} allows"
                )
        self.stats["prompt_tokens"] += sum(len(p) for p in prompt_ids)
        prefix_len, prefix_kv = self._prefix_for(prompt_ids, allow_new=len(prompt_ids) > 1)
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        result: list[list[float]] = [[] for _ in prompt_ids]
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            for i, scores in zip(batch, self._score_batch([prompt_ids[i] for i in batch], [option_ids[i] for i in batch],
                                                          prefix_len, prefix_kv)):
                result[i] = scores
        return result

    @staticmethod
    def _continuation(prompt: list[int], joined: list[int], alone: list[int]) -> list[int]:
        """The option's tokens within ``prompt + option`` (its own tokens if the boundary merged)."""
        if len(joined) > len(prompt) and joined[: len(prompt)] == prompt:
            return joined[len(prompt):]
        return alone

    @torch.inference_mode()
    def _score_batch(
        self, rows: list[list[int]], option_ids: list[list[list[int]]], prefix_len: int, prefix_kv: KV | None
    ) -> list[list[float]]:
        """``option_ids[b][j]``: the tokens of option j after row b.

        Where the backend packs (`_can_pack`), the options' tokens but the last run in the prompts' own
        last pass as branches off each prompt's end (`_prefill`), one token per distinct option prefix
        (" (" once for " (A)" and " (B)"); otherwise a second pass runs them over copies of the cache.
        """
        n_opt, longest = len(option_ids[0]), max(len(o) for opts in option_ids for o in opts)
        if self._can_pack and longest > 1:
            trees, reads = [], []
            for opts in option_ids:
                nodes: dict[tuple[int, ...], int] = {}
                tokens, parents = [], []
                for o in opts:
                    for k in range(1, len(o)):
                        if tuple(o[:k]) not in nodes:
                            nodes[tuple(o[:k])] = len(tokens)
                            tokens.append(o[k - 1])
                            parents.append(nodes[tuple(o[:k - 1])] if k > 1 else -1)
                trees.append((tokens, parents))
                reads.append([[nodes[tuple(o[:k])] for k in range(1, len(o))] for o in opts])
            logits = self._prefill(rows, prefix_len, prefix_kv, 0, trees)[0].float().log_softmax(-1)
            scores, offset = [], len(rows)
            for b, opts in enumerate(option_ids):
                scores.append([float(logits[b, o[0]]) + sum(float(logits[offset + node, o[k + 1]])
                                                            for k, node in enumerate(reads[b][j]))
                               for j, o in enumerate(opts)])
                offset += len(trees[b][0])
            return scores
        logits, mask, positions, cache, shared = self._prefill(rows, prefix_len, prefix_kv, longest)
        first = logits.float().log_softmax(-1)
        scores = [[float(first[b, o[0]]) for o in option_ids[b]] for b in range(len(rows))]
        if longest == 1:
            return scores
        # Row b's cache becomes rows b*n_opt + j, one per option; feed each option's tokens but the last.
        # (A shared prefix kept apart by cascade attention stays one copy for all of them.)
        cache.batch_repeat_interleave(n_opt)
        width = longest - 1
        tail, _ = pad_rows([o[:-1] for opts in option_ids for o in opts], self.pad_id, "right", width)
        tail_positions = positions[:, -1:].repeat_interleave(n_opt, 0) + 1 + torch.arange(width, device=self.device)
        tail_mask = torch.cat([mask.repeat_interleave(n_opt, 0),
                               torch.ones((len(rows) * n_opt, width), dtype=mask.dtype, device=self.device)], dim=1)
        logprobs = self._forward(
            shared, input_ids=tail.to(self.device), attention_mask=tail_mask, position_ids=tail_positions, cache=cache,
        ).logits.float().log_softmax(-1)
        for b in range(len(rows)):
            for j, o in enumerate(option_ids[b]):
                for k in range(1, len(o)):
                    scores[b][j] += float(logprobs[b * n_opt + j, k - 1, o[k]])
        return scores


class TokenStream:
    """One prompt on an `HFBackend`'s model, decoded a token at a time; made by `HFBackend.stream`.

    Attributes:
        prompt_logits: with ``score_prompt``, the logits ``[len(prompt_ids), vocab]`` of every
            prompt position (row i scores token i + 1); otherwise None.
    """

    def __init__(self, backend: HFBackend, prompt_ids: Sequence[int], score_prompt: bool,
                 lock: AbstractContextManager) -> None:
        from transformers import DynamicCache  # lazy: as in _batch_inputs, transformers loads only when a model runs

        self._backend, self._lock = backend, lock
        self._cache = DynamicCache()
        with lock, torch.inference_mode():
            ids = torch.tensor([list(prompt_ids)], device=backend.device)
            logits = backend.model(input_ids=ids, cache=self._cache, use_cache=True,
                                   logits_to_keep=0 if score_prompt else 1).logits[0]
        self.prompt_logits = logits if score_prompt else None
        self._next_logits = logits[-1:]

    def tokens(self, params: SamplingParams, seed: int) -> Iterator[tuple[int, torch.Tensor] | None]:
        """Each step's ``(token id, the model's log-probs [vocab] at that position)``; None when the row ends on EOS.

        The log-probs are the model's own (log-softmax of its logits, before temperature, top-k or
        top-p). At most ``params.max_new_tokens`` steps; iterate once per stream.
        """
        backend, logits = self._backend, self._next_logits
        generators = None if params.greedy else [torch.Generator(device=backend.device).manual_seed(seed)]
        static = None
        if backend.static_decoder is not None and params.max_new_tokens > 1:
            with self._lock:
                static = backend.static_decoder.adopt([(layer.keys, layer.values) for layer in self._cache.layers],
                                                      logits, params.max_new_tokens)
            self._cache = None
        for step in range(params.max_new_tokens):
            token = backend.next_tokens(logits, params, generators)
            tid = int(token[0])
            if tid in backend.eos_ids:
                yield None
                return
            yield tid, logits[0].float().log_softmax(-1)
            if step + 1 < params.max_new_tokens:
                with self._lock, torch.inference_mode():
                    if static is not None:
                        logits = static.step(token)
                    else:
                        logits = backend.model(input_ids=token[:, None], cache=self._cache,
                                               use_cache=True).logits[:, -1, :]
