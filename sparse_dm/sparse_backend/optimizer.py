"""AdamW over the active values only, and its state in the masked engine's checkpoint format.

Why an ordinary `torch.optim.AdamW` (the run's `model.optimizer`): the engine's exact per-layer counts
fix each layer's nnz, so a values Parameter keeps its size and identity across mask updates
(`SparseWeights.set_layout`), and the optimizer over the compact net's parameters already is AdamW
over the active values, with one moment per active value, weight decay and gradient clipping (over
the active gradients, as in a masked run). It applies the masked run's elementwise formulas to the
same numbers at active positions; at inactive ones the masked run holds zeros (weights, masked
gradients, moments) that stay zero, so nothing is left out. The mask update re-gathers the moments
(engine_bridge). The optimizer step's cost is measured in benchmarks/train_backend.py.

Checkpoints hold the masked run's optimizer state: one param group over the denoiser's parameters in
the dense net's parameter order, moments as dense tensors with zeros outside the masks. So either
backend resumes the other's checkpoint; `dense_state` and `compact_state` translate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from sparse_dm.sparse_backend.layout import SparseLayout
from sparse_dm.sparse_backend.weights import VALUES_SUFFIX

State = dict[str, Any]


def _one_group(state: State, count: int) -> dict[str, Any]:
    groups = state["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != count:
        sizes = [len(group["params"]) for group in groups]
        raise ValueError(
            f"backend=sparse stores one optimizer param group over the denoiser's {count} parameters "
            f"(model.optimizer over net.parameters()); this optimizer has groups of {sizes}"
        )
    return groups[0]


def _dense_name(name: str, layouts: Mapping[str, SparseLayout]) -> str:
    return name[: -len(VALUES_SUFFIX)] if name in layouts else name


def dense_state(
    state: State,
    compact_names: Sequence[str],
    dense_names: Sequence[str],
    layouts: Mapping[str, SparseLayout],
) -> State:
    """`optimizer.state_dict()` over the compact net (parameters `compact_names`, in order) -> the one
    the masked dense net's optimizer holds (parameters `dense_names`). `layouts`: compact parameter
    name -> layout of its values."""
    group = _one_group(state, len(compact_names))
    index = {name: i for i, name in enumerate(dense_names)}
    converted: dict[int, dict[str, Any]] = {}
    for j, entry in state["state"].items():
        name = compact_names[j]
        layout = layouts.get(name)
        converted[index[_dense_name(name, layouts)]] = {
            key: layout.expand(value)
            if layout is not None and torch.is_tensor(value) and tuple(value.shape) == (layout.nnz,)
            else value
            for key, value in entry.items()
        }
    return {
        "state": dict(sorted(converted.items())),
        "param_groups": [{**group, "params": list(range(len(dense_names)))}],
    }


def compact_state(
    state: State,
    compact_names: Sequence[str],
    dense_names: Sequence[str],
    layouts: Mapping[str, SparseLayout],
) -> State:
    """The inverse of `dense_state`; `layouts` come from the checkpoint's masks. Dense moments must be
    zero outside the masks (a masked run's are: its gradients are masked before every step)."""
    group = _one_group(state, len(dense_names))
    index = {name: i for i, name in enumerate(dense_names)}
    converted: dict[int, dict[str, Any]] = {}
    for j, name in enumerate(compact_names):
        entry = state["state"].get(index[_dense_name(name, layouts)])
        if entry is None:
            continue
        layout = layouts.get(name)
        converted[j] = {key: _gather(value, layout, name, key) for key, value in entry.items()}
    return {"state": converted, "param_groups": [{**group, "params": list(range(len(compact_names)))}]}


def _gather(value: Any, layout: SparseLayout | None, name: str, key: str) -> Any:
    if layout is None or not torch.is_tensor(value) or tuple(value.shape) != layout.shape:
        return value
    outside = value.masked_select(~layout.mask().to(value.device))
    if bool(outside.ne(0).any()):
        raise ValueError(
            f"optimizer state {key} of {name}: non-zero outside the mask; not a masked run's state"
        )
    return layout.compact(value)


def tensor_bytes(tensors: Sequence[Tensor] | Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(state: State) -> int:
    """Bytes of the tensors in an optimizer state_dict's per-parameter state."""
    return tensor_bytes(
        [v for entry in state["state"].values() for v in entry.values() if torch.is_tensor(v)]
    )
