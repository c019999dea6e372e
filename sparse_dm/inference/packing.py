"""The packed, feature-major column order the sparse bidirectional GRU walks.

Sequences are sorted longest first. Column (s, b) holds step s of the b-th longest sequence, for
s < L_b only, and columns are grouped by step: step s owns the contiguous block
[offsets[s], offsets[s] + active[s]). This is PyTorch's PackedSequence order, laid out feature-major.

The reverse direction walks each sequence from its own end, so at step s it reads time L_b - 1 - s:
both directions are active on the same columns at every step (no padded time step is ever
computed), and `mirror` maps column (s, b) to column (L_b - 1 - s, b).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PackedColumns:
    """Index maps between a padded batch (B, L, ...) and packed feature-major columns.

    With `lanes` > 1 every step's block is padded to a multiple of `lanes` columns (the compiled
    GRU loop works in whole vectors): padding columns read a zero input row, mirror onto themselves,
    and are dropped again through `real`. With `lanes` = 1 there is no padding and `real` is the
    identity."""

    batch: int
    max_len: int
    lanes: int
    order: Tensor  # (B,) original sample index of the b-th longest sequence
    active: tuple[int, ...]  # active[s]: sequences longer than s (non-increasing, active[0] = B)
    offsets: tuple[int, ...]  # first column of step s
    source_rows: Tensor  # (C,) row order[b] * L + s of column (s, b) in a (B * L, ...) flattening;
    #                      B * L (one past the end: a zero row) for padding columns
    sorted_batch: Tensor  # (C,) b of column (s, b) (0 for padding columns)
    mirror: Tensor  # (C,) column (L_b - 1 - s, b) of column (s, b) (itself for padding columns)
    real: Tensor  # (N,) the column of each real (s, b), in step order

    @property
    def num_columns(self) -> int:
        """Columns including padding."""
        return len(self.source_rows)

    @property
    def padded(self) -> bool:
        return len(self.real) != self.num_columns


def pack_columns(lengths: Tensor | None, batch: int, max_len: int, lanes: int = 1) -> PackedColumns:
    """The walk for `lengths` (None: every sequence fills `max_len`), each step padded to `lanes`."""
    if lengths is None:
        lengths = torch.full((batch,), max_len, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > max_len):
        raise ValueError(f"lengths must be in [1, {max_len}] (the padded length), got {lengths.tolist()}")
    if lanes < 1:
        raise ValueError(f"lanes must be >= 1, got {lanes}")
    sorted_lengths, order = torch.sort(lengths, descending=True, stable=True)
    longest = int(sorted_lengths[0]) if batch else 0
    steps = torch.arange(longest)
    active_t = (sorted_lengths[None, :] > steps[:, None]).sum(dim=1)
    width = (active_t + lanes - 1) // lanes * lanes
    offsets_t = torch.cumsum(width, 0) - width
    step_of = torch.repeat_interleave(steps, active_t)
    within = torch.arange(len(step_of)) - (torch.cumsum(active_t, 0) - active_t)[step_of]
    real = offsets_t[step_of] + within
    mirror_step = sorted_lengths[within] - 1 - step_of
    columns = int(width.sum())
    source_rows = torch.full((columns,), batch * max_len, dtype=torch.long)
    source_rows[real] = order[within] * max_len + step_of
    sorted_batch = torch.zeros(columns, dtype=torch.long)
    sorted_batch[real] = within
    mirror = torch.arange(columns)
    mirror[real] = offsets_t[mirror_step] + within
    return PackedColumns(
        batch=batch,
        max_len=max_len,
        lanes=lanes,
        order=order,
        active=tuple(active_t.tolist()),
        offsets=tuple(offsets_t.tolist()),
        source_rows=source_rows,
        sorted_batch=sorted_batch,
        mirror=mirror,
        real=real,
    )


def paired_input(features: Tensor, columns: PackedColumns) -> Tensor:
    """(B, L, F) padded features -> (2F + 1, C): [x(s); 1; x(L_b - 1 - s)] per packed column."""
    flat = features.reshape(-1, features.shape[-1])
    if columns.padded:
        flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
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
