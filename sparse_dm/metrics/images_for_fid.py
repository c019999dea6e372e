"""Samples and training data -> streams of uint8 RGB image batches for FID/KID.

One conversion shared by `sparse_dm.evaluate` (final numbers) and the in-training
`FidelityCallback` (training-dynamics curves), so both measure exactly the same thing: sketches go
through the documented renderer (sparse_dm.sketch.rasterise), images in [-1, 1] are quantised to uint8.
Both sides are produced batch by batch (samples generated lazily, training images read from disk), so
memory does not grow with the number of images; the reference side is named by ``reference_identity``
so its statistics are computed once (sparse_dm.metrics.fidelity.reference_stats).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from sparse_dm.metrics.fidelity import RGB_CHANNELS, to_uint8

GRID_SAMPLES = 64  # samples drawn into a PNG grid next to an evaluation


class FidSource(Protocol):
    """What a model family provides to be measured: each family (sketches, images) converts its own
    samples and names and streams its own reference set, so this module never asks which family it has."""

    def sampling_weights(self) -> AbstractContextManager: ...
    def generate(self, num_samples: int, generator: torch.Generator, **kwargs: Any) -> Any: ...
    def save_samples(self, samples: Any, path: Path) -> Path: ...
    def samples_to_images(self, samples: Any) -> torch.Tensor: ...
    def reference_identity(self, datamodule: Any, limit: int | None) -> str: ...
    def reference_batches(
        self, datamodule: Any, limit: int | None, batch_size: int
    ) -> Iterator[torch.Tensor]: ...


def to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (1 or 3 channels) -> uint8 RGB, what the feature extractor expects."""
    out = to_uint8(images)
    return out.expand(-1, RGB_CHANNELS, -1, -1).contiguous() if out.shape[1] == 1 else out


def _reference_dataset(datamodule: Any) -> Dataset:
    """The unaugmented training images (no flips / random crops), as the datamodule exposes them."""
    datamodule.setup("fit")
    reference = getattr(datamodule, "reference_set", None)
    return datamodule.train_set if reference is None else reference


def digest(*parts: object) -> str:
    """A short stable hash of the parts' string forms, for reference identities."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def image_reference_identity(datamodule: Any, limit: int | None) -> str:
    """(dataset, split, resolution, count, content fingerprint) of an image datamodule's training set."""
    name = getattr(datamodule, "name", type(datamodule).__name__)
    dataset = _reference_dataset(datamodule)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    resolution = "x".join(map(str, dataset[0]["image"].shape[-2:]))
    return f"{name}|train|{resolution}|n={count}|{dataset.fingerprint()}"


def image_reference_batches(datamodule: Any, limit: int | None, batch_size: int) -> Iterator[torch.Tensor]:
    """The first `limit` training images (None: all) as uint8 RGB batches.

    The datamodule must still hold images (not cached latents): call this before `on_fit_start`.
    """
    dataset = _reference_dataset(datamodule)
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        yield to_rgb_uint8(batch["image"])


class ImageFidSource:
    """Mixin for model families whose samples are images in [-1, 1] (LDM): FID reads them as uint8
    RGB and compares with the datamodule's unaugmented training images."""

    def samples_to_images(self, samples: torch.Tensor) -> torch.Tensor:
        return to_rgb_uint8(samples)

    def reference_identity(self, datamodule: Any, limit: int | None) -> str:
        return image_reference_identity(datamodule, limit)

    def reference_batches(
        self, datamodule: Any, limit: int | None, batch_size: int
    ) -> Iterator[torch.Tensor]:
        return image_reference_batches(datamodule, limit, batch_size)


def reference_identity(module: FidSource, datamodule: Any, limit: int | None) -> str:
    """What the reference statistics depend on (dataset, split, rendering/resolution, count, content)."""
    return module.reference_identity(datamodule, limit)


def reference_batches(
    module: FidSource, datamodule: Any, limit: int | None, batch_size: int
) -> Iterator[torch.Tensor]:
    """The first `limit` training items (None: all) as uint8 RGB batches, converted like samples."""
    return module.reference_batches(datamodule, limit, batch_size)


@torch.no_grad()
def generated_batches(
    module: FidSource,
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
            yield module.samples_to_images(samples)
