"""The ChiroDiff denoiser's forward on its compact layers, feature-major from the GRU input to eps.

`forward_columns(net, ...)` computes what `ChiroDiffNet.forward` computes once `net.gru` is a compiled
SparseBiGRU and `net.proj` / `net.out` are SparseLinear (or nn.Linear), but the activations stay in
the GRU's packed feature-major columns all the way: the two linear layers run on the real columns
only (no padded time steps, no transposes between layers), and only eps is scattered back to
(B, L, 3). `ChiroDiffNet.forward` on the same compact layers is also correct, but it pads the GRU
output to (B, L, 2H) and each SparseLinear transposes its input and output. Outputs at padded
positions are 0 here (the dense model leaves bias-driven values there); the loss masks both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from sparse_dm.models.chirodiff import ChiroDiffNet
from sparse_dm.sketch.representation import deltas_to_features
from sparse_dm.sparse_backend.gru import ColumnPlan, SparseBiGRU
from sparse_dm.sparse_backend.linear import SparseLinear


def linear_columns(layer: nn.Module, x: Tensor) -> Tensor:
    """(in, columns) -> (out, columns) through a SparseLinear, or a dense nn.Linear (a layer left dense)."""
    if isinstance(layer, SparseLinear):
        return layer.forward_columns(x)
    if isinstance(layer, nn.Linear):
        return (
            torch.addmm(layer.bias[:, None], layer.weight, x) if layer.bias is not None else layer.weight @ x
        )
    raise TypeError(f"expected SparseLinear or nn.Linear, got {type(layer).__name__}")


def forward_columns(
    net: ChiroDiffNet, x_t: Tensor, t: Tensor, lengths: Tensor | None = None, cond: Tensor | None = None
) -> Tensor:
    """x_t (B, L, 3), t (B,), lengths (B,) (None = all sequences fill L), cond (B,) -> eps (B, L, 3)."""
    gru = net.gru
    if not isinstance(gru, SparseBiGRU) or gru.kernels is None:
        raise TypeError("forward_columns needs net.gru to be a SparseBiGRU with compiled kernels")
    batch, max_len, _ = x_t.shape
    c = net._conditioning(t, cond)
    inputs = torch.cat([deltas_to_features(x_t), c[:, None, :].expand(-1, max_len, -1)], dim=-1)
    if lengths is None:
        lengths = torch.full((batch,), max_len, dtype=torch.long)
    packed = pack_padded_sequence(inputs, lengths.cpu(), batch_first=True, enforce_sorted=False)
    plan = ColumnPlan.build(packed.batch_sizes, gru.kernels.lanes)
    rows = packed.data.new_zeros(plan.columns, packed.data.shape[1]).index_copy(0, plan.index, packed.data)
    hidden = gru.forward_columns(rows.t().contiguous(), plan)[-1]
    projected = linear_columns(net.proj, hidden)
    # the conditioning of each column's sequence (a zero row for padding columns)
    sorted_c = c.index_select(0, packed.sorted_indices)
    per_column = torch.cat([sorted_c, sorted_c.new_zeros(1, sorted_c.shape[1])]).index_select(
        0, plan.batch_of
    )
    eps = linear_columns(net.out, torch.cat([projected, per_column.t()], dim=0))
    eps_rows = eps.t().contiguous().index_select(0, plan.index)
    packed_eps = PackedSequence(eps_rows, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    return pad_packed_sequence(packed_eps, batch_first=True, total_length=max_len)[0]
