"""Token rows of different lengths as one padded tensor: the one padding rule of the backends,
training and evaluation.

Left padding puts each row's last token in the last column: what generation and last-position
scoring read. Right padding puts token t of every row in column t: what teacher-forced losses and
scores read.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"],
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token rows on ``side`` with ``pad_id`` into ids and an attention mask.

    Args:
        rows: token ids, one list per row (an empty row is all padding).
        pad_id: the id padding positions hold (``-100`` pads labels that a loss ignores).
        side: ``left`` or ``right``.
        width: the number of columns; the longest row when None (a given width must fit it).

    Returns:
        ``(ids, mask)``, both ``[len(rows), width]`` int64 on the CPU; the mask is 1 on the rows'
        own tokens and 0 on padding.
    """
    if width is None:
        width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
    return ids, mask
