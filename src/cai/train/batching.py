"""How a training epoch is cut up: equal batches per rank, micro-batches under a token budget, and
the number of optimizer steps that makes. Index arithmetic only; no model is touched.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def split_by_tokens(lengths: Sequence[int], max_tokens: int | None) -> list[list[int]]:
    """Positions ``0..n-1`` of a batch grouped into micro-batches of at most ``max_tokens`` padded tokens.

    Rows go longest first, so each micro-batch pads to its own longest row; a micro-batch is cut
    when one more row would make ``rows x longest`` exceed ``max_tokens`` (a single longer row still
    forms one alone). Activation memory grows with the tokens of one forward pass (about 1.8 MB per
    token for a 135M model in fp32), so this bounds it while the gradients, added up with each
    micro-batch's share of the loss, stay those of the whole batch.

    Args:
        lengths: the token length of each row (a row that is a pair of sequences: the longer of the two,
            with ``max_tokens`` halved by the caller).
        max_tokens: the budget; None or 0 keeps the batch whole (still ordered longest first).

    Returns:
        Lists of positions, every position exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if not max_tokens:
        return [order] if order else []
    chunks: list[list[int]] = []
    for i in order:
        if chunks and (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] <= max_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def micro_batch_tokens(value: int | None, device: torch.device | str) -> int | None:
    """The token budget of one forward pass: ``value`` when set, else 512 on a CPU and no limit on a GPU.

    On the reference 2-core CPU (bundled model, forward + backward of 1,600 tokens) passes of 400
    and 800 tokens took 5.0 s and 4.6 s against 6.3 s for one pass (the larger pass's activations
    fall out of cache), and held 2.2 and 1.4 GB less; a GPU wants the big batch.
    """
    if value:
        return value
    return 512 if torch.device(device).type == "cpu" else None


def batches_for_rank(order: Sequence[int], batch_size: int, num_processes: int, process_index: int) -> list[list[int]]:
    """This rank's share of one epoch's batches, the same number on every rank.

    ``order`` (the epoch's shuffled example indices) is cut into batches of ``batch_size``; ranks take
    every ``num_processes``-th batch. A rank with fewer batches than the others would wait forever in
    DDP's all-reduce, so the first batches are repeated to fill the last round (what accelerate's
    ``even_batches`` does).

    Returns:
        Lists of example indices, ``ceil(ceil(len(order) / batch_size) / num_processes)`` of them.
    """
    batches = [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    batches += [batches[i % len(batches)] for i in range(-len(batches) % num_processes)]
    return batches[process_index::num_processes]

def total_steps(n_examples: int, batch_size: int, accumulation: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps one rank takes: ``batch_size`` is the global batch (per-rank size x ranks).

    The last, smaller group of an epoch still counts as a step; ``max_steps`` (when set) caps the total.
    """
    per_epoch = math.ceil(math.ceil(n_examples / batch_size) / accumulation)
    steps = per_epoch * epochs
    return min(steps, max_steps) if max_steps else steps
