"""This process's place among several training processes (accelerate), for a loop that shares work by hand."""

from __future__ import annotations

from typing import Any, Sequence

import torch


class Ranks:
    """This process's place among the training processes, and the few collectives an RL loop needs.

    With one process every method is the identity, so a single-process run computes exactly what
    it would without accelerate. Wraps an ``accelerate.Accelerator``.
    """

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.index = accelerator.process_index
        self.count = accelerator.num_processes
        self.is_main = accelerator.is_main_process

    def share(self, items: Sequence[Any]) -> list[Any]:
        """This rank's items: every ``count``-th one, from its ``index``."""
        return list(items[self.index::self.count])

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64, so counts and sums stay exact)."""
        if self.count == 1:
            return [float(v) for v in values]
        total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(total, reduction="sum").tolist()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` [n, ...] concatenated in rank order (same n on every rank)."""
        if self.count == 1:
            return tensor
        return self.accelerator.gather(tensor.to(self.accelerator.device)).to(tensor.device)

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Every rank's list of picklable items, concatenated in rank order (lengths may differ)."""
        if self.count == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(items)
