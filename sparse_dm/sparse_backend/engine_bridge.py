"""backend=sparse: the masked engine's own code decides every mask; the compact layers only store them.

Why a bridge and not a second engine: "same seed -> same masks" holds by construction when the one
implementation of init, prune, grow, tie-breaking and optimizer-state reset (sparsity/engine.py,
explorer.py, criteria.py) runs on the same numbers. So at a mask update the bridge hands that code
dense views of the compact layers (weight = values scattered into zeros, the dense gradient, every
per-value optimizer moment scattered the same way), lets `SparseEngine.explore_if_due` prune, grow
and reset the moments of changed positions exactly as in a masked run, and gathers the result back
by the new mask: new layout, values, moments and EMA shadow (kept positions keep their moments and
shadows, grown ones start at zero). The views cost O(rows x cols) once every Te steps; between
updates nothing dense exists except on steps whose growth reads the dense gradient.

What differs from the masked step (`SparseStep`), and why it is the same computation:
- gradients exist only at active positions, so `mask_gradients` has nothing to zero and re-masking
  after the optimizer step has nothing to zero: the bridge only counts the step (`engine.step`);
- the dense weight gradient is formed only when a criterion reads it: RigL (`needs_grad`) on
  update steps, momentum growth (`needs_grad_ema`, a running average of it) on every step; the
  bridge asks the layers for it before the forward (`before_forward`) and, under data parallelism,
  averages it over ranks as DDP averages parameter gradients;
- the EMA shadows are compact (values of active positions): the masked EMA keeps zeros at inactive
  positions, so nothing is lost; at an update they are re-gathered like the moments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparse_dm.sparse_backend.layout import SparseLayout
from sparse_dm.sparse_backend.model import CompactLayer
from sparse_dm.sparse_backend.weights import VALUES_SUFFIX, SparseWeights
from sparse_dm.sparsity.distributed import verify_identical_masks
from sparse_dm.sparsity.ema import MaskedEMA
from sparse_dm.sparsity.engine import SparseEngine, UpdateReport
from sparse_dm.sparsity.masks import PrunableWeight
from sparse_dm.sparsity.step import AllGather, Reduce, SparseStep


def shadow_key(name: str) -> str:
    """MaskedEMA's buffer name for the parameter `name`."""
    return name.replace(".", "__")


@dataclass(frozen=True)
class CompactWeight(PrunableWeight):
    """A masked weight stored in a compact layer (`module`) under `attr`, as the engine sees it.

    `mask` is the layer's dense bool `<attr>_mask` buffer (the engine reads and writes it; the layout
    follows it). `param` is the dense weight: the bridge's view while it lends one to the engine,
    else expanded afresh (for statistics)."""

    views: dict[str, Tensor] = field(default_factory=dict, compare=False, repr=False)

    @property
    def layer(self) -> SparseWeights:
        return self.module

    @property
    def values(self) -> nn.Parameter:
        return self.module.values(self.attr)

    @property
    def layout(self) -> SparseLayout:
        return self.module.layouts[self.attr]

    @property
    def param(self) -> Tensor:
        view = self.views.get("param")
        return view if view is not None else self.module.dense_weight(self.attr)


def rebind(engine: SparseEngine, converted: dict[int, CompactLayer]) -> None:
    """Point the engine's weights at the compact layers (`converted`: id of each replaced module ->
    its compact layer, from `to_compact`); same names and order, so the engine's per-layer counts,
    gradient averages and exploration history stay aligned."""
    engine.weights = [
        CompactWeight(weight.name, converted[id(weight.module)].layer, weight.attr)
        for weight in engine.weights
    ]


@contextmanager
def dense_view(
    weights: Sequence[CompactWeight], grads: Sequence[Tensor | None] | None = None
) -> Iterator[None]:
    """Lend each weight's dense form (zeros outside the mask) as `param`, with `grads[i]` as its
    gradient, while the block runs the engine's code on them."""
    try:
        for i, weight in enumerate(weights):
            view = nn.Parameter(weight.module.dense_weight(weight.attr))
            view.grad = None if grads is None else grads[i]
            weight.views["param"] = view
        yield
    finally:
        for weight in weights:
            weight.views.pop("param", None)


