"""SparseBiGRU: a masked, bidirectional, batch-first nn.GRU trained with compact weights.

nn.GRU's semantics exactly (PyTorch gate order r, z, n in `weight_ih_l{k}` / `weight_hh_l{k}`, the
reverse direction in `..._reverse`, b_hn inside r * (...)):
    r = s(W_ir x + b_ir + W_hr h + b_hr),  z = s(W_iz x + b_iz + W_hz h + b_hz),
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),  h' = (1 - z) * n + z * h,
over packed variable-length batches (PackedSequence order: time-major, longest sequence first). The
reverse direction walks time from the end: at time t the sequences longer than t are active in both
directions, so a sequence's reverse pass starts from h = 0 at its own last step. Biases stay dense.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from sparse_dm.sparse_backend import reference
from sparse_dm.sparse_backend.weights import SparseWeights
from sparse_dm.sparsity.masks import MASK_SUFFIX

GATES = 3  # r, z, n


def direction_suffixes(layer: int) -> tuple[str, str]:
    return f"_l{layer}", f"_l{layer}_reverse"


class SparseBiGRU(SparseWeights):
    """The layers of a bidirectional, batch-first nn.GRU, with `weight_{ih,hh}_l{k}[_reverse]` compact
    (Parameters `<name>_values`) and `bias_{ih,hh}_l{k}[_reverse]` dense, named as in nn.GRU.

    `kernels`: the compiled kernels (`load_train_kernels`) or None for the pure-torch reference (the
    test oracle; slow). `forward` takes what nn.GRU takes (a PackedSequence, or a (B, L, F) tensor of
    full-length sequences) with no initial state, and returns (output, h_n) as nn.GRU does."""

    def __init__(self, gru: nn.GRU, kernels: object | None, masks: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        if not (gru.bidirectional and gru.batch_first) or gru.mode != "GRU" or gru.proj_size or not gru.bias:
            raise ValueError("SparseBiGRU converts bidirectional, batch_first nn.GRU modules with bias only")
        self.input_size, self.hidden_size, self.num_layers = gru.input_size, gru.hidden_size, gru.num_layers
        self.kernels = kernels
        masks = masks or {}
        for layer in range(self.num_layers):
            for suffix in direction_suffixes(layer):
                for kind in ("ih", "hh"):
                    name = f"weight_{kind}{suffix}"
                    weight = getattr(gru, name)
                    mask = masks.get(name, getattr(gru, name + MASK_SUFFIX, None))
                    if mask is None:
                        mask = torch.ones_like(weight, dtype=torch.bool)
                    self._add_weight(name, weight.detach(), mask)
                    bias = f"bias_{kind}{suffix}"
                    self.register_parameter(bias, nn.Parameter(getattr(gru, bias).detach().float().clone()))

    def forward(
        self, input: PackedSequence | Tensor, hx: Tensor | None = None
    ) -> tuple[PackedSequence | Tensor, Tensor]:
        if hx is not None:
            raise ValueError("SparseBiGRU starts from h = 0 (as ChiroDiff does): hx is not supported")
        if isinstance(input, PackedSequence):
            data, batch_sizes = input.data, input.batch_sizes
        else:
            if input.dim() != 3:
                raise ValueError(f"a batch-first input must be (B, L, F), got shape {tuple(input.shape)}")
            batch, length, _ = input.shape
            data = input.transpose(0, 1).reshape(batch * length, -1)
            batch_sizes = torch.full((length,), batch, dtype=torch.long)
        if data.shape[-1] != self.input_size:
            raise ValueError(f"input has {data.shape[-1]} features, this GRU takes {self.input_size}")
        if self.kernels is not None:
            raise NotImplementedError("compiled SparseBiGRU arrives with sparse_train.c")
        output, finals = self._reference_layers(data, batch_sizes)
        h_n = torch.stack(finals)
        if isinstance(input, PackedSequence):
            if input.unsorted_indices is not None:
                h_n = h_n.index_select(1, input.unsorted_indices)
            return PackedSequence(output, batch_sizes, input.sorted_indices, input.unsorted_indices), h_n
        return output.view(length, batch, -1).transpose(0, 1), h_n

    def _reference_layers(self, data: Tensor, batch_sizes: Tensor) -> tuple[Tensor, list[Tensor]]:
        sizes = [int(b) for b in batch_sizes]
        offsets = [sum(sizes[:t]) for t in range(len(sizes))]
        lengths = (batch_sizes[None, :] > torch.arange(sizes[0])[:, None]).sum(dim=1)  # per sorted sequence
        last_row = torch.tensor(offsets)[lengths - 1] + torch.arange(sizes[0])
        finals: list[Tensor] = []
        x = data
        for layer in range(self.num_layers):
            outs = []
            for reverse, suffix in enumerate(direction_suffixes(layer)):
                gi = reference.sparse_mm(
                    x, self.values(f"weight_ih{suffix}"), self.layouts[f"weight_ih{suffix}"],
                    self.sink(f"weight_ih{suffix}"),
                ) + getattr(self, f"bias_ih{suffix}")  # fmt: skip
                outs.append(self._reference_direction(gi, suffix, sizes, offsets, bool(reverse)))
            finals += [outs[0][last_row], outs[1][: sizes[0]]]
            x = torch.cat(outs, dim=1)
        return x, finals

    def _reference_direction(
        self, gi: Tensor, suffix: str, sizes: list[int], offsets: list[int], reverse: bool
    ) -> Tensor:
        H = self.hidden_size
        name = f"weight_hh{suffix}"
        values, layout, sink = self.values(name), self.layouts[name], self.sink(name)
        bias = getattr(self, f"bias_hh{suffix}")
        h = gi.new_zeros(0, H)
        outs: list[Tensor] = [gi.new_empty(0)] * len(sizes)
        for t in reversed(range(len(sizes))) if reverse else range(len(sizes)):
            b = sizes[t]
            prev = h[:b] if h.shape[0] >= b else torch.cat([h, h.new_zeros(b - h.shape[0], H)])
            gh = reference.sparse_mm(prev, values, layout, sink) + bias
            g = gi[offsets[t] : offsets[t] + b]
            r = torch.sigmoid(g[:, :H] + gh[:, :H])
            z = torch.sigmoid(g[:, H : 2 * H] + gh[:, H : 2 * H])
            n = torch.tanh(g[:, 2 * H :] + r * gh[:, 2 * H :])
            h = (1 - z) * n + z * prev
            outs[t] = h
        return torch.cat(outs)

    def extra_repr(self) -> str:
        nnz = sum(layout.nnz for layout in self.layouts.values())
        total = sum(layout.shape[0] * layout.shape[1] for layout in self.layouts.values())
        return f"{self.input_size} -> {self.hidden_size} x {self.num_layers} bidirectional, nnz={nnz}/{total}"
