"""Parameter and FLOPs accounting with the paper's conventions.

2 FLOPs per multiply-add, counted over conv / linear / recurrent weights only; a sparse layer's
FLOPs scale with its density. "Uses" of a weight = how many times each weight entry is multiplied
in one forward pass of one sample (output positions for a conv, rows for a linear, timesteps for
an RNN), measured with hooks on one example forward (works on the meta device: no allocation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from sparse_dm.sparsity.masks import LAYER_TYPES, RNN_TYPES, find_prunable

FLOPS_PER_MAC = 2
CONVENTIONS = ("paper", "per_sample")


@dataclass(frozen=True)
class WeightUse:
    name: str
    shape: tuple[int, ...]
    uses: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _rnn_timesteps(inputs: tuple) -> int:
    x = inputs[0]
    if isinstance(x, PackedSequence):
        return int(x.batch_sizes.sum())
    return int(x.shape[0] * x.shape[1]) if x.dim() == 3 else int(x.shape[0])


def measure_weight_uses(net: nn.Module, example_inputs: tuple) -> list[WeightUse]:
    """Run one forward of a batch-1 example and record each weight's uses."""
    uses: dict[int, int] = {}

    def layer_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            count = inputs[0].numel() // module.in_features
        elif isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d):
            count = inputs[0].numel() // module.in_channels
        else:
            count = output.numel() // module.out_channels
        uses[id(module)] = uses.get(id(module), 0) + count

    def rnn_hook(module: nn.Module, inputs: tuple) -> None:
        uses[id(module)] = uses.get(id(module), 0) + _rnn_timesteps(inputs)

    handles = []
    for module in net.modules():
        if isinstance(module, LAYER_TYPES):
            handles.append(module.register_forward_hook(layer_hook))
        elif isinstance(module, RNN_TYPES):
            handles.append(module.register_forward_pre_hook(rnn_hook))
    was_training = net.training
    net.eval()  # no running-statistics updates from the measuring pass
    try:
        with torch.no_grad():
            net(*example_inputs)
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    return [WeightUse(w.name, tuple(w.param.shape), uses.get(id(w.module), 0)) for w in find_prunable(net)]


def forward_flops(weight_uses: list[WeightUse], active: Mapping[str, int] | None = None) -> float:
    """FLOPs of one forward of one sample; `active` maps weight name -> active count (else dense)."""
    active = active or {}
    return float(sum(FLOPS_PER_MAC * active.get(w.name, w.numel) * w.uses for w in weight_uses))


def check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"cost.convention={convention!r}; allowed: one of {CONVENTIONS}")


def cost_summary(
    net: nn.Module,
    weight_uses: list[WeightUse],
    active: Mapping[str, int],
    sampling_steps: int,
    train_steps: int | None,
    batch_size: int,
    update_interval: int | None,
    dense_grad_updates: bool,
    convention: str = "paper",
    update_window: float = 1.0,
    dense_grad_every_step: bool = False,
) -> dict:
    """The cost figures of summary.json / cost.json.

    train = 3 x forward x steps (paper); RigL adds its dense gradient at each update step:
    (3 f_S Te + 2 f_S + f_D) / (Te + 1) per step while updates happen (`update_window`: the fraction
    of training before the last update), 3 f_S after. A criterion that averages the dense gradient
    (momentum growth) needs it at every step: 2 f_S + f_D while updates happen. `per_sample`
    multiplies by the batch (RigL papers).
    `train_steps=None` (unknown training-set size) leaves the absolute train FLOPs null.
    """
    check_convention(convention)
    f_dense = forward_flops(weight_uses)
    f_sparse = forward_flops(weight_uses, active)
    if dense_grad_every_step:
        per_step = update_window * (2 * f_sparse + f_dense) + (1.0 - update_window) * 3 * f_sparse
    elif dense_grad_updates and update_interval:
        te = update_interval
        updating = (3 * f_sparse * te + 2 * f_sparse + f_dense) / (te + 1)
        per_step = update_window * updating + (1.0 - update_window) * 3 * f_sparse
    else:
        per_step = 3 * f_sparse
    scale = None if train_steps is None else train_steps * (batch_size if convention == "per_sample" else 1)
    by_name = {w.name: w for w in weight_uses}
    prunable = sum(by_name[name].numel for name in active)
    return {
        "params_total": sum(p.numel() for p in net.parameters()),
        "params_prunable": prunable,
        "params_active": sum(active.values()),
        "flops_forward_dense": f_dense,
        "flops_forward": f_sparse,
        "flops_test_per_sample": f_sparse * sampling_steps,
        "flops_test_per_sample_dense": f_dense * sampling_steps,
        "flops_train": None if scale is None else per_step * scale,
        "flops_train_dense": None if scale is None else 3 * f_dense * scale,
        "flops_train_ratio": per_step / (3 * f_dense),
        "flops_test_ratio": f_sparse / f_dense,
        "train_steps": train_steps,
        "sampling_steps": sampling_steps,
        "flops_convention": convention,
        "layers": [
            {
                "name": w.name,
                "shape": list(w.shape),
                "density": active.get(w.name, w.numel) / w.numel,
                "nnz": active.get(w.name, w.numel),
                "uses": w.uses,
            }
            for w in weight_uses
        ],
    }
