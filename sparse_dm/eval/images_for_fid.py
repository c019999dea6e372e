"""Samples and training data -> streams of uint8 RGB image batches for FID/KID.

One conversion shared by `sparse_dm.evaluate` (final numbers) and the in-training
`FidelityCallback` (training-dynamics curves), so both measure exactly the same thing: sketches go
through the documented renderer (sparse_dm.eval.rasterise), images in [-1, 1] are quantised to uint8.
Both sides are produced batch by batch (samples generated lazily, training images read from disk), so
memory does not grow with the number of images; the reference side is named by ``reference_identity``
so its statistics are computed once (sparse_dm.eval.fidelity.reference_stats).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
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


def _reference_dataset(datamodule: Any) -> Dataset:
    """The unaugmented training images (no flips / random crops), as the datamodule exposes them."""
    datamodule.setup("fit")
    reference = getattr(datamodule, "reference_set", None)
    return datamodule.train_set if reference is None else reference


def _digest(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def reference_identity(module: DiffusionModule, datamodule: Any, limit: int | None) -> str:
    """(dataset, split, resolution, count, content fingerprint): what the reference statistics depend on."""
    name = getattr(datamodule, "name", type(datamodule).__name__)
    if isinstance(module, ChiroDiffModule):
        datamodule.setup("fit")
        drawings = datamodule.datasets["train"].drawings[:limit]
        content = hashlib.sha256(b"".join(np.ascontiguousarray(d).tobytes() for d in drawings)).hexdigest()
        render = sorted(module.render_cfg.items()), module.sampling_cfg["pen_threshold"]
        return f"{name}|train|render={_digest(render)}|n={len(drawings)}|{content[:16]}"
    dataset = _reference_dataset(datamodule)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    resolution = "x".join(map(str, dataset[0]["image"].shape[-2:]))
    return f"{name}|train|{resolution}|n={count}|{dataset.fingerprint()}"


def reference_batches(
    module: DiffusionModule, datamodule: Any, limit: int | None, batch_size: int
) -> Iterator[torch.Tensor]:
    """The first `limit` training items (None: all) as uint8 RGB batches, rendered / converted like samples.

    Image datamodules must still hold images (not cached latents): call this before `on_fit_start`.
    """
    if isinstance(module, ChiroDiffModule):
        datamodule.setup("fit")
        drawings = datamodule.datasets["train"].drawings[:limit]
        for start in range(0, len(drawings), batch_size):
            yield sketches_to_images(module, drawings[start : start + batch_size])
        return
    dataset = _reference_dataset(datamodule)
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        yield to_rgb_uint8(batch["image"])


@torch.no_grad()
def generated_batches(
    module: DiffusionModule,
    num_samples: int,
    batch_size: int,
    generator: torch.Generator,
    steps: int,
    grid_path: Path | None = None,
    progress: bool = False,
) -> Iterator[torch.Tensor]:
    """num_samples samples with the `sampling.weights` (EMA or raw) as uint8 RGB batches, generated
    lazily; the first ones optionally saved as a grid. All noise comes from `generator`, so the result
    depends only on its seed and the weights."""
    with module.sampling_weights():
        for start in tqdm(
            range(0, num_samples, batch_size), desc=f"sampling ({steps} steps)", disable=not progress
        ):
            samples = module.generate(min(batch_size, num_samples - start), generator, steps=steps)
            if start == 0 and grid_path is not None:
                module.save_samples(samples[:GRID_SAMPLES], grid_path)
            yield samples_to_images(module, samples)
