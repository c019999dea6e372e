"""How long a run is: training-set size, optimizer steps, steps per epoch (from config, no training)."""

from __future__ import annotations

import math

from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue


class TrainingSetUnknown(RuntimeError):
    """Epoch-based train FLOPs need the training-set size, and neither config nor data gives it."""


def num_train_samples(cfg: DictConfig) -> int:
    """The training-set size: the configured subset size, else counted from the datamodule."""
    if cfg.cost.num_train is not None:
        return int(cfg.cost.num_train)
    try:
        return int(instantiate(cfg.dataset, _convert_="all").num_train_samples())
    except (MissingMandatoryValue, FileNotFoundError) as err:
        raise TrainingSetUnknown(
            "train FLOPs need the training-set size: set dataset.num_train=N or point the dataset at "
            f"its data ({err})"
        ) from err


def steps_per_epoch(cfg: DictConfig) -> int:
    """Optimizer steps per epoch: ceil(ceil(N / (batch x devices)) / accumulation)."""
    trainer = cfg.trainer
    devices = trainer.devices if isinstance(trainer.devices, int) and trainer.devices > 0 else 1
    batches = math.ceil(num_train_samples(cfg) / (cfg.dataset.batch_size * devices))
    return math.ceil(batches / int(trainer.get("accumulate_grad_batches", 1)))


def train_steps(cfg: DictConfig) -> int:
    """Optimizer steps of the run: max_steps, or epochs x steps_per_epoch (the smaller when both are set)."""
    max_steps = int(cfg.trainer.max_steps)
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs in (None, -1):
        return max_steps
    by_epochs = int(max_epochs) * steps_per_epoch(cfg)
    return by_epochs if max_steps == -1 else min(max_steps, by_epochs)
