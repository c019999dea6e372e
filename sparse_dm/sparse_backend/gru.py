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

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import PackedSequence

from sparse_dm.sparse_backend import reference
from sparse_dm.sparse_backend.compiled import TrainKernels
from sparse_dm.sparse_backend.linear import aligned
from sparse_dm.sparse_backend.weights import SparseWeights
from sparse_dm.sparsity.masks import MASK_SUFFIX


def direction_suffixes(layer: int) -> tuple[str, str]:
    return f"_l{layer}", f"_l{layer}_reverse"


@dataclass(frozen=True)
class ColumnPlan:
    """Feature-major columns of a packed batch: time step t owns [offsets[t], offsets[t] + sizes[t]),
    padded to a multiple of `lanes`; `index[i]` is the column of packed row i (PackedSequence order)."""

    steps: int
    sizes: Tensor  # (T,) int32: sequences longer than t
    offsets: Tensor  # (T,) int32: first column of step t
    columns: int  # all columns, padding included
    index: Tensor  # (N,) int64
    last: Tensor  # (B,) int64: column of each (sorted) sequence's last step
    first: Tensor  # (B,) int64: column of its first step
    batch_of: Tensor  # (columns,) int64: sorted sequence of each column, B for padding columns

    @classmethod
    def build(cls, batch_sizes: Tensor, lanes: int) -> ColumnPlan:
        sizes = batch_sizes.detach().cpu().long()
        if sizes.dim() != 1 or len(sizes) == 0 or bool((sizes[1:] > sizes[:-1]).any()) or int(sizes[-1]) < 1:
            raise ValueError(f"batch_sizes must be non-increasing and positive, got {sizes.tolist()}")
        width = (sizes + lanes - 1) // lanes * lanes
        offsets = torch.cumsum(width, 0) - width
        step = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        within = torch.arange(len(step)) - (torch.cumsum(sizes, 0) - sizes)[step]
        lengths = (sizes[None, :] > torch.arange(int(sizes[0]))[:, None]).sum(dim=1)
        return cls(
            steps=len(sizes),
            sizes=sizes.to(torch.int32),
            offsets=offsets.to(torch.int32),
            columns=int(width.sum()),
            index=offsets[step] + within,
            last=offsets[lengths - 1] + torch.arange(int(sizes[0])),
            first=torch.arange(int(sizes[0])),
            batch_of=torch.full((int(width.sum()),), int(sizes[0])).index_copy(
                0, offsets[step] + within, within
            ),
        )

    def check(self, ld: int) -> None:
        if ld != self.columns:
            raise ValueError(f"activations have {ld} columns, the batch plan {self.columns}")


class Scratch:
    """Buffers kept across steps, because a fresh 3-13 MB tensor per layer and step pays its page faults
    again (one layer's GRU forward: 3.3 ms on reused buffers, 7.9 ms on fresh ones, Xeon AVX-512 VM).

    `take` gives a buffer that never leaves one kernel call (the input projection in forward, the gate
    gradients in backward): one per name, so one call at a time per module. `lend` gives a buffer that
    a forward saves for its backward (hprev, saved); the backward hands it back with `give` once it is
    done, so a forward whose graph was never backpropagated (no_grad, an exception) just lets its
    buffers go, and a second backward through the same graph is refused (see CompiledGRULayer)."""

    def __init__(self, spare: int = 8) -> None:
        self.buffers: dict[str, Tensor] = {}
        self.free: list[Tensor] = []
        self.spare = spare  # free lent buffers kept at most (two per layer: hprev and saved)

    def take(self, name: str, rows: int, cols: int) -> Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < rows * cols:
            buffer = self.buffers[name] = torch.empty(rows * cols)
        return buffer[: rows * cols].view(rows, cols)

    def lend(self, rows: int, cols: int) -> Tensor:
        """The smallest free buffer that fits, else a new one (the caller owns it until `give`)."""
        fitting = [i for i, b in enumerate(self.free) if b.numel() >= rows * cols]
        if fitting:  # (by position: list.remove would compare tensors elementwise)
            buffer = self.free.pop(min(fitting, key=lambda i: self.free[i].numel()))
        else:
            buffer = torch.empty(rows * cols)
        return buffer[: rows * cols].view(rows, cols)

    def give(self, view: Tensor) -> None:
        base = view._base if view._base is not None else view
        self.free.append(base.reshape(-1))  # flat, so `lend` slices elements, not rows
        if len(self.free) > self.spare:
            self.free.pop(min(range(len(self.free)), key=lambda i: self.free[i].numel()))


