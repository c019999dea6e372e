"""The ChiroDiff denoiser in feature-major packed form, with CSR weights where they pay.

Same call and result as `ChiroDiffNet.forward` (x_t, t, lengths, cond) -> eps: the batch is packed
once (sorted, no padding computed), runs through `SparseBiGRU`, then `proj` and `out` as single
matmuls over the GRU's paired output. Padded positions get exactly what the dense net computes
there (out(proj(0), c)), so whole tensors compare equal, not only the real positions.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from sparse_dm.inference.compiled import Recurrence
from sparse_dm.inference.kernels import masked_weight, storage
from sparse_dm.inference.packing import PackedColumns, natural_columns, pack_columns, paired_input
from sparse_dm.inference.sparse_gru import SparseBiGRU, shifted_columns
from sparse_dm.models.chirodiff import ChiroDiffNet
from sparse_dm.sketch.representation import deltas_to_features


class SparseChiroDiffNet(nn.Module):
    """Inference form of a (masked) ChiroDiffNet. `sparse` maps each prunable matrix to CSR or not:
    keys `gru.input.<l>`, `gru.recurrent.<l>`, `proj`, `out`."""

    def __init__(
        self, net: ChiroDiffNet, sparse: dict[str, bool], recurrence: Recurrence | None = None
    ) -> None:
        super().__init__()
        self.time_embed = copy.deepcopy(net.time_embed)
        self.class_embed = copy.deepcopy(net.class_embed)
        layers = range(net.gru.num_layers)
        self.gru = SparseBiGRU(
            net.gru,
            [sparse[f"gru.input.{layer}"] for layer in layers],
            [sparse[f"gru.recurrent.{layer}"] for layer in layers],
            recurrence,
        )
        hidden = net.gru.hidden_size
        at_step, _ = natural_columns(2 * hidden, from_bigru=True)
        proj = torch.zeros(net.proj.out_features, 4 * hidden + 1)
        proj[:, at_step] = masked_weight(net.proj, "weight")
        proj[:, 2 * hidden] = net.proj.bias.detach()
        self.proj_weight = storage(shifted_columns(proj, 2 * hidden), sparse["proj"])
        self.proj_bias = net.proj.bias.detach().clone()
        self.out_weight_full = masked_weight(net.out, "weight").clone()  # for padded positions
        self.out_weight = storage(self.out_weight_full, sparse["out"])
        self.out_bias = net.out.bias.detach().clone()
        self._columns: PackedColumns | None = None
        self._lengths: Tensor | None = None
        self.requires_grad_(False)

    _conditioning = ChiroDiffNet._conditioning  # the time (+ class) embedding, exactly as trained

    def _packing(self, lengths: Tensor | None, batch: int, max_len: int) -> PackedColumns:
        """Cached: a sampler calls the net many times with the same lengths."""
        key = None if lengths is None else lengths.detach().cpu()
        cached = self._columns
        same = (
            cached is not None
            and (cached.batch, cached.max_len) == (batch, max_len)
            and (
                (key is None and self._lengths is None)
                or (key is not None and self._lengths is not None and torch.equal(key, self._lengths))
            )
        )
        if not same:
            self._columns = pack_columns(key, batch, max_len, self.gru.lanes)
            self._lengths = None if key is None else key.clone()
        assert self._columns is not None
        return self._columns

    @torch.no_grad()
    def forward(
        self, x_t: Tensor, t: Tensor, lengths: Tensor | None = None, cond: Tensor | None = None
    ) -> Tensor:
        batch, max_len, channels = x_t.shape
        columns = self._packing(lengths, batch, max_len)
        c = self._conditioning(t, cond)
        features = torch.cat([deltas_to_features(x_t), c[:, None, :].expand(-1, max_len, -1)], dim=-1)
        hidden = self.gru(paired_input(features, columns), columns)
        projected = torch.mm(self.proj_weight, hidden)
        c_columns = c.index_select(0, columns.order).t().index_select(1, columns.sorted_batch)
        eps = torch.mm(self.out_weight, torch.cat([projected, c_columns]))
        if columns.padded:
            eps = eps.index_select(1, columns.real)
        eps = eps.t() + self.out_bias
        padded = torch.cat([self.proj_bias.expand(batch, -1), c], dim=1) @ self.out_weight_full.t()
        result = (padded + self.out_bias)[:, None, :].expand(batch, max_len, channels).reshape(-1, channels)
        result = result.index_copy(0, columns.source_rows[columns.real], eps)
        return result.view(batch, max_len, channels)
