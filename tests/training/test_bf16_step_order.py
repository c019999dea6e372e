"""The sparse bookkeeping of one optimizer step under bf16 autocast (CPU), through Lightning and train.run.

Mixed precision changes where gradients and weights are cast; the invariants after the run must not
change: per-layer active weights equal the distribution's target, no weight or EMA shadow is nonzero
outside its mask. (fp16 with a GradScaler: tests/test_dst_callback.py.)"""

from __future__ import annotations

import torch
from helpers.run_config import TINY_CHIRODIFF, compose_config
from omegaconf import OmegaConf

from sparse_dm.sparsity.distributions import layer_counts
from sparse_dm.sparsity.masks import MASK_SUFFIX
from sparse_dm.train import run

PRECISION = "bf16-mixed"
SPARSITY = 0.5
EMA_PREFIX = "ema."
NET_PREFIX = "net."


def test_bf16_mixed_run_keeps_masks_exact_in_weights_and_ema(tmp_path):
    overrides = [
        *TINY_CHIRODIFF,
        "num_threads=1",
        "method=rigl",
        f"sparsity={SPARSITY}",
        f"trainer.precision={PRECISION}",
    ]
    summary = run(compose_config(tmp_path, overrides))
    assert OmegaConf.load(tmp_path / "config.yaml").trainer.precision == PRECISION
    assert summary["mask_updates"] >= 1  # the masks moved during the bf16 run

    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    masks = {k.removesuffix(MASK_SUFFIX): v for k, v in state.items() if k.endswith(MASK_SUFFIX)}
    assert masks
    cfg = OmegaConf.load(tmp_path / "config.yaml")
    targets = layer_counts([tuple(m.shape) for m in masks.values()], SPARSITY, cfg.method.distribution)
    for (name, mask), target in zip(masks.items(), targets, strict=True):
        assert int(mask.sum()) == target, name
        weight = state[name]
        assert weight.dtype == torch.float32  # mixed precision keeps fp32 master weights
        assert not weight[~mask].any(), f"{name}: nonzero weight outside its mask"
        shadow = state[EMA_PREFIX + name.removeprefix(NET_PREFIX).replace(".", "__")]
        assert not shadow[~mask].any(), f"{name}: EMA shadow nonzero outside the mask"
        assert shadow[mask].any()  # the shadow really tracks the active weights
