"""FID and KID that scale, with torch-fidelity's feature extractors and metric formulas.

Images arrive as an iterable of uint8 N x 3 x H x W batches (generated lazily, or read from disk batch
by batch) and are reduced on the fly to ``FeatureStats``: the running sum and sum of outer products of
the features (float64; FID's mean and covariance) plus a seeded uniform sample (reservoir) of at most
``kid_pool_size`` features for KID. Memory is O(d^2 + pool x d), independent of the number of images.
Reference statistics are computed once per (dataset, split, resolution, extractor, weights, count,
content fingerprint) and stored as plain tensors under ``cache_dir`` (read back with weights_only).
Feature-extractor weights are resolved *before* anything expensive happens, so an offline machine
without Inception weights fails fast with instructions instead of after sampling.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, resolve_feature_layer_for_metric

INCEPTION = "inception-v3-compat"
UINT8_MAX = 255
RGB_CHANNELS = 3
MIN_FID_SAMPLES = 2  # a covariance needs two samples
CACHE_SUBDIR = "sparse_dm_fid"


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
    cache_dir: str | None = None  # reference statistics cache (None: torch's hub dir / sparse_dm_fid)
    kid_pool_size: int = 10000  # features kept (seeded uniform sample) per side for KID's subsets
    seed: int = 0  # reservoir sampling and KID subset draws

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


def to_uint8(images: torch.Tensor, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """Map float images in [low, high] (decoded LDM images use [-1, 1]) to uint8, clamping overshoot."""
    scaled = (images.detach().float().clamp(low, high) - low) / (high - low)
    return (scaled * UINT8_MAX).round().to(torch.uint8).cpu()


class FeatureStats:
    """Streaming FID statistics (sum, sum of outer products, count; float64) and a reservoir sample of
    at most ``pool_size`` features for KID (Algorithm R with a seeded generator)."""

    def __init__(self, dim: int, pool_size: int, seed: int) -> None:
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.pool = torch.empty(0, dim)
        self.pool_size = pool_size
        self.rng = np.random.default_rng(seed)

    def add(self, features: torch.Tensor) -> None:
        f64 = features.double()
        self.total += f64.sum(0)
        self.outer += f64.T @ f64
        for row in features:
            self.count += 1
            if len(self.pool) < self.pool_size:
                self.pool = torch.cat([self.pool, row[None].float()])
            else:
                slot = int(self.rng.integers(0, self.count))
                if slot < self.pool_size:
                    self.pool[slot] = row.float()

    def fid_statistics(self) -> dict[str, np.ndarray]:
        """Mean and (unbiased, like numpy.cov) covariance: what torch-fidelity computes from all features."""
        if self.count < MIN_FID_SAMPLES:
            raise ValueError(f"FID needs at least {MIN_FID_SAMPLES} images, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return {"mu": mu.numpy(), "sigma": sigma.numpy()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "count": torch.tensor(self.count),
            "total": self.total,
            "outer": self.outer,
            "pool": self.pool,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], seed: int) -> FeatureStats:
        stats = cls(state["total"].shape[0], state["pool"].shape[0], seed)
        stats.count, stats.total, stats.outer, stats.pool = (
            int(state["count"]),
            state["total"],
            state["outer"],
            state["pool"],
        )
        return stats


def feature_layer(cfg: FidelityConfig) -> str:
    """The extractor's feature layer for FID and KID (the same one for torch-fidelity's extractors)."""
    layers = {
        resolve_feature_layer_for_metric(m, feature_extractor=cfg.feature_extractor) for m in ("fid", "kid")
    }
    if len(layers) != 1:
        raise FidelityUnavailableError(
            f"{cfg.feature_extractor} uses different FID/KID layers {sorted(layers)}"
        )
    return layers.pop()


def _use_cuda(cfg: FidelityConfig) -> bool:
    return torch.cuda.is_available() if cfg.cuda is None else cfg.cuda


@torch.no_grad()
def extract_stats(batches: Iterable[torch.Tensor], cfg: FidelityConfig) -> FeatureStats:
    """Feed uint8 image batches through the feature extractor, keeping only FeatureStats."""
    weights = resolve_weights(cfg)
    layer, cuda = feature_layer(cfg), _use_cuda(cfg)
    extractor = create_feature_extractor(
        cfg.feature_extractor, [layer], cuda=cuda, feature_extractor_weights_path=weights, verbose=cfg.verbose
    )
    stats = None
    for batch in batches:
        if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != RGB_CHANNELS:
            raise ValueError(f"expected uint8 N x 3 x H x W images, got {batch.dtype} {tuple(batch.shape)}")
        for start in range(0, len(batch), cfg.batch_size):
            chunk = batch[start : start + cfg.batch_size]
            features = extractor.convert_features_tuple_to_dict(extractor(chunk.cuda() if cuda else chunk))[
                layer
            ]
            if stats is None:
                stats = FeatureStats(features.shape[1], cfg.kid_pool_size, cfg.seed)
            stats.add(features.cpu())
    if stats is None:
        raise ValueError("no images to compute FID/KID from")
    return stats


def weights_identity(cfg: FidelityConfig) -> str:
    """Names the extractor weights in cache keys (file size and mtime; registered extractors: their name)."""
    weights = resolve_weights(cfg)
    if weights is None:
        return "builtin"
    stat = Path(weights).stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def reference_cache_file(cfg: FidelityConfig, identity: str) -> Path:
    """One file per reference set and extractor: ``identity`` = dataset, split, resolution, count and
    a content fingerprint of the images (see images_for_fid.reference_identity)."""
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path(torch.hub.get_dir()) / CACHE_SUBDIR
    extractor = f"{cfg.feature_extractor}|{feature_layer(cfg)}|{weights_identity(cfg)}"
    key = f"{identity}|{extractor}|pool{cfg.kid_pool_size}"
    readable = identity.split("|")[0]
    return root / f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"


def reference_stats(
    identity: str, batches: Callable[[], Iterable[torch.Tensor]], cfg: FidelityConfig
) -> FeatureStats:
    """Reference statistics from the cache, or computed from ``batches()`` once and stored atomically."""
    path = reference_cache_file(cfg, identity)
    if path.is_file():
        return FeatureStats.from_state_dict(torch.load(path, map_location="cpu", weights_only=True), cfg.seed)
    stats = extract_stats(batches(), cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save(stats.state_dict(), tmp)
    tmp.replace(path)
    return stats


def fidelity_from_stats(
    generated: FeatureStats, reference: FeatureStats, cfg: FidelityConfig
) -> dict[str, float]:
    """FID (torch-fidelity's formula on the streamed statistics) and KID over the two feature pools."""
    fid = fid_statistics_to_metric(generated.fid_statistics(), reference.fid_statistics(), cfg.verbose)
    kid = kid_features_to_metric(
        generated.pool,
        reference.pool,
        kid_subsets=cfg.kid_subsets,
        kid_subset_size=min(cfg.kid_subset_size, len(generated.pool), len(reference.pool)),
        rng_seed=cfg.seed,
        verbose=cfg.verbose,
    )
    return {
        "fid": float(fid[KEY_METRIC_FID]),
        "kid_mean": float(kid[KEY_METRIC_KID_MEAN]),
        "kid_std": float(kid[KEY_METRIC_KID_STD]),
    }


def in_batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    return (images[i : i + batch_size] for i in range(0, len(images), batch_size))


def compute_fidelity(
    generated: torch.Tensor, reference: torch.Tensor, cfg: FidelityConfig
) -> dict[str, float]:
    """FID and KID (mean, std) of two in-memory uint8 image sets; lower is better for both."""
    resolve_weights(cfg)
    return fidelity_from_stats(
        extract_stats(in_batches(generated, cfg.batch_size), cfg),
        extract_stats(in_batches(reference, cfg.batch_size), cfg),
        cfg,
    )
