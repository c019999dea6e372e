"""`init_from=<ckpt>`: start a new run from another run's weights (typically a dense model pruned to
this run's masks), with a fresh optimizer, step counter, EMA and masks from this run's config.

Unlike `resume`, nothing of the old run's training state is kept; only the denoiser's weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from sparse_dm.sparsity.bands import BAND_MASKS_SUFFIX
from sparse_dm.sparsity.engine import SparseEngine
from sparse_dm.sparsity.masks import MASK_SUFFIX, apply_masks
from sparse_dm.training.checkpointing import FINGERPRINT_KEY, config_differences
from sparse_dm.training.modules.diffusion import DiffusionModule

NET_PREFIX = "net."
MODEL_KEYS = ("model.name", "model.net")


def net_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The denoiser's parameters and non-mask buffers, without the `net.` prefix."""
    return {
        key[len(NET_PREFIX) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(NET_PREFIX) and not key.endswith((MASK_SUFFIX, BAND_MASKS_SUFFIX))
    }


def check_init_compatible(checkpoint: dict[str, Any], path: Path, cfg: DictConfig) -> None:
    """The checkpoint must hold the same architecture (model.name, model.net) as this run."""
    stored = checkpoint.get(FINGERPRINT_KEY)
    if stored is None:
        raise ValueError(f"init_from={path}: not a sparse_dm.train checkpoint (no {FINGERPRINT_KEY})")
    differences = config_differences(stored, cfg, MODEL_KEYS)
    if differences:
        raise ValueError(f"init_from={path} holds another model:\n  " + "\n  ".join(differences))


@torch.no_grad()
def init_from_checkpoint(
    module: DiffusionModule, engine: SparseEngine | None, checkpoint: dict[str, Any]
) -> None:
    """Load the weights, zero them outside this run's masks, and restart the EMA from them."""
    weights = net_weights(checkpoint)
    missing, unexpected = module.net.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith((MASK_SUFFIX, BAND_MASKS_SUFFIX))]
    if missing or unexpected:
        raise ValueError(
            f"init_from: weights do not fit the model (missing {missing}, unexpected {unexpected})"
        )
    if engine is not None:
        apply_masks(engine.weights)
    shadows = dict(module.ema.named_buffers())
    for name, param in module.net.named_parameters():
        shadows[name.replace(".", "__")].copy_(param)
