"""KV-cache pieces of the transformers backend: shared-prefix caches kept across calls, and a
cache layer preallocated for a whole generation."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every row."""
    if not rows:
        return 0
    first, n = rows[0], min(len(r) for r in rows)
    for row in rows[1:]:
        i = 0
        while i < n and row[i] == first[i]:
            i += 1
        n = i
    return n


class PrefixCache:
    """A few KV caches of shared prompt prefixes, kept across calls (least recently used out).

    A new prefix that extends a cached one is computed from it, so only the extra tokens are
    prefilled.
    """

    def __init__(self, max_entries: int = 4) -> None:
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[int, ...], KV] = OrderedDict()

    def longest_match(self, ids: Sequence[int], limit: int) -> tuple[int, ...] | None:
        """The longest cached prefix of ``ids[:limit]``."""
        best = None
        for key in self.entries:
            if len(key) <= limit and (best is None or len(key) > len(best)) and tuple(ids[: len(key)]) == key:
                best = key
        if best is not None:
            self.entries.move_to_end(best)
        return best

    def put(self, key: tuple[int, ...], kv: KV) -> None:
        self.entries[key] = kv
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()


def preallocated_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A KV cache layer that writes into a buffer sized for the whole generation.

        The default layer grows with ``torch.cat`` at every step, copying the whole cache each
        time; with long shared prefixes that copy dominated decoding (~50% of each step here).
        ``keys``/``values`` are views of the filled part, so the rest of transformers is unchanged.
        While ``packed`` is set (a `cai.backends.prefix_attention.Packed`), updates come packed and are
        stored unpacked into the batch's padded grid.
        """

        packed = None

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.length = 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            b, h, _, d = key_states.shape
            self.device = key_states.device
            self._k = torch.empty((b, h, self.capacity, d), dtype=key_states.dtype, device=self.device)
            self._v = torch.empty((b, h, self.capacity, value_states.shape[-1]), dtype=value_states.dtype,
                                  device=self.device)
            self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if self.packed is not None:
                key_states, value_states = self.packed.unpack(key_states), self.packed.unpack(value_states)
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self._k.shape[2]:  # more than planned: grow (rare; keeps correctness)
                grow = max(end, 2 * self._k.shape[2]) - self._k.shape[2]
                self._k = torch.cat([self._k, self._k.new_empty((*self._k.shape[:2], grow, self._k.shape[3]))], 2)
                self._v = torch.cat([self._v, self._v.new_empty((*self._v.shape[:2], grow, self._v.shape[3]))], 2)
            self._k[:, :, self.length:end] = key_states
            self._v[:, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self._k, self._v = self._k[indices], self._v[indices]
                self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self._k = self._k.repeat_interleave(repeats, dim=0)
                self._v = self._v.repeat_interleave(repeats, dim=0)
                self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    return PreallocatedLayer
