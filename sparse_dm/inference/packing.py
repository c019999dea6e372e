"""The packed, feature-major column order the sparse bidirectional GRU walks.

Sequences are sorted longest first. Column (s, b) holds step s of the b-th longest sequence, for
s < L_b only, and columns are grouped by step: step s owns the contiguous block
[offsets[s], offsets[s] + active[s]). This is PyTorch's PackedSequence order, laid out feature-major.

The reverse direction walks each sequence from its own end, so at step s it reads time L_b - 1 - s:
both directions are active on the same columns at every step (no padding is ever computed), and
`mirror` maps column (s, b) to column (L_b - 1 - s, b).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PackedColumns:
    """Index maps between a padded batch (B, L, ...) and packed feature-major columns."""

    batch: int
    max_len: int
    order: Tensor  # (B,) original sample index of the b-th longest sequence
    active: tuple[int, ...]  # active[s]: sequences longer than s (non-increasing, active[0] = B)
    offsets: tuple[int, ...]  # first column of step s
    source_rows: Tensor  # (N,) row order[b] * L + s of column (s, b) in a (B * L, ...) flattening
    sorted_batch: Tensor  # (N,) b of column (s, b)
    mirror: Tensor  # (N,) column (L_b - 1 - s, b) of column (s, b)

    @property
    def num_columns(self) -> int:
        return len(self.source_rows)


def pack_columns(lengths: Tensor | None, batch: int, max_len: int) -> PackedColumns:
    """The walk for `lengths` (None: every sequence fills `max_len`)."""
    if lengths is None:
        lengths = torch.full((batch,), max_len, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > max_len):
        raise ValueError(f"lengths must be in [1, {max_len}] (the padded length), got {lengths.tolist()}")
    sorted_lengths, order = torch.sort(lengths, descending=True, stable=True)
    longest = int(sorted_lengths[0]) if batch else 0
    steps = torch.arange(longest)
    active_t = (sorted_lengths[None, :] > steps[:, None]).sum(dim=1)
    offsets_t = torch.cumsum(active_t, 0) - active_t
    step_of = torch.repeat_interleave(steps, active_t)
    sorted_batch = torch.arange(len(step_of)) - offsets_t[step_of]
    mirror_step = sorted_lengths[sorted_batch] - 1 - step_of
    return PackedColumns(
        batch=batch,
        max_len=max_len,
        order=order,
        active=tuple(active_t.tolist()),
        offsets=tuple(offsets_t.tolist()),
        source_rows=order[sorted_batch] * max_len + step_of,
        sorted_batch=sorted_batch,
        mirror=offsets_t[mirror_step] + sorted_batch,
    )


def paired_input(features: Tensor, columns: PackedColumns) -> Tensor:
    """(B, L, F) padded features -> (2F + 1, N): [x(s); 1; x(L_b - 1 - s)] per packed column."""
    flat = features.reshape(-1, features.shape[-1])
    at_step = flat.index_select(0, columns.source_rows)
    at_mirror = at_step.index_select(0, columns.mirror)
    ones = torch.ones(columns.num_columns, 1, dtype=features.dtype, device=features.device)
    return torch.cat([at_step, ones, at_mirror], dim=1).t().contiguous()


def natural_columns(width: int, from_bigru: bool) -> tuple[list[int], list[int]]:
    """Where the natural input x(t) of a layer sits in a paired input of `width` features per half.

    Returns (columns of x(s), columns of x(L_b - 1 - s)). From raw features x(s) is the first half.
    From a bidirectional GRU's paired output [y_f(s), y_r(s); 1; y_f(s'), y_r(s')] with
    s' = L_b - 1 - s, x(t) = [y_f(t), y_r(L_b - 1 - t)], so x(s) = [y_f(s), y_r(s')] and
    x(s') = [y_f(s'), y_r(s)].
    """
    first = list(range(width))
    second = list(range(width + 1, 2 * width + 1))
    if not from_bigru:
        return first, second
    half = width // 2
    return first[:half] + second[half:], second[:half] + first[half:]
