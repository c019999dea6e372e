"""A callback for the multi-process tests: each rank dumps its training state after every mask update
(and at the start and end), and the batch it trained on at every step; optionally one rank is made to
diverge by seeding its growth differently, as ITOP/GraNet-style per-rank seeding would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from sparse_dm.training.callbacks.dst import DSTCallback


class RankStateProbe(L.Callback):
    def __init__(self, out_dir: str, diverge_rank: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.diverge_rank = diverge_rank
        self.dumped_updates = -1
        self.batch_sums: list[float] = []

    def _engine(self, trainer: L.Trainer):
        return next(c.engine for c in trainer.callbacks if isinstance(c, DSTCallback))

    def _dump(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "module": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "optimizer": trainer.optimizers[0].state_dict(),
            "engine": self._engine(trainer).state_dict(),  # counters, gradient averages
            "step": trainer.global_step,
        }
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}_{tag}.pt")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == self.diverge_rank:
            self._engine(trainer).seed += 1
        self._dump(trainer, pl_module, "start")

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        updates = self._engine(trainer).num_updates
        if updates != self.dumped_updates and updates > 0:
            self._dump(trainer, pl_module, f"update{updates}")
        self.dumped_updates = updates
        first = next(v for v in (batch.values() if isinstance(batch, dict) else batch) if torch.is_tensor(v))
        self.batch_sums.append(float(first.double().sum()))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer, pl_module, "end")
        torch.save(self.batch_sums, self.out_dir / f"rank{trainer.global_rank}_batches.pt")
