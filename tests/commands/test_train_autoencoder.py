"""`python -m sparse_dm.train_autoencoder` (README, stage 1): a few steps that really train and export."""

from __future__ import annotations

import csv
import subprocess
import sys

import torch
from helpers.tolerance import assert_close_computed, mse_bound, reductions
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from sparse_dm.models.vq_autoencoder import VQModel, load_first_stage

STEPS = 12
NUM_VAL = 16  # one validation batch, so the logged val/rec is the loss of that batch
RECONSTRUCTIONS = 4
FIRST_LAST = 3  # loss steps averaged at each end of the run
LOSS_RATIO_MAX = 0.8
GRID_PADDING = 2  # torchvision.utils.save_image's default


def test_train_autoencoder_trains_and_exports_a_loadable_first_stage(tmp_path):
    out = tmp_path / "run"
    overrides = [
        f"hydra.run.dir={out}",
        "num_threads=1",
        f"num_reconstructions={RECONSTRUCTIONS}",
        "dataset.num_train=64",
        f"dataset.num_val={NUM_VAL}",
        f"dataset.batch_size={NUM_VAL}",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
    ]
    cmd = [sys.executable, "-m", "sparse_dm.train_autoencoder", *overrides]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path, timeout=300)

    rows = list(csv.DictReader((out / "csv" / "version_0" / "metrics.csv").open()))
    train = [float(r["train/rec"]) for r in rows if r.get("train/rec")]
    assert len(train) == STEPS
    # reconstruction loss went down by far more than batch noise (lr=0 gives a ratio of 1.00; 12 steps ~0.5)
    assert sum(train[-FIRST_LAST:]) < LOSS_RATIO_MAX * sum(train[:FIRST_LAST])
    logged_val = [float(r["val/rec"]) for r in rows if r.get("val/rec")][-1]

    cfg = OmegaConf.load(out / "config.yaml")
    vq = load_first_stage(VQModel(**cfg.model.vq), out / "first_stage.pt")  # weights_only, strict keys
    datamodule = instantiate(cfg.dataset)
    datamodule.setup("fit")
    images = next(iter(datamodule.val_dataloader()))["image"]
    with torch.no_grad():
        (rec, _), chain = reductions(vq, images)
    assert torch.isfinite(rec).all()
    # the exported weights are the trained ones: they reproduce the run's own validation loss
    # (the run computed it on 1 thread, this process on 2: other blockings; the straight-through
    # z + (zq - z) adds 2 roundings to the chain)
    loss = torch.nn.functional.mse_loss(rec, images)
    n, scale = mse_bound(float(loss), images.numel(), chain)
    assert_close_computed(loss, torch.tensor(logged_val), reduction_length=n + 2, scale=scale, why="val/rec")

    with Image.open(out / "reconstructions.png") as grid:  # originals above reconstructions
        tile = cfg.dataset.resolution + GRID_PADDING
        assert grid.size == (RECONSTRUCTIONS * tile + GRID_PADDING, 2 * tile + GRID_PADDING)
