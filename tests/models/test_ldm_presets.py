"""Every paper LDM preset on a synthetic folder tree with the real layout and file counts (tiny PNGs):
it composes, sets up its splits, and runs 2 steps + validation + sampling with a tiny UNet and a tiny
first stage. ImageNet's 1.28M files are replaced by 1000 class folders of 2 train / 1 val images, with
dataset.num_train / num_val overridden to those counts (the only count override)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from helpers.run_config import compose_config
from hydra.utils import instantiate
from PIL import Image

from sparse_dm.models.vq_autoencoder import VQModel
from sparse_dm.planning import disk as preflight
from sparse_dm.run.build import build_run
from sparse_dm.train import run
from sparse_dm.training.modules.ldm import CHECKPOINT_HASH_KEY

TINY_VQ = dict(embed_dim=3, n_embed=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=3, resolution=16)
IMAGENETTE_CLASSES = 10
IMAGENET_CLASSES = 1000


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tree(folder, counts_by_subfolder):
    """counts_by_subfolder: {relative folder: number of images}; a few distinct tiny PNGs, reused."""
    variants = [png_bytes(seed) for seed in range(7)]
    for sub, count in counts_by_subfolder.items():
        target = folder / sub
        target.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (target / f"{i:05d}.png").write_bytes(variants[i % len(variants)])


def split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_tree(root / "celebahq", {"": 13_000})  # the paper's 12,500 / 500 subsets need 13,000 images
    write_tree(root / "lsun", {"": 10_598 + 2_500})
    wnids = [f"n{i:08d}" for i in range(IMAGENET_CLASSES)]
    train = split_evenly(9_469, IMAGENETTE_CLASSES)
    val = split_evenly(3_925, IMAGENETTE_CLASSES)
    write_tree(root / "imagenette2", {f"train/{w}": n for w, n in zip(wnids, train, strict=False)})
    write_tree(root / "imagenette2", {f"val/{w}": n for w, n in zip(wnids, val, strict=False)})
    write_tree(root / "imagenet", {f"train/{w}": 2 for w in wnids} | {f"val/{w}": 1 for w in wnids})
    first_stage = root / "vq.ckpt"
    torch.manual_seed(0)
    torch.save({"state_dict": VQModel(**TINY_VQ).state_dict()}, first_stage)
    return root, first_stage


PRESETS = {
    "ldm_celebahq": ("celebahq", [], (12_500, 500)),
    "ldm_lsun_bedrooms": ("lsun", [], (10_598, 2_500)),
    "ldm_imagenette": ("imagenette2", [], (9_469, 3_925)),
    "ldm_imagenet_cond": ("imagenet", ["dataset.num_train=2000", "dataset.num_val=1000"], (2_000, 1_000)),
}


def tiny_overrides(root, first_stage, folder):
    vq = ",".join(f"{k}:{v}".replace(" ", "") for k, v in TINY_VQ.items())
    return [
        f"dataset.root={root / folder}",
        "dataset.resolution=16",
        "dataset.num_workers=0",
        f"model.first_stage.ckpt_path={first_stage}",
        f"model.first_stage.params={{{vq}}}",
        "model.latent_shape=[3,8,8]",
        "model.net.model_channels=32",
        "model.net.channel_mult=[1,2]",
        "model.net.num_res_blocks=1",
        "model.net.attention_resolutions=[2]",
        "model.net.num_head_channels=16",
        "model.sampling.steps=2",
        "model.sampling.num_samples=2",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.check_val_every_n_epoch=null",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "logger.wandb=null",
        "callbacks.last.every_n_train_steps=1",
        "num_threads=1",
    ]


def tensor_bytes_in(checkpoint) -> int:
    state = sum(t.numel() * t.element_size() for t in checkpoint["state_dict"].values())
    optimizer = sum(
        t.numel() * t.element_size()
        for opt in checkpoint["optimizer_states"]
        for param_state in opt["state"].values()
        for t in param_state.values()
    )
    return state + optimizer


@pytest.mark.parametrize("preset", list(PRESETS))
def test_paper_preset_runs_on_its_real_layout(tmp_path, trees, preset):
    root, first_stage = trees
    folder, extra, (num_train, num_val) = PRESETS[preset]
    cfg = compose_config(
        tmp_path, [f"experiment={preset}", *tiny_overrides(root, first_stage, folder), *extra]
    )
    assert cfg.model.sampling.discretization == "compvis" and cfg.model.scale_lr is False
    datamodule = instantiate(cfg.dataset, _convert_="all")
    datamodule.setup()
    assert (len(datamodule.train_set), len(datamodule.val_set)) == (num_train, num_val)
    assert not set(datamodule.train_set.files) & set(datamodule.val_set.files)

    summary = run(cfg)
    assert math.isfinite(summary["metrics"]["val/loss"]) and summary["samples"]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2 and CHECKPOINT_HASH_KEY in checkpoint
    assert not [k for k in checkpoint["state_dict"] if k.startswith("first_stage.")]
    module, _, _ = build_run(cfg)  # the preflight's estimate is exactly the saved tensors
    assert preflight.checkpoint_bytes(module)["total"] == tensor_bytes_in(checkpoint)
