"""Periodic FID/KID during training: the training-dynamics curves of the paper (Fig. 4/5).

Every `every_n_steps` optimizer steps (and at the end of training) rank 0 samples `num_samples` with
the EMA weights through the module's own `generate`, converts them exactly like `sparse_dm.evaluate`
(sparse_dm.metrics.images_for_fid) and compares them with reference statistics computed once at setup
(cached on disk per dataset, split, resolution and extractor; samples are streamed in batches). Results
go to every logger (`fid/fid`, `fid/kid_mean`, `fid/kid_std`) and to `history`, which train.py
writes to summary.json as `fid_curve`.

Enabling the callback must not change training: sampling uses its own seeded generator, and every
global RNG (torch CPU/CUDA, NumPy, Python) is restored afterwards, so the weights are bit-identical
with and without it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from sparse_dm.metrics.fidelity import (
    FeatureStats,
    FidelityConfig,
    extract_stats,
    fidelity_from_stats,
    reference_stats,
    resolve_weights,
)
from sparse_dm.metrics.images_for_fid import generated_batches, reference_batches, reference_identity
from sparse_dm.training.modules.diffusion import DiffusionModule

METRIC_PREFIX = "fid/"
FIT_STAGE = "fit"


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without moving any global RNG, so the training noise stream is untouched
    (DataLoader iterators, dropout or a third-party library may otherwise draw from it)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside the block, then each submodule's own previous mode (frozen parts stay frozen)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


class FidelityCallback(L.Callback):
    """FID/KID every N optimizer steps on rank 0, with its own sample count and sampler steps."""

    def __init__(
        self,
        every_n_steps: int,
        num_samples: int,
        batch_size: int,
        fidelity: Mapping[str, Any] | None = None,
        sampling_steps: int | None = None,
        num_reference: int | None = None,
        seed: int = 0,
        at_train_end: bool = True,
    ) -> None:
        """
        every_n_steps: optimizer steps between evaluations; num_samples: generated images per evaluation;
        batch_size: samples per `generate` call; fidelity: FidelityConfig keys (feature_extractor,
        weights_path, kid_subset_size, ...); sampling_steps: None = the model's sampling.steps;
        num_reference: training items in the reference set (None = all); seed: the sampling generator's
        seed, the same at every evaluation so the curve shows the weights changing, not the noise;
        at_train_end: also evaluate the final step when it is not a multiple of every_n_steps.
        """
        super().__init__()
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("num_samples", num_samples),
            ("batch_size", batch_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.fidelity = FidelityConfig.from_mapping(fidelity)
        self.sampling_steps = sampling_steps
        self.num_reference = num_reference
        self.seed = seed
        self.at_train_end = at_train_end
        self.history: list[dict[str, float | int]] = []
        self.reference: FeatureStats | None = None

    # ----- Lightning hooks -------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Fail before training when FID cannot run (no weights); build the reference set once.

        The datamodule is set up before callbacks, and image datamodules switch to cached latents
        only in `on_fit_start`, so the reference here is still made of images.
        """
        resolve_weights(self.fidelity)
        if not isinstance(pl_module, DiffusionModule):
            raise TypeError(f"FidelityCallback needs a DiffusionModule, got {type(pl_module).__name__}")
        if stage != FIT_STAGE or not trainer.is_global_zero or self.reference is not None:
            return
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError("FidelityCallback builds its reference set from the datamodule: fit with one")
        with preserved_rng():
            identity = reference_identity(pl_module, datamodule, self.num_reference)
            self.reference = reference_stats(
                identity,
                lambda: reference_batches(pl_module, datamodule, self.num_reference, self.batch_size),
                self.fidelity,
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Called once per micro-batch: under gradient accumulation global_step repeats, so dedupe.
        step = trainer.global_step
        if step % self.every_n_steps == 0 and not self._evaluated(step):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end and trainer.global_step > 0 and not self._evaluated(trainer.global_step):
            self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The curve so far, so a resumed run continues it instead of starting a new one."""
        return {"history": [dict(record) for record in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(record) for record in state_dict["history"]]

    # ----- evaluation ------------------------------------------------------------------------
    def _evaluated(self, step: int) -> bool:
        return bool(self.history) and self.history[-1]["step"] == step

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float | int] | None:
        """Sample, score and log at the current step (rank 0; other ranks return None at once)."""
        if not trainer.is_global_zero:
            return None
        if self.reference is None:
            raise RuntimeError("FidelityCallback has no reference set: setup(stage='fit') did not run")
        assert isinstance(pl_module, DiffusionModule)
        step = trainer.global_step
        steps = int(self.sampling_steps or pl_module.sampling_cfg["steps"])
        generator = torch.Generator().manual_seed(self.seed)
        with preserved_rng(), eval_mode(pl_module):
            batches = generated_batches(pl_module, self.num_samples, self.batch_size, generator, steps)
            scores = fidelity_from_stats(extract_stats(batches, self.fidelity), self.reference, self.fidelity)
        for logger in trainer.loggers:
            logger.log_metrics({METRIC_PREFIX + key: value for key, value in scores.items()}, step=step)
        record: dict[str, float | int] = {"step": step, **scores}
        self.history.append(record)
        rank_zero_info(
            f"step {step}: FID {scores['fid']:.3f}, KID {scores['kid_mean']:.5f} +- {scores['kid_std']:.5f} "
            f"({self.num_samples} samples, {steps} sampling steps)"
        )
        return record
