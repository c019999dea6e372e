"""SparseStep: the one owner of the order of the bookkeeping around an optimizer step.

One optimizer step of (sparse) training, after backward, gradient accumulation and AMP unscaling:

1. `before_step`: the dense gradient feeds the engine's gradient average (momentum growth) and,
   at an update step, is kept for gradient growth (timestep bands: each band's captured gradient,
   averaged over data-parallel ranks; the per-band averages take it in step 4); then the gradients
   of inactive weights are zeroed
2. the caller clips gradients (it sees only active gradients)
3. the caller runs `optimizer.step()` (AMP may skip it on overflow)
4. `after_step`: re-mask the weights (exact counts)
5. update the EMA of the weights (it averages the re-masked weights); the step's training loss
   feeds the adaptive prune rate (method.adaptive)
6. every Te steps: prune + grow, reset the optimizer state at changed positions, then the EMA's
   mask-change policy (`MaskedEMA.masks_changed`) and, under data parallelism, the mask checksum

`step()` runs 1-6 in a plain loop; Lightning owns 2-3, so `DiffusionModule` calls `before_step`
from `on_before_optimizer_step` and `after_step` right after `super().optimizer_step()`.
Dense training (no engine) runs only the EMA update.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from sparse_dm.sparsity.distributed import verify_identical_masks
from sparse_dm.sparsity.ema import MaskedEMA
from sparse_dm.sparsity.engine import SparseEngine, UpdateReport

AllGather = Callable[[Tensor], Tensor]
Reduce = Callable[..., Tensor]  # reduce(tensor, reduce_op="mean" | "sum"), e.g. Lightning's strategy.reduce


class SparseStep:
    """The ordered calls of one optimizer step for `net`, its EMA and (sparse runs) its engine."""

    def __init__(self, net: nn.Module, ema: MaskedEMA, engine: SparseEngine | None = None) -> None:
        self.net = net
        self.ema = ema
        self.engine = engine

    def update_due(self) -> bool:
        """Whether the step about to be taken is a mask-update step."""
        return self.engine is not None and self.engine.update_due(self.engine.step + 1)

    def before_step(self, reduce: Reduce | None = None, grad_scale: float = 1.0) -> None:
        """Phase 1: gradients are final; keep what growth needs (agreed across ranks with `reduce`,
        under data parallelism; `grad_scale`: the AMP loss scale, 1 without a grad scaler), then
        mask them."""
        if self.engine is not None:
            self.engine.before_step(grad_scale)
            if reduce is not None:
                self.engine.reduce_across_ranks(reduce)

    @torch.no_grad()
    def after_step(
        self,
        optimizer: torch.optim.Optimizer | None,
        step_skipped: bool = False,
        all_gather: AllGather | None = None,
        loss: Tensor | float | None = None,
    ) -> UpdateReport | None:
        """Phases 4-6, right after `optimizer.step()`; returns the mask update's report, if due.
        `loss` (this step's training loss) is read only with an adaptive prune rate."""
        if self.engine is not None:
            self.engine.remask()
        self.ema.update(self.net, weights_masked=self.engine is not None)
        if self.engine is None:
            return None
        if self.engine.adaptive is not None and loss is not None:
            self.engine.observe_loss(float(loss))
        report = self.engine.explore_if_due(optimizer, step_skipped)
        if report is None:
            return None
        if all_gather is not None:
            verify_identical_masks(self.engine.checked_masks, all_gather, self.engine.step)
        if report.skipped is None:
            self.ema.masks_changed(self.net)
        return report

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        clip: Callable[[], object] | None = None,
        loss: Tensor | float | None = None,
    ) -> UpdateReport | None:
        """Phases 1-6 for a plain training loop (call after backward)."""
        self.before_step()
        if clip is not None:
            clip()
        optimizer.step()
        return self.after_step(optimizer, loss=loss)