def per_value(value: Any, values: Tensor) -> bool:
    """An optimizer state entry with one number per active value (AdamW's exp_avg, exp_avg_sq, ...)."""
    return torch.is_tensor(value) and value.shape == values.shape


class DenseStateView:
    """What the engine reads of an optimizer, `.state[param]`, for the dense views: each per-value
    state tensor of the compact optimizer scattered into zeros (the masked optimizer holds zeros at
    inactive positions: their gradients are masked before every step)."""

    def __init__(self, optimizer: torch.optim.Optimizer | None, weights: Sequence[CompactWeight]) -> None:
        self.state: dict[Tensor, dict[str, Any]] = {}
        if optimizer is None:
            return
        for weight in weights:
            state = optimizer.state.get(weight.values)
            if state:
                self.state[weight.param] = {
                    key: weight.layout.expand(value) if per_value(value, weight.values) else value
                    for key, value in state.items()
                }


class CompactSparseStep(SparseStep):
    """`SparseStep` for a net with compact layers: the same phases in the same order (see
    sparsity/step.py), the masked engine's decisions, compact storage."""

    def __init__(
        self, net: nn.Module, ema: MaskedEMA, engine: SparseEngine, layers: Sequence[CompactLayer]
    ) -> None:
        super().__init__(net, ema, engine)
        self.layers = list(layers)
        self.weights: list[CompactWeight] = list(engine.weights)  # rebound by `rebind`
        self.dense_grad_steps = 0  # optimizer steps whose backward formed the dense weight gradient

    def needs_dense_grad(self) -> bool:
        """Whether the coming optimizer step's growth reads the dense weight gradient."""
        engine = self.engine
        if engine is None or engine.grow is None:
            return False
        return engine.grow.needs_grad_ema or (engine.grow.needs_grad and engine.update_due(engine.step + 1))

    def before_forward(self) -> None:
        """Call before each forward of a training step (every micro-batch): the layers form the dense
        weight gradient in their backward only when this step needs it."""
        requested = self.needs_dense_grad()
        for layer in self.layers:
            layer.layer.dense_grad_requested = requested

    def _engine_grads(self, reduce: Reduce | None) -> list[Tensor | None]:
        """The gradient the masked engine would read in `weight.grad`: the dense one where it was
        formed (averaged over ranks, as DDP averages parameter gradients), else the value gradients
        scattered into zeros; None where the step's gradients were dropped (non-finite loss guard)."""
        grads: list[Tensor | None] = []
        for weight in self.weights:
            values_grad = weight.values.grad
            dense = weight.layer.dense_grad(weight.attr)
            if values_grad is None:
                grads.append(None)
            elif dense is not None:
                grads.append(dense if reduce is None else reduce(dense, reduce_op="mean"))
            else:
                grads.append(weight.layout.expand(values_grad))
        return grads

    def before_step(self, reduce: Reduce | None = None, grad_scale: float = 1.0) -> None:
        """Phase 1. The engine reads gradients only to average them (momentum growth) or on an update
        step; on other steps nothing is to be done (no gradient exists at an inactive position)."""
        engine = self.engine
        if engine is None:
            return
        try:
            if engine.grad_ema is None and not engine.update_due(engine.step + 1):
                return
            if any(layer.layer.dense_grad_requested for layer in self.layers):
                self.dense_grad_steps += 1
            with dense_view(self.weights, self._engine_grads(reduce)):
                engine.before_step(grad_scale)
                if reduce is not None:
                    engine.reduce_across_ranks(reduce)
        finally:
            for layer in self.layers:
                layer.layer.clear_dense_grads()
                layer.layer.dense_grad_requested = False

    @torch.no_grad()
    def after_step(
        self,
        optimizer: torch.optim.Optimizer | None,
        step_skipped: bool = False,
        all_gather: AllGather | None = None,
        loss: Tensor | float | None = None,
    ) -> UpdateReport | None:
        """Phases 4-6 (see SparseStep.after_step)."""
        engine = self.engine
        if engine is not None:
            engine.step += 1  # SparseEngine.remask(): the count; no weight lies outside a compact mask
        self.ema.update(self.net, weights_masked=engine is not None)
        if engine is None:
            return None
        if engine.adaptive is not None and loss is not None:
            engine.observe_loss(float(loss))
        if not engine.update_due(engine.step):
            return None
        with dense_view(self.weights):
            view = DenseStateView(optimizer, self.weights)
            report = engine.explore_if_due(view, step_skipped)
            if report is not None and report.skipped is None:
                self._gather_back(optimizer, view)
        if report is None:
            return None
        if all_gather is not None:
            verify_identical_masks(engine.checked_masks, all_gather, engine.step)
        if report.skipped is None:
            self.ema.masks_changed(self.net)
        return report

    def _gather_back(self, optimizer: torch.optim.Optimizer | None, view: DenseStateView) -> None:
        """After the engine's update of the dense views: each changed layer's new layout, and its
        values, per-value moments and EMA shadow gathered by the new mask."""
        paths = {id(layer.layer): layer for layer in self.layers}
        for weight in self.weights:
            old = weight.layout
            if torch.equal(old.mask(), weight.mask.cpu()):
                continue  # unchanged (a dense, ERK-capped layer)
            new = SparseLayout.from_mask(weight.mask)
            dense = weight.param
            weight.layer.set_layout(weight.attr, new, new.compact(dense))
            state = optimizer.state.get(weight.values) if optimizer is not None else None
            for key, value in (state or {}).items():
                if per_value(value, weight.values):
                    value.copy_(new.compact(view.state[dense][key]))
            name = paths[id(weight.layer)].weight_path(weight.attr + VALUES_SUFFIX)
            shadow = self.ema.get_buffer(shadow_key(name))
            shadow.copy_(new.compact(old.expand(shadow)))


