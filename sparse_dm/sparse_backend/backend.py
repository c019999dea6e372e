"""One run's `backend=sparse`: the converted denoiser, its EMA and step bookkeeping, the checkpoint format,
and what the run reports (kernels per layer, memory of weights + gradients + optimizer state).

`SparseBackend(net, ema, engine, kernels)` converts `net` in place (model.to_compact), points the
engine at the compact layers (engine_bridge.rebind) and builds the compact EMA and `CompactSparseStep`.
A module hands its checkpoint dict to `save_format` / `load_format`: model and EMA tensors are already
in the usual format (state_dict hooks), the optimizer state is translated here (optimizer.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from sparse_dm.models.chirodiff import ChiroDiffNet
from sparse_dm.sparse_backend.chirodiff import forward_columns
from sparse_dm.sparse_backend.compiled import TrainKernels
from sparse_dm.sparse_backend.engine_bridge import CompactSparseStep, compact_ema, rebind
from sparse_dm.sparse_backend.gru import SparseBiGRU
from sparse_dm.sparse_backend.layout import SparseLayout
from sparse_dm.sparse_backend.model import CompactLayer, to_compact
from sparse_dm.sparse_backend.optimizer import compact_state, dense_state, state_bytes, tensor_bytes
from sparse_dm.sparse_backend.weights import VALUES_SUFFIX
from sparse_dm.sparsity.ema import MaskedEMA
from sparse_dm.sparsity.engine import SparseEngine
from sparse_dm.sparsity.masks import MASK_SUFFIX

OPTIMIZER_STATES = "optimizer_states"  # Lightning's checkpoint key


def layout_bytes(layout: SparseLayout) -> int:
    return tensor_bytes([layout.crow, layout.col, layout.row, layout.ccol, layout.csc_row, layout.csc_perm])


def kernel_name(layer: nn.Module, weight: str, kernels: TrainKernels | None) -> str:
    """What trains `weight` of `layer`: forward, input gradient and value gradient kernels."""
    if kernels is None:
        return "reference (pure torch gathers, test oracle)"
    if isinstance(layer, SparseBiGRU) and weight.startswith("weight_hh"):
        return "csr recurrence (sparse_train.c gru_forward/gru_backward, sddmm)"
    return "csr (sparse_train.c spmm, transposed spmm, sddmm)"


class SparseBackend:
    """`backend=sparse` for one net. `prefix`: the net's key prefix in the module's state_dict."""

    name = "sparse"

    def __init__(
        self,
        net: nn.Module,
        ema: MaskedEMA,
        engine: SparseEngine,
        kernels: TrainKernels | None,
        prefix: str = "net.",
    ) -> None:
        self.dense_names = [name for name, _ in net.named_parameters()]
        converted = to_compact(net, engine.weights, kernels)
        rebind(engine, converted)
        self.net, self.engine, self.kernels, self.prefix = net, engine, kernels, prefix
        self.layers: list[CompactLayer] = list(converted.values())
        self.ema = compact_ema(ema, net, self.layers)
        self.step = CompactSparseStep(net, self.ema, engine, self.layers)
        # The denoiser call: a ChiroDiffNet whose GRU runs the compiled kernels keeps its activations
        # in the GRU's packed feature-major columns end to end (no padded steps, no transposes); its eps
        # is 0 at padded positions, which every loss masks and sampling cuts off. Else net.forward.
        self.forward: Callable[..., Tensor] = net
        self.forward_name = f"{type(net).__name__}.forward"
        if isinstance(net, ChiroDiffNet) and isinstance(net.gru, SparseBiGRU) and kernels is not None:
            self.forward = partial(forward_columns, net)
            self.forward_name = "sparse_backend.chirodiff.forward_columns (packed feature-major columns)"

    @property
    def compact_names(self) -> list[str]:
        return [name for name, _ in self.net.named_parameters()]

    def layouts(self) -> dict[str, SparseLayout]:
        """Compact parameter name -> the layout of its values."""
        return {
            layer.weight_path(name + VALUES_SUFFIX): layer.layer.layouts[name]
            for layer in self.layers
            for name in layer.layer.weight_names
        }

    def save_format(self, checkpoint: dict[str, Any]) -> None:
        """The optimizer state of `checkpoint` as a masked run's (the rest already is)."""
        if OPTIMIZER_STATES in checkpoint:
            layouts, names = self.layouts(), self.compact_names
            checkpoint[OPTIMIZER_STATES] = [
                dense_state(state, names, self.dense_names, layouts) for state in checkpoint[OPTIMIZER_STATES]
            ]

    def load_format(self, checkpoint: dict[str, Any]) -> None:
        """A masked run's optimizer state (in `checkpoint`, before Lightning restores it) gathered by
        the checkpoint's masks."""
        if OPTIMIZER_STATES not in checkpoint:
            return
        masks = checkpoint["state_dict"]
        layouts = {}
        for layer in self.layers:
            for name in layer.layer.weight_names:
                key = f"{self.prefix}{layer.weight_path(name)}{MASK_SUFFIX}"
                if key not in masks:
                    raise ValueError(f"the checkpoint has no {key}: not a masked run's checkpoint")
                layouts[layer.weight_path(name + VALUES_SUFFIX)] = SparseLayout.from_mask(masks[key].bool())
        names = self.compact_names
        checkpoint[OPTIMIZER_STATES] = [
            compact_state(state, names, self.dense_names, layouts) for state in checkpoint[OPTIMIZER_STATES]
        ]

    def layer_kernels(self) -> dict[str, str]:
        """Weight name (as the engine names it) -> the kernels that train it."""
        return {
            layer.weight_path(name): kernel_name(layer.layer, name, self.kernels)
            for layer in self.layers
            for name in layer.layer.weight_names
        }

    def record(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """summary.json's `backend_details`: the kernels, the steps that formed a dense gradient and
        the memory of both forms of this run's state."""
        return {
            "kernels": None
            if self.kernels is None
            else {
                "library": str(self.kernels.library),
                "threading": self.kernels.threading,
                "lanes": self.kernels.lanes,
            },
            "forward": self.forward_name,
            "dense_grad_steps": self.step.dense_grad_steps,
            "memory": self.memory(optimizer),
        }

    @torch.no_grad()
    def memory(self, optimizer: torch.optim.Optimizer | None) -> dict[str, dict[str, int]]:
        """Tensor bytes of weights, gradients and optimizer state, measured on this run's compact
        tensors and on the dense tensors a masked run holds for the same state (its checkpoint form).
        Gradients: one per trainable parameter, of its size (what every backward writes)."""
        compact = train_state_bytes(self.net.parameters(), optimizer.state_dict() if optimizer else None)
        compact["indices"] = sum(layout_bytes(layout) for layout in self.layouts().values())
        compact["masks"] = tensor_bytes([b for n, b in self.net.named_buffers() if n.endswith(MASK_SUFFIX)])
        dense_tensors = self.net.state_dict()
        dense_params = [dense_tensors[name] for name in self.dense_names]
        dense_opt = None
        if optimizer is not None:
            dense_opt = dense_state(
                optimizer.state_dict(), self.compact_names, self.dense_names, self.layouts()
            )
        dense = train_state_bytes(dense_params, dense_opt)
        dense["masks"] = compact["masks"]
        return {"sparse": compact, "dense": dense}


def train_state_bytes(params: Iterable[Tensor], optimizer_state: dict[str, Any] | None) -> dict[str, int]:
    """weights, gradients (one per parameter, its size), optimizer state and their total."""
    params = list(params)
    weights = tensor_bytes(params)
    parts = {
        "weights": weights,
        "grads": tensor_bytes([p for p in params if not isinstance(p, nn.Parameter) or p.requires_grad]),
        "optimizer_state": 0 if optimizer_state is None else state_bytes(optimizer_state),
    }
    return {**parts, "total": sum(parts.values())}
