"""An inference-only bidirectional GRU whose weights are CSR matrices.

Per layer: the input projection of every step and both directions is one matmul
W_in @ [x(s); 1; x(L_b - 1 - s)] over all packed columns (see packing.py), and each step is two
block-diagonal matmuls W_rec @ [h_f; h_r; 1] for both directions (r and z rows added to their input
part in a contiguous buffer; n rows in place, without torch's self-copy of `out`), followed by four
elementwise ops, all into preallocated buffers (no allocation inside the loop).
Biases ride along as a column multiplying the constant row of ones. Gate math is nn.GRU's:
r = s(Wi_r x + Wh_r h + b), z = s(...), n = tanh(Wi_n x + b_in + r * (Wh_n h + b_hn)),
h' = n + z * (h - n), computed on the shifted state u = (h + 1) / 2: with tanh(a) = 2 s(2a) - 1 it
becomes u' = lerp(s(2 a), u, z), so the loop needs no tanh (5x slower than sigmoid on CPU). The
factors 2 and the shift are folded into the weights (`shifted_columns`, `double_candidate_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sparse_dm.inference.compiled import ALIGNMENT, Recurrence
from sparse_dm.inference.kernels import masked_weight, matmul_into, storage, to_csr
from sparse_dm.inference.packing import PackedColumns, natural_columns

GATES = 3  # r, z, n
SHIFTED_ZERO = 0.5  # u = (h + 1) / 2 at h = 0


def shifted_columns(weight: Tensor, bias_column: int) -> Tensor:
    """W over u = (y + 1) / 2 instead of y: W y + b = 2 W u + (b - W 1)."""
    shifted = 2 * weight
    shifted[:, bias_column] = weight[:, bias_column] - (weight.sum(dim=1) - weight[:, bias_column])
    return shifted


def gate_major(weight: Tensor, hidden: int) -> Tensor:
    """Rows [r_f r_z n_f | r_r z_r n_r] (nn.GRU, per direction) -> [r_f r_r z_f z_r n_f n_r], so the
    r and z rows of both directions are one contiguous block and n rows the next."""
    blocks = weight.view(2, GATES, hidden, -1).transpose(0, 1)
    return blocks.reshape(2 * GATES * hidden, -1).clone()


def double_candidate_rows(weight: Tensor, hidden: int) -> Tensor:
    """Scale the n-gate rows (gate-major layout) by 2, so s(2 a) comes straight out of the matmuls."""
    doubled = weight.clone()
    doubled[2 * 2 * hidden :] *= 2
    return doubled


def paired_weight(forward_w: Tensor, reverse_w: Tensor, bias: Tensor, width: int, from_bigru: bool) -> Tensor:
    """(6H, 2 * width + 1) gate-major input weight of one layer over the paired input layout (a
    GRU's output arrives shifted, see the module docstring)."""
    at_step, at_mirror = natural_columns(width, from_bigru)
    rows = forward_w.shape[0]
    weight = torch.zeros(2 * rows, 2 * width + 1, dtype=forward_w.dtype)
    weight[:rows, at_step] = forward_w
    weight[rows:, at_mirror] = reverse_w
    weight[:, width] = bias
    if from_bigru:
        weight = shifted_columns(weight, width)
    hidden = rows // GATES
    return double_candidate_rows(gate_major(weight, hidden), hidden)


def recurrent_weight(forward_w: Tensor, reverse_w: Tensor, bias: Tensor) -> Tensor:
    """(6H, 2H + 1) gate-major, block-diagonal recurrent weight over the shifted state [u_f; u_r; 1]."""
    rows, hidden = forward_w.shape
    weight = torch.zeros(2 * rows, 2 * hidden + 1, dtype=forward_w.dtype)
    weight[:rows, :hidden] = forward_w
    weight[rows:, hidden : 2 * hidden] = reverse_w
    weight[:, 2 * hidden] = bias
    return double_candidate_rows(gate_major(shifted_columns(weight, 2 * hidden), hidden), hidden)


@dataclass(frozen=True)
class CSRArrays:
    """A CSR matrix as the three arrays the compiled loop reads (int32 indices, float32 values)."""

    crow: Tensor
    col: Tensor
    values: Tensor

    def pointers(self) -> tuple[int, int, int]:
        return self.crow.data_ptr(), self.col.data_ptr(), self.values.data_ptr()


def csr_arrays(matrix: Tensor) -> CSRArrays:
    csr = to_csr(matrix.float())
    return CSRArrays(csr.crow_indices(), csr.col_indices(), csr.values().contiguous())


@dataclass(frozen=True)
class StepViews:
    """Every tensor one time step touches: views into the workspace, made once per batch shape and
    shared by all layers. Matmul operands are contiguous or have a short leading dimension (a view of
    the previous step's block), so MKL reads them in place; every result is written in place."""

    prev: Tensor  # (2H + 1, b): [u_f; u_r; 1] of the previous step, active columns only
    prev_state: Tensor  # (2H, b): prev without the row of ones
    gates_in_rz: Tensor  # (4H, b) input part of r and z
    gates_in_n: Tensor  # (2H, b)
    rz: Tensor  # (4H, b) contiguous -> r = rz[:2H], z = rz[2H:]
    r: Tensor  # (2H, b)
    z: Tensor  # (2H, b)
    rec_n: Tensor  # (2H, b) recurrent part of the n gate
    candidate: Tensor  # (2H, b)
    state: Tensor  # (2H, b) this step's new state, in its own contiguous block


class SparseBiGRU(nn.Module):
    """The layers of a bidirectional, batch-first `nn.GRU` (masks honoured), for packed columns.

    `sparse_input[l]` / `sparse_recurrent[l]` choose CSR (True) or dense storage per layer and matrix.
    `forward` takes the paired input of layer 0 and returns the last layer's paired output
    (4H + 1, N): [u_f(s), u_r(s); 1; u_f(s'), u_r(s')] with u = (y + 1) / 2 (so a consumer folds
    the shift into its weight with `shifted_columns`), which stays valid until the next call
    (its buffers are reused, so repeated calls on the same lengths allocate nothing).

    `recurrence`: the compiled loop (`compiled.load_recurrence`), which runs each layer (input
    projection and steps) in one call, with both matrices as CSR arrays (then `sparse_input` and
    `sparse_recurrent` are moot), on columns packed with `lanes`; None runs the torch-op loop.
    """

    def __init__(
        self,
        gru: nn.GRU,
        sparse_input: list[bool],
        sparse_recurrent: list[bool],
        recurrence: Recurrence | None = None,
    ) -> None:
        super().__init__()
        if not (gru.bidirectional and gru.batch_first) or gru.mode != "GRU" or gru.proj_size:
            raise ValueError("SparseBiGRU converts bidirectional, batch_first nn.GRU modules only")
        if recurrence is not None and gru.weight_hh_l0.dtype != torch.float32:
            raise ValueError(f"the compiled GRU recurrence runs float32 only, not {gru.weight_hh_l0.dtype}")
        self.hidden = gru.hidden_size
        self.num_layers = gru.num_layers
        self.input_size = gru.input_size
        self.recurrence = recurrence
        self.input_weights: list[Tensor] = []
        self.recurrent_weights: list[tuple[Tensor, Tensor]] = []
        self.compiled_weights: list[tuple[CSRArrays, CSRArrays]] = []  # (input, recurrent) per layer
        for layer in range(gru.num_layers):
            fwd, rev = f"_l{layer}", f"_l{layer}_reverse"
            w_in = paired_weight(
                masked_weight(gru, "weight_ih" + fwd),
                masked_weight(gru, "weight_ih" + rev),
                torch.cat([getattr(gru, "bias_ih" + fwd), getattr(gru, "bias_ih" + rev)]).detach(),
                gru.input_size if layer == 0 else 2 * self.hidden,
                from_bigru=layer > 0,
            )
            w_rec = recurrent_weight(
                masked_weight(gru, "weight_hh" + fwd),
                masked_weight(gru, "weight_hh" + rev),
                torch.cat([getattr(gru, "bias_hh" + fwd), getattr(gru, "bias_hh" + rev)]).detach(),
            )
            if recurrence is not None:
                self.compiled_weights.append((csr_arrays(w_in), csr_arrays(w_rec)))
                continue
            self.input_weights.append(storage(w_in, sparse_input[layer]))
            rz_rows = 2 * 2 * self.hidden  # r and z of both directions, then n
            self.recurrent_weights.append(
                (
                    storage(w_rec[:rz_rows], sparse_recurrent[layer]),
                    storage(w_rec[rz_rows:], sparse_recurrent[layer]),
                )
            )
        self._workspace: dict[str, Any] = {}
        self._workspace_key: tuple[tuple[int, ...], int] | None = None

    @property
    def lanes(self) -> int:
        """Pack this module's input with `pack_columns(..., lanes=module.lanes)`."""
        return 1 if self.recurrence is None else self.recurrence.lanes

    def _buffers_for(self, columns: PackedColumns) -> dict[str, Any]:
        key = (columns.active, columns.lanes)  # the step structure (it fixes offsets and mirror)
        if key != self._workspace_key:
            build = self._torch_workspace if self.recurrence is None else self._compiled_workspace
            self._workspace = build(columns)
            self._workspace_key = key
        return self._workspace

    def _torch_workspace(self, columns: PackedColumns) -> dict[str, Any]:
        """Buffers of the torch-op loop, on unpadded columns."""
        if columns.padded:
            raise ValueError(
                f"the torch-op GRU loop needs columns packed with lanes=1, got lanes={columns.lanes}"
            )
        two_h, n = 2 * self.hidden, columns.num_columns
        outputs = [torch.empty(2 * two_h + 1, n) for _ in range(min(self.num_layers, 2))]
        for out in outputs:
            out[two_h].fill_(1.0)
        gates_in = torch.empty(GATES * two_h, n)
        steps = self._step_views(columns, gates_in)
        return {"gates_in": gates_in, "outputs": outputs, "steps": steps, "states": [s.state for s in steps]}

    def _compiled_workspace(self, columns: PackedColumns) -> dict[str, Any]:
        """Buffers of the compiled loop, on `columns`' padded layout (whole vectors per step)."""
        assert self.recurrence is not None
        if columns.lanes % self.recurrence.lanes:
            raise ValueError(
                f"the compiled GRU loop needs columns packed with lanes={self.recurrence.lanes} "
                f"(pack_columns(..., lanes=module.lanes)), got lanes={columns.lanes}"
            )
        two_h = 2 * self.hidden
        outputs = [torch.zeros(2 * two_h + 1, columns.num_columns) for _ in range(min(self.num_layers, 2))]
        for out in outputs:
            out[two_h].fill_(1.0)
        work = {
            "offsets": torch.tensor(columns.offsets, dtype=torch.int32),
            "active": torch.tensor(columns.active, dtype=torch.int32),
            "mirror": columns.mirror.to(torch.int32),
            "outputs": outputs,
        }
        if any(t.data_ptr() % ALIGNMENT for t in outputs):
            raise RuntimeError(f"the compiled GRU recurrence needs {ALIGNMENT}-byte aligned buffers")
        return work

    def _step_views(self, columns: PackedColumns, gates_in: Tensor) -> list[StepViews]:
        """Step s keeps its new state in its own contiguous (2H + 1, active[s]) block (row of ones
        included), so step s + 1 reads its first active[s + 1] columns with a leading dimension of
        active[s] instead of the layer output's N."""
        two_h, b = 2 * self.hidden, columns.batch
        blocks = torch.empty((two_h + 1) * columns.num_columns)
        h0 = torch.full((two_h + 1, b), SHIFTED_ZERO)
        h0[two_h].fill_(1.0)
        rz_all, rec_n, candidate = (torch.empty(rows * two_h * b) for rows in (2, 1, 1))
        views = []
        previous = h0
        for start, width in zip(columns.offsets, columns.active, strict=True):
            block = blocks[(two_h + 1) * start : (two_h + 1) * (start + width)].view(two_h + 1, width)
            block[two_h].fill_(1.0)
            prev = previous[:, :width]
            rz = rz_all[: 2 * two_h * width].view(2 * two_h, width)
            views.append(
                StepViews(
                    prev=prev,
                    prev_state=prev[:two_h],
                    gates_in_rz=gates_in[: 2 * two_h, start : start + width],
                    gates_in_n=gates_in[2 * two_h :, start : start + width],
                    rz=rz,
                    r=rz[:two_h],
                    z=rz[two_h:],
                    rec_n=rec_n[: two_h * width].view(two_h, width),
                    candidate=candidate[: two_h * width].view(two_h, width),
                    state=block[:two_h],
                )
            )
            previous = block
        return views

    @torch.no_grad()
    def forward(self, paired: Tensor, columns: PackedColumns) -> Tensor:
        work = self._buffers_for(columns)
        if self.recurrence is not None:
            return self._compiled_forward(paired, columns, work)
        two_h = 2 * self.hidden
        for layer in range(self.num_layers):
            out = work["outputs"][layer % 2]
            matmul_into(self.input_weights[layer], paired, work["gates_in"])
            w_rz, w_n = self.recurrent_weights[layer]
            for step in work["steps"]:
                torch.addmm(step.gates_in_rz, w_rz, step.prev, out=step.rz).sigmoid_()
                matmul_into(w_n, step.prev, step.rec_n)
                torch.addcmul(step.gates_in_n, step.r, step.rec_n, out=step.candidate).sigmoid_()
                torch.lerp(step.candidate, step.prev_state, step.z, out=step.state)
            torch.cat(work["states"], dim=1, out=out[:two_h])
            torch.index_select(out[:two_h], 1, columns.mirror, out=out[two_h + 1 :])
            paired = out
        return paired

    def _compiled_forward(self, paired: Tensor, columns: PackedColumns, work: dict[str, Any]) -> Tensor:
        assert self.recurrence is not None
        expected = (2 * self.input_size + 1, columns.num_columns)
        if tuple(paired.shape) != expected:  # C reads by index: a wrong shape must not reach it
            raise ValueError(f"paired input must have shape {expected}, got {tuple(paired.shape)}")
        threads = torch.get_num_threads()
        if paired.data_ptr() % ALIGNMENT or not paired.is_contiguous() or paired.dtype != torch.float32:
            paired = paired.contiguous().float().clone()  # a fresh tensor: aligned by the allocator
        for layer in range(self.num_layers):
            out = work["outputs"][layer % 2]
            w_in, w_rec = self.compiled_weights[layer]
            status = self.recurrence.run(
                self.hidden, len(columns.active), work["offsets"].data_ptr(), work["active"].data_ptr(),
                paired.data_ptr(), *w_in.pointers(), columns.num_columns,
                *w_rec.pointers(), out.data_ptr(), work["mirror"].data_ptr(), SHIFTED_ZERO, threads,
            )  # fmt: skip
            if status != 0:
                raise MemoryError("the compiled GRU recurrence could not allocate its scratch or thread")
            paired = out
        return paired

    def unpack(self, paired: Tensor, columns: PackedColumns) -> Tensor:
        """A paired output -> nn.GRU's batch-first output (B, L, 2H), zeros at padded positions."""
        hidden = self.hidden
        natural = torch.cat([paired[:hidden], paired[3 * hidden + 1 :]]).mul(2).sub(1).t()
        flat = torch.zeros(columns.batch * columns.max_len, 2 * hidden, dtype=paired.dtype)
        flat.index_copy_(0, columns.source_rows[columns.real], natural[columns.real])
        return flat.view(columns.batch, columns.max_len, 2 * hidden)