class CompiledGRULayer(torch.autograd.Function):
    """One bidirectional layer on feature-major columns: x (F, ld) -> out (2H, ld), forward rows first.
    After `x`: values of W_ih, W_ih_reverse, W_hh, W_hh_reverse, then b_ih, b_ih_rev, b_hh, b_hh_rev, then
    kernels, plan, layouts, sinks, the Scratch pool and whether autograd records this call."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, *args: Any) -> Tensor:
        values, biases = args[:4], args[4:8]
        kernels, plan, layouts, sinks, scratch, recorded = args[8:]
        x = aligned(x)
        hidden = layouts[2].shape[1]
        gi = scratch.take("gi", 6 * hidden, plan.columns)
        for d in range(2):  # the input projection of every column at once, b_ih folded in
            kernels.spmm(layouts[d], values[d], x, gi[d * 3 * hidden : (d + 1) * 3 * hidden], bias=biases[d])
        out = x.new_empty(2 * hidden, plan.columns)
        hprev, saved = scratch.lend(2 * hidden, plan.columns), scratch.lend(8 * hidden, plan.columns)
        recurrent = [(layouts[2 + d], values[2 + d], biases[2 + d]) for d in range(2)]
        kernels.gru_forward(plan, gi, recurrent, out, hprev, saved)
        ctx.save_for_backward(x, *values)
        ctx.lent = (hprev, saved)  # intermediates, handed back to `scratch` by backward
        if not recorded:  # no graph (evaluation): no backward will hand them back
            scratch.give(hprev)
            scratch.give(saved)
        ctx.kernels, ctx.plan, ctx.layouts, ctx.sinks, ctx.scratch = kernels, plan, layouts, sinks, scratch
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.lent is None:
            raise RuntimeError(
                "a second backward through a SparseBiGRU layer (retain_graph=True) is not supported: "
                "its saved state went back to the buffer pool after the first"
            )
        x, *values = ctx.saved_tensors
        hprev, saved = ctx.lent
        kernels, plan, layouts, sinks = ctx.kernels, ctx.plan, ctx.layouts, ctx.sinks
        hidden = layouts[2].shape[1]
        rows = 3 * hidden
        dgi, dgh = (ctx.scratch.take(name, 6 * hidden, plan.columns) for name in ("dgi", "dgh"))
        recurrent = [(layouts[2 + d], values[2 + d]) for d in range(2)]
        sums = kernels.gru_backward(plan, aligned(grad_out), hprev, saved, recurrent, dgi, dgh)
        per_direction = [(dgi[d * rows : (d + 1) * rows], dgh[d * rows : (d + 1) * rows]) for d in range(2)]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = x.new_empty(x.shape)
            for d in range(2):
                kernels.spmm(
                    layouts[d], values[d], per_direction[d][0], grad_x, transpose=True, accumulate=d > 0
                )
        grad_values, grad_biases = [], []
        for d in range(2):
            d_in, d_rec = per_direction[d]
            h = hprev[d * hidden : (d + 1) * hidden]
            grad_values.append(kernels.sddmm(layouts[d], d_in, x, values[d].new_empty(layouts[d].nnz)))
            grad_values.append(
                kernels.sddmm(layouts[2 + d], d_rec, h, values[2 + d].new_empty(layouts[2 + d].nnz))
            )
            # b_hh's r and z gradients are b_ih's: dgh and dgi share those rows
            grad_biases += [sums[d, :rows], torch.cat([sums[d, : 2 * hidden], sums[d, rows:]])]
            if sinks[d] is not None:
                sinks[d].add(d_in @ x.t())
            if sinks[2 + d] is not None:
                sinks[2 + d].add(d_rec @ h.t())
        ctx.scratch.give(hprev)
        ctx.scratch.give(saved)
        ctx.lent = None
        order = [0, 2, 1, 3]  # computed per direction (ih, hh); taken as ih, ih_reverse, hh, hh_reverse
        ordered = [grad_values[i] for i in order] + [grad_biases[i] for i in order]
        return grad_x, *ordered, None, None, None, None, None, None


class SparseBiGRU(SparseWeights):
    """The layers of a bidirectional, batch-first nn.GRU, with `weight_{ih,hh}_l{k}[_reverse]` compact
    (Parameters `<name>_values`) and `bias_{ih,hh}_l{k}[_reverse]` dense, named as in nn.GRU.

    `kernels`: the compiled kernels (`load_train_kernels`) or None for the pure-torch reference (the
    test oracle; slow). `forward` takes what nn.GRU takes (a PackedSequence, or a (B, L, F) tensor of
    full-length sequences) with no initial state, and returns (output, h_n) as nn.GRU does."""

    def __init__(
        self, gru: nn.GRU, kernels: TrainKernels | None, masks: dict[str, Tensor] | None = None
    ) -> None:
        super().__init__()
        if not (gru.bidirectional and gru.batch_first) or gru.mode != "GRU" or gru.proj_size or not gru.bias:
            raise ValueError("SparseBiGRU converts bidirectional, batch_first nn.GRU modules with bias only")
        self.input_size, self.hidden_size, self.num_layers = gru.input_size, gru.hidden_size, gru.num_layers
        self.kernels = kernels
        self.scratch = Scratch()
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
        self.check_input_dtype(data, self.kernels is not None)
        if self.kernels is not None:
            output, finals = self._compiled_layers(data, batch_sizes)
        else:
            output, finals = self._reference_layers(data, batch_sizes)
        h_n = torch.stack(finals)
        if isinstance(input, PackedSequence):
            if input.unsorted_indices is not None:
                h_n = h_n.index_select(1, input.unsorted_indices)
            return PackedSequence(output, batch_sizes, input.sorted_indices, input.unsorted_indices), h_n
        return output.view(length, batch, -1).transpose(0, 1), h_n

    def layer_arguments(self, layer: int) -> tuple[Any, ...]:
        """What CompiledGRULayer takes after x, then its layouts and dense-gradient sinks."""
        fwd, rev = direction_suffixes(layer)
        names = [f"weight_ih{fwd}", f"weight_ih{rev}", f"weight_hh{fwd}", f"weight_hh{rev}"]
        biases = [getattr(self, f"bias_{kind}{suffix}") for kind in ("ih", "hh") for suffix in (fwd, rev)]
        layouts = tuple(self.layouts[name] for name in names)
        sinks = tuple(self.sink(name) for name in names)
        return *[self.values(name) for name in names], *biases, layouts, sinks

    def forward_columns(self, x: Tensor, plan: ColumnPlan) -> list[Tensor]:
        """Feature-major input (F, plan.columns) -> every layer's output (2H, plan.columns), forward
        rows first, padding columns zero (compiled only; see ColumnPlan)."""
        if self.kernels is None:
            raise ValueError(
                "forward_columns runs the compiled kernels; this GRU was built with kernels=None"
            )
        outputs = []
        for layer in range(self.num_layers):
            *weights, layouts, sinks = self.layer_arguments(layer)
            recorded = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights))
            x = CompiledGRULayer.apply(
                x, *weights, self.kernels, plan, layouts, sinks, self.scratch, recorded
            )
            outputs.append(x)
        return outputs

    def _compiled_layers(self, data: Tensor, batch_sizes: Tensor) -> tuple[Tensor, list[Tensor]]:
        assert self.kernels is not None
        plan = ColumnPlan.build(batch_sizes, self.kernels.lanes)
        columns = data.new_zeros(plan.columns, data.shape[1]).index_copy(0, plan.index, data)
        outputs = self.forward_columns(columns.t().contiguous(), plan)
        H = self.hidden_size
        finals = []
        for out in outputs:
            finals += [out[:H].index_select(1, plan.last).t(), out[H:].index_select(1, plan.first).t()]
        # transpose first, then gather whole rows: a row gather from the transposed view is strided
        return outputs[-1].t().contiguous().index_select(0, plan.index), finals

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
                    x,
                    self.values(f"weight_ih{suffix}"),
                    self.layouts[f"weight_ih{suffix}"],
                    self.sink(f"weight_ih{suffix}"),
                ) + getattr(self, f"bias_ih{suffix}")
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
