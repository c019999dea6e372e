"""DSTCallback: a thin Lightning adapter around SparseEngine.

Lightning calls `on_before_optimizer_step` after AMP unscaling and gradient accumulation and before
gradient clipping, which is exactly where the engine masks gradients (and keeps the dense gradient
at update steps). `on_train_batch_end` follows the optimizer step; a change of `global_step` tells
that a step really happened (not just an accumulation micro-batch). An AMP step that the grad
scaler skipped (overflow) still advances `global_step`; the scaler's scale dropping tells it apart.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from sparse_dm.sparsity.distributed import verify_identical_masks
from sparse_dm.sparsity.ema import MaskedEMA
from sparse_dm.sparsity.engine import SparseEngine, UpdateReport


def _loss_value(outputs: Any) -> float:
    """The training loss of the step from `on_train_batch_end`'s outputs (a dict or the tensor)."""
    loss = outputs["loss"] if isinstance(outputs, dict) else outputs
    return float(loss.detach()) if torch.is_tensor(loss) else float("nan")


class DSTCallback(L.Callback):
    """Drives a SparseEngine; keeps its counters in checkpoints; logs each mask update.

    Works with any LightningModule. If the module has a MaskedEMA at `.ema` over `.net`, its
    policy for changed masks (`MaskedEMA.masks_changed`) runs after every mask update.
    """

    def __init__(self, engine: SparseEngine, log_layers: bool = True) -> None:
        self.engine = engine
        self.log_layers = log_layers
        self._last_step: int | None = None
        self._scale_before_step: float | None = None

    @property
    def state_key(self) -> str:
        return "DSTCallback"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self.engine.set_total_steps(int(trainer.estimated_stepping_batches))

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        due = self.engine.update_due(self.engine.step + 1)
        self._scale_before_step = float(scaler.get_scale()) if scaler is not None and due else None
        self.engine.before_step()
        if trainer.world_size > 1 and hasattr(self.engine, "reduce_band_gradients"):
            self.engine.reduce_band_gradients(trainer.strategy.reduce)

    def _step_was_skipped(self, trainer: L.Trainer) -> bool:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or self._scale_before_step is None:
            return False
        return float(scaler.get_scale()) < self._scale_before_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        if self.engine.adaptive is not None:
            self.engine.observe_loss(_loss_value(outputs))
        report = self.engine.after_step(trainer.optimizers[0], step_skipped=self._step_was_skipped(trainer))
        self._scale_before_step = None
        if report is None:
            return
        if trainer.world_size > 1:
            verify_identical_masks(
                self.engine.checked_masks, trainer.strategy.all_gather, trainer.global_step
            )
        ema = getattr(pl_module, "ema", None)
        if report.skipped is None and isinstance(ema, MaskedEMA):
            ema.masks_changed(pl_module.net)
        self._log_update(trainer, report)

    def _log_update(self, trainer: L.Trainer, report: UpdateReport) -> None:
        metrics: dict[str, float] = {
            "sparsity/exploration_rate": report.exploration_rate,
            "sparsity/mask_updates": float(self.engine.num_updates),
            "sparsity/skipped_updates": float(self.engine.skipped_updates),
            "sparsity/drop_fraction": report.drop_fraction,
            "sparsity/replaced": float(sum(layer.grown for layer in report.layers)),
        }
        if self.engine.adaptive is not None:
            metrics["sparsity/prune_rate_effective"] = report.drop_fraction
        if self.log_layers:
            for stats in self.engine.layer_stats():
                metrics[f"density/{stats['name']}"] = stats["density"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict)
