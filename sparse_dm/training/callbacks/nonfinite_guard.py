"""Stop runs whose training loss is non-finite, without ever letting it reach the weights.

A NaN/inf loss makes every gradient NaN, and one optimizer step then turns the weights (and the
EMA, and every later checkpoint) into NaN, while Lightning happily goes on and the run "succeeds".
`NonFiniteLossGuard` drops the gradients of such a step, so the optimizer leaves the weights as they
were (AdamW skips parameters without a gradient; under AMP the scaler sees the inf and skips too),
counts consecutive occurrences and stops the run once `max_consecutive` is reached. Every checkpoint
written, including `last.ckpt` and the on-exception one, therefore holds the weights from before
the non-finite steps. `check_final_metric` is the last line: a run never ends "successfully" with a
missing or non-finite final validation loss.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

log = logging.getLogger(__name__)

CONFIG_KEY = "nonfinite.max_consecutive_losses"


def check_max_consecutive(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{CONFIG_KEY}={value!r}; allowed: an integer >= 1")


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses at too many consecutive optimizer steps."""


class NonFiniteMetricError(RuntimeError):
    """A run ended without a finite final validation metric."""


class NonFiniteLossGuard(L.Callback):
    """Skip optimizer steps whose loss is non-finite; raise after `max_consecutive` in a row.

    With gradient accumulation a step counts as non-finite if any of its micro-batches was.
    `skipped_steps` (also logged as `train/nonfinite_steps_skipped`) counts every skipped step.
    """

    def __init__(self, max_consecutive: int) -> None:
        check_max_consecutive(max_consecutive)
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped_steps = 0
        self._pending_loss: float | None = None  # the first non-finite loss since the last step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if self._pending_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self._pending_loss = float(loss.detach().float().sum())

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._pending_loss is None:
            self.consecutive = 0
            return
        optimizer.zero_grad(set_to_none=True)
        self.consecutive += 1
        self.skipped_steps += 1
        step = trainer.global_step + 1  # the step being taken, as checkpoint names count them
        log.warning(
            "non-finite training loss (%s) at step %d: optimizer step skipped, weights unchanged "
            "(%d of %s=%d consecutive)",
            self._pending_loss,
            step,
            self.consecutive,
            CONFIG_KEY,
            self.max_consecutive,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"training loss was non-finite ({self._pending_loss}) at {self.consecutive} consecutive "
                f"optimizer steps (steps {step - self.consecutive + 1} to {step}, limit {CONFIG_KEY}="
                f"{self.max_consecutive}); those steps were skipped, so the weights and the checkpoints "
                "hold the last finite state. Check the data for NaN/inf or extreme values, or lower "
                "model.optimizer.lr"
            )
        self._pending_loss = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.skipped_steps:
            pl_module.log("train/nonfinite_steps_skipped", float(self.skipped_steps))


def check_final_metric(metrics: Mapping[str, float], key: str = "val/loss") -> float:
    """The run's final `key`, or NonFiniteMetricError if it is missing or not finite."""
    value = metrics.get(key)
    if value is None:
        raise NonFiniteMetricError(
            f"the run ended without a final {key} (no validation ran?); metrics: {dict(metrics)}"
        )
    if not math.isfinite(value):
        raise NonFiniteMetricError(
            f"the run ended with a non-finite final {key}={value}; the model or the validation data hold "
            "NaN/inf values, so its samples and checkpoints cannot be trusted"
        )
    return value
