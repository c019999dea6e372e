"""FID and KID of in-memory samples via torch-fidelity (the paper's evaluation, Section 4).

Samples never touch the disk: generated and reference images are uint8 N x 3 x H x W tensors wrapped
as a Dataset. Feature-extractor weights are resolved *before* anything expensive happens, so an
offline machine without Inception weights fails fast with instructions instead of after sampling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import KEY_METRIC_FID
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

INCEPTION = "inception-v3-compat"
UINT8_MAX = 255
RGB_CHANNELS = 3


class FidelityUnavailableError(RuntimeError):
    """FID/KID cannot run offline (no feature-extractor weights); raised before any sampling."""


@dataclass(frozen=True)
class FidelityConfig:
    """How FID/KID are computed; defaults are torch-fidelity's (Inception-v3, 100 KID subsets of 1000)."""

    feature_extractor: str = INCEPTION
    weights_path: str | None = None  # local weights file for offline machines
    kid_subset_size: int = 1000  # shrunk to the sample count when fewer samples exist
    kid_subsets: int = 100
    batch_size: int = 64
    cuda: bool | None = None  # None: use a GPU when one is visible
    verbose: bool = False

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> FidelityConfig:
        """Build from a (possibly partial) config mapping; unknown keys are an error, not silently ignored."""
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise KeyError(f"unknown fidelity config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**cfg)


def inception_cache_path() -> Path:
    """Where torch-fidelity's first (online) use caches the Inception weights (torch hub checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name


def resolve_weights(cfg: FidelityConfig) -> str | None:
    """Return the weights file to load, or None for extractors that need none; fail clearly when offline.

    Call this before generating samples: it is cheap and never downloads.
    """
    if cfg.feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise FidelityUnavailableError(
            f"feature extractor {cfg.feature_extractor!r} is not registered with torch-fidelity "
            f"(torch_fidelity.register_feature_extractor); known: {sorted(FEATURE_EXTRACTORS_REGISTRY)}"
        )
    if cfg.weights_path is not None:
        path = Path(cfg.weights_path).expanduser()
        if not path.is_file():
            raise FidelityUnavailableError(f"feature-extractor weights file not found: {path}")
        return str(path)
    if cfg.feature_extractor != INCEPTION:
        return None  # a registered custom extractor brings its own weights
    cached = inception_cache_path()
    if cached.is_file():
        return str(cached)
    raise FidelityUnavailableError(
        "Inception-v3 weights for FID/KID are not available offline: neither torch-fidelity's cache "
        f"({cached}) nor a local file (fidelity.weights_path) exists. On a machine with internet, download "
        f"{URL_INCEPTION_V3} and either place it at {cached} or pass fidelity.weights_path=/path/to/it."
    )


class UInt8Images(Dataset):
    """uint8 N x 3 x H x W images as the Dataset torch-fidelity consumes (one tensor per item)."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != RGB_CHANNELS:
            raise ValueError(f"expected uint8 N x 3 x H x W images, got {images.dtype} {tuple(images.shape)}")
        self.images = images.cpu()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def to_uint8(images: torch.Tensor, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """Map float images in [low, high] (decoded LDM images use [-1, 1]) to uint8, clamping overshoot."""
    scaled = (images.detach().float().clamp(low, high) - low) / (high - low)
    return (scaled * UINT8_MAX).round().to(torch.uint8).cpu()


def compute_fidelity(
    generated: torch.Tensor, reference: torch.Tensor, cfg: FidelityConfig
) -> dict[str, float]:
    """FID and KID (mean, std) of generated vs reference uint8 images; lower is better for both."""
    weights = resolve_weights(cfg)
    num_common = min(generated.shape[0], reference.shape[0])
    metrics = torch_fidelity.calculate_metrics(
        input1=UInt8Images(generated),
        input2=UInt8Images(reference),
        fid=True,
        kid=True,
        feature_extractor=cfg.feature_extractor,
        feature_extractor_weights_path=weights,
        kid_subset_size=min(cfg.kid_subset_size, num_common),
        kid_subsets=cfg.kid_subsets,
        batch_size=cfg.batch_size,
        cuda=torch.cuda.is_available() if cfg.cuda is None else cfg.cuda,
        cache=False,  # in-memory inputs have no stable identity to cache under
        save_cpu_ram=True,  # data are already in memory: no DataLoader worker processes
        verbose=cfg.verbose,
    )
    return {
        "fid": float(metrics[KEY_METRIC_FID]),
        "kid_mean": float(metrics[KEY_METRIC_KID_MEAN]),
        "kid_std": float(metrics[KEY_METRIC_KID_STD]),
    }