def compact_ema(ema: MaskedEMA, net: nn.Module, layers: Sequence[CompactLayer]) -> MaskedEMA:
    """The EMA of the converted `net`, holding `ema`'s averages (shadows of compact weights compact),
    whose state_dict is the dense EMA's (dense shadows under the dense names) and which loads one."""
    compact = MaskedEMA(net, ema.decay, ema.warmup, ema.on_mask_update)
    compact.num_updates.copy_(ema.num_updates)
    dense_shadows = dict(ema.named_buffers())
    pairs: dict[str, tuple[SparseWeights, str, str]] = {}  # compact key -> (layer, weight, dense key)
    for layer in layers:
        for name in layer.layer.weight_names:
            key = shadow_key(layer.weight_path(name + VALUES_SUFFIX))
            pairs[key] = (layer.layer, name, shadow_key(layer.weight_path(name)))
    with torch.no_grad():
        for key, shadow in compact.named_buffers():
            if key in pairs:
                owner, name, dense_key = pairs[key]
                shadow.copy_(owner.layouts[name].compact(dense_shadows[dense_key]))
            else:
                shadow.copy_(dense_shadows[key])
    compact.register_state_dict_post_hook(_ema_state_hook(pairs))
    compact.register_load_state_dict_pre_hook(_ema_load_hook(pairs))
    return compact


def _ema_state_hook(pairs: dict[str, tuple[SparseWeights, str, str]]) -> Callable[..., None]:
    def hook(_ema: MaskedEMA, state: dict[str, Any], prefix: str, _meta: Any) -> None:
        for key, (layer, name, dense_key) in pairs.items():
            state[prefix + dense_key] = layer.layouts[name].expand(state.pop(prefix + key).detach())

    return hook


def _ema_load_hook(pairs: dict[str, tuple[SparseWeights, str, str]]) -> Callable[..., None]:
    """Dense shadows are gathered by the layers' current layouts: in a module's load_state_dict the
    net (registered before the EMA) has already rebuilt them from the loaded masks."""

    def hook(_ema: MaskedEMA, state: dict[str, Any], prefix: str, *_: Any) -> None:
        for key, (layer, name, dense_key) in pairs.items():
            if prefix + dense_key not in state:
                continue
            dense = state.pop(prefix + dense_key)
            layout = layer.layouts[name]
            if bool(dense.masked_select(~layout.mask().to(dense.device)).ne(0).any()):
                raise ValueError(
                    f"{prefix}{dense_key}: EMA weights outside the layer's mask; load the net's masks first"
                )
            state[prefix + key] = layout.compact(dense)

    return hook
