"""DSTCallback: the engine's counters in checkpoints and its mask updates in the loggers.

The optimizer step itself (gradient masks, re-masking, EMA, mask updates, in that order) is driven
by `SparseStep` through the module (`DiffusionModule.attach_engine`); this callback only stores the
engine's state under the checkpoint key "DSTCallback" and logs each update once it has happened.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from sparse_dm.sparsity.engine import SparseEngine, UpdateReport


class DSTCallback(L.Callback):
    """Keeps a SparseEngine's counters in checkpoints (with timestep bands and an adaptive prune
    rate: their state too); logs each mask update (per-layer density, exploration rate, skipped
    updates, the effective prune rate under method.adaptive) to every logger of the Trainer."""

    def __init__(self, engine: SparseEngine, log_layers: bool = True) -> None:
        self.engine = engine
        self.log_layers = log_layers
        self._logged_step: int | None = None

    @property
    def state_key(self) -> str:
        return "DSTCallback"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = getattr(pl_module, "sparse_step", None)
        if step is None or step.engine is not self.engine:
            raise ValueError(
                "the module does not drive this engine: call module.attach_engine(engine) "
                "(a DiffusionModule) before fitting"
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        report = self.engine.last_report
        if report is None or report.step != trainer.global_step or report.step == self._logged_step:
            return
        self._logged_step = report.step
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
