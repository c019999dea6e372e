"""A tiny sparse ChiroDiff run folder with a Lightning-format checkpoint, built without training
(a fraction of a second), for export/sampling tests: the run's config.yaml, masks from the real
SparseEngine, weights and EMA perturbed so they differ, and some in-mask weights exactly 0 (as
freshly regrown RigL weights are)."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers.run_config import TINY_CHIRODIFF, compose_config
from omegaconf import OmegaConf

from sparse_dm.run.build import build_run
from sparse_dm.sparsity.masks import apply_masks

TINY_SPARSE_CHIRODIFF = [
    *TINY_CHIRODIFF,
    "model.net.num_layers=2",  # a second layer reads the first one's bidirectional output
    "method=rigl",
    "sparsity=0.9",
]
LENGTH_POOL = [3, 7, 12, 20]
STEP = 6


@torch.no_grad()
def fake_run(output_dir: Path, overrides: tuple[str, ...] = ()) -> Path:
    """Write the run folder and return its checkpoints/last.ckpt."""
    cfg = compose_config(output_dir, [*TINY_SPARSE_CHIRODIFF, *overrides])
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    module, _, engine = build_run(cfg)
    generator = torch.Generator().manual_seed(1)
    for param in module.net.parameters():
        param.add_(0.3 * torch.randn(param.shape, generator=generator))
    for shadow in filter(torch.is_floating_point, module.ema.buffers()):
        shadow.add_(0.1 * torch.randn(shadow.shape, generator=generator))
    apply_masks(engine.weights)
    module.ema.remask(module.net)
    first = engine.weights[0]
    regrown = first.mask.view(-1).nonzero()[:3, 0]  # in the mask, value exactly 0 (raw and EMA)
    first.param.view(-1)[regrown] = 0.0
    module.ema.get_buffer(first.name.replace(".", "__")).view(-1)[regrown] = 0.0
    module.set_length_pool(torch.tensor(LENGTH_POOL))
    path = output_dir / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"state_dict": module.state_dict(), "global_step": STEP}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path
