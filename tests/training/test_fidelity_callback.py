"""Periodic FID/KID during training, offline, with a tiny extractor built and saved here.

The toy diffusion model samples 2-D points; a test-local subclass renders each point as a blob image
(and the data module its training points the same way), so the real image path of
sparse_dm.metrics.images_for_fid and torch-fidelity run end to end in a few seconds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import helpers.tiny_extractor as tiny_extractor
import lightning as L
import pytest
import torch
from helpers.run_config import compose_config
from helpers.toy_diffusion import MODULE_KWARGS, ToyData, ToyModule, ToyNet
from hydra.utils import instantiate
from lightning.pytorch.loggers.logger import Logger
from torch import Tensor

from sparse_dm.data.images import TensorImageDataset
from sparse_dm.metrics.fidelity import FidelityUnavailableError
from sparse_dm.metrics.images_for_fid import ImageFidSource
from sparse_dm.training.callbacks.fidelity import FidelityCallback

IMAGE_SIZE = 16
EXTENT = 3.0  # rendered window: [-EXTENT, EXTENT]^2 covers the toy data's two clusters
BLOB_WIDTH = 0.5
NUM_SAMPLES = 24
KID_SUBSETS = 10
EVERY = 2
MAX_STEPS = 5  # not a multiple of EVERY: the final step is scored by at_train_end
EXPECTED_STEPS = [2, 4, 5]
SEED = 0


def render_points(points: Tensor) -> Tensor:
    """(N, 2) points -> (N, 1, H, W) Gaussian blobs in [-1, 1] (the LDM image convention)."""
    axis = torch.linspace(-EXTENT, EXTENT, IMAGE_SIZE)
    dx = axis[None, None, :] - points[:, 0, None, None]
    dy = axis[None, :, None] - points[:, 1, None, None]
    blob = torch.exp(-(dx**2 + dy**2) / (2 * BLOB_WIDTH**2))
    return (2 * blob - 1)[:, None]


class PointImageModule(ImageFidSource, ToyModule):
    """ToyModule whose samples are images, like a latent diffusion model's decoded output."""

    def generate(self, num_samples: int, generator: torch.Generator, **kwargs: Any) -> Tensor:
        return render_points(super().generate(num_samples, generator, **kwargs))


class PointImageData(ToyData):
    """ToyData with an image `train_set`, as the image datamodules expose for the reference set."""

    def setup(self, stage: str | None = None) -> None:
        self.train_set = TensorImageDataset(render_points(self.points))


class MemoryLogger(Logger):
    """Keeps (step, metrics) pairs so the test can see what reached the loggers."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))


@pytest.fixture(scope="module")
def extractor_weights(tmp_path_factory) -> str:
    return str(tiny_extractor.install(tmp_path_factory.mktemp("extractor")))


def make_callback(weights_path: str) -> FidelityCallback:
    return FidelityCallback(
        every_n_steps=EVERY,
        num_samples=NUM_SAMPLES,
        batch_size=NUM_SAMPLES // 2,  # two generate() calls per evaluation
        fidelity={
            "feature_extractor": tiny_extractor.NAME,
            "weights_path": weights_path,
            "kid_subsets": KID_SUBSETS,
            "cuda": False,
            "cache_dir": str(Path(weights_path).parent / "fid_cache"),
        },
        seed=SEED,
    )


def fit(callbacks: list[L.Callback], logger: Logger | bool = False) -> dict[str, Tensor]:
    """A few seeded optimizer steps of the toy model; returns its final state (weights and EMA)."""
    L.seed_everything(SEED)
    module = PointImageModule(net=ToyNet(), **MODULE_KWARGS)
    trainer = L.Trainer(
        max_steps=MAX_STEPS,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=PointImageData())
    assert trainer.global_step == MAX_STEPS
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def runs(extractor_weights) -> dict[str, Any]:
    callback, logger = make_callback(extractor_weights), MemoryLogger()
    return {
        "baseline": fit([]),
        "with_fid": fit([callback], logger),
        "callback": callback,
        "logger": logger,
    }


def test_logs_fid_at_configured_steps(runs):
    logged = {step: m for step, m in runs["logger"].records if any(k.startswith("fid/") for k in m)}
    assert sorted(logged) == EXPECTED_STEPS
    for metrics in logged.values():
        assert set(metrics) == {"fid/fid", "fid/kid_mean", "fid/kid_std"}
        assert all(math.isfinite(v) for v in metrics.values())


def test_history_has_expected_steps(runs):
    history = runs["callback"].history
    assert [record["step"] for record in history] == EXPECTED_STEPS
    assert all(set(record) == {"step", "fid", "kid_mean", "kid_std"} for record in history)
    assert runs["callback"].reference.count == len(PointImageData().points)


def test_training_is_bit_identical_with_and_without_callback(runs):
    baseline, with_fid = runs["baseline"], runs["with_fid"]
    assert baseline.keys() == with_fid.keys()
    for key in baseline:
        assert torch.equal(baseline[key], with_fid[key]), key


def test_history_survives_checkpoint_state(runs, extractor_weights):
    restored = make_callback(extractor_weights)
    restored.load_state_dict(runs["callback"].state_dict())
    assert restored.history == runs["callback"].history


def test_missing_weights_fail_before_training(tmp_path):
    callback = FidelityCallback(
        every_n_steps=EVERY,
        num_samples=NUM_SAMPLES,
        batch_size=NUM_SAMPLES,
        fidelity={"weights_path": str(tmp_path / "missing.pth")},
    )
    L.seed_everything(SEED)
    module = PointImageModule(net=ToyNet(), **MODULE_KWARGS)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(
        max_steps=MAX_STEPS,
        accelerator="cpu",
        logger=False,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(FidelityUnavailableError, match="not found"):
        trainer.fit(module, datamodule=PointImageData())
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_config_option_adds_callback_to_defaults(tmp_path: Path, extractor_weights):
    cfg = compose_config(
        tmp_path,
        [
            "callbacks=fidelity",
            "callbacks.fidelity.every_n_steps=7",
            "callbacks.fidelity.num_samples=33",
            f"callbacks.fidelity.fidelity.weights_path={extractor_weights}",
        ],
    )
    assert {"checkpoint", "last", "fidelity"} <= set(cfg.callbacks)
    callback = instantiate(cfg.callbacks.fidelity)
    assert isinstance(callback, FidelityCallback)
    assert (callback.every_n_steps, callback.num_samples, callback.num_reference) == (7, 33, 33)
    assert callback.fidelity.weights_path == extractor_weights
