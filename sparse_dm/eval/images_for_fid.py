"""Samples and training data -> uint8 RGB images for FID/KID.

One conversion shared by `sparse_dm.evaluate` (final numbers) and the in-training
`FidelityCallback` (training-dynamics curves), so both measure exactly the same thing: sketches go
through the documented renderer (sparse_dm.eval.rasterise), images in [-1, 1] are quantised to uint8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from sparse_dm.data.stroke3 import deltas_to_strokes
from sparse_dm.eval.fidelity import RGB_CHANNELS, to_uint8
from sparse_dm.eval.rasterise import render_batch
from sparse_dm.lightning.chirodiff_module import ChiroDiffModule
from sparse_dm.lightning.diffusion_module import DiffusionModule

GRID_SAMPLES = 64  # samples drawn into a PNG grid next to an evaluation


def to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (1 or 3 channels) -> uint8 RGB, what the feature extractor expects."""
    out = to_uint8(images)
    return out.expand(-1, RGB_CHANNELS, -1, -1).contiguous() if out.shape[1] == 1 else out


def sketches_to_images(module: ChiroDiffModule, deltas: list[torch.Tensor]) -> torch.Tensor:
    """Delta sequences -> strokes (the module's pen threshold) -> the documented renderer."""
    threshold = float(module.sampling_cfg["pen_threshold"])
    return render_batch([deltas_to_strokes(d, threshold) for d in deltas], **module.render_cfg)


def samples_to_images(module: DiffusionModule, samples: Any) -> torch.Tensor:
    """Raw `module.generate` output -> uint8 RGB: rendered sketches or quantised [-1, 1] images."""
    if isinstance(module, ChiroDiffModule):
        return sketches_to_images(module, samples)
    return to_rgb_uint8(samples)


def reference_images(module: DiffusionModule, datamodule: Any, limit: int | None) -> torch.Tensor:
    """The first `limit` training items (None: all) as uint8 RGB, rendered / converted like samples.

    Image datamodules must still hold images (not cached latents): call this before `on_fit_start`.
    """
    datamodule.setup("fit")
    if isinstance(module, ChiroDiffModule):
        return sketches_to_images(module, datamodule.datasets["train"].drawings[:limit])
    chunks, count = [], 0
    for batch in DataLoader(datamodule.train_set, batch_size=datamodule.batch_size, shuffle=False):
        chunks.append(to_rgb_uint8(batch["image"]))
        count += len(chunks[-1])
        if limit is not None and count >= limit:
            break
    return torch.cat(chunks)[:limit]


@torch.no_grad()
def generate_images(
    module: DiffusionModule,
    num_samples: int,
    batch_size: int,
    generator: torch.Generator,
    steps: int,
    grid_path: Path | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """num_samples samples with the EMA weights as uint8 RGB; the first ones optionally saved as a grid.

    All noise comes from `generator`, so the result depends only on its seed and the weights.
    """
    images = []
    batches = range(0, num_samples, batch_size)
    with module.ema_weights():
        for start in tqdm(batches, desc=f"sampling ({steps} steps)", disable=not progress):
            samples = module.generate(min(batch_size, num_samples - start), generator, steps=steps)
            if start == 0 and grid_path is not None:
                module.save_samples(samples[:GRID_SAMPLES], grid_path)
            images.append(samples_to_images(module, samples))
    return torch.cat(images)
