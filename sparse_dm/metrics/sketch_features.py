"""An offline FID/KID for stroke drawings: Fréchet and kernel distances in a small learned sketch space.

The paper scores samples with FID, i.e. in Inception-v3's feature space; those weights cannot be
fetched offline and no installed package ships them. This module ships its own extractor instead: a
~0.2M-parameter CNN trained self-supervised (SimCLR: two stroke-level augmentations of the same training
drawing should embed close, other drawings far; `python -m sparse_dm.train_sketch_features`) on the
KanjiVG training split, rendered by the project's renderer at 128 px and read at 64 px. Its weights lie
in `sparse_dm/metrics/assets/` and are checked against a pinned sha256 before they are parsed.

The numbers are FID and KID by torch-fidelity's own formulas, but in this space, so they are named
after the space, never "FID": `fsd_<dataset>` (Fréchet sketch distance) and `ksd_<dataset>` (kernel
sketch distance, KID's unbiased polynomial-kernel MMD²). They are comparable only with numbers from
the same weights, the same reference set and the same sample count (the Fréchet distance is biased
upwards by finite samples; see docs/sketch_metric.md for its floor with 500 vs 500 drawings).

The extractor is also registered with torch-fidelity (`EXTRACTOR_NAME`), so
`torch_fidelity.calculate_metrics(..., feature_extractor=EXTRACTOR_NAME)` works on uint8 renders.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from sparse_dm.data.stroke3 import load_stroke3_npz, resolve_data_path
from sparse_dm.sketch.rasterise import Strokes, render_batch
from sparse_dm.sketch.representation import deltas_to_strokes

EXTRACTOR_NAME = "sketch-simclr-kanjivg"  # the torch-fidelity registry name of the shipped extractor
FEATURE_LAYER = "embedding"
ASSETS_DIR = Path(__file__).parent / "assets"
SHIPPED_WEIGHTS = ASSETS_DIR / "sketch_features_kanjivg.pt"
# sha256 of SHIPPED_WEIGHTS, printed by the training command; a different file is refused unparsed.
SHIPPED_SHA256 = "a42ab45756332c6ab7affacb8bfa48e18113053fa4cc2c07a047688fdf8b987e"
# The bundled data the shipped weights were trained on; its test split is the reference of KanjiVG runs.
KANJIVG_PATH = "kanjivg/kanji.rdp200.npz"

# Architecture: 3x3 conv + BatchNorm + ReLU stages (out channels, stride), global average pool, linear.
CHANNELS = (24, 48, 48, 96, 128)
STRIDES = (2, 2, 1, 2, 2)
EMBED_DIM = 64  # small on purpose: the Fréchet distance estimates a d x d covariance from ~500 drawings
INPUT_SIZE = 64  # renders are area-downsampled to this many pixels per side

FEATURE_BATCH = 256  # drawings rendered and embedded per forward pass
MIN_SAMPLES = 500  # per side (issue 23); fewer give a larger, differently biased distance
KID_SUBSETS = 100  # torch-fidelity's default
KID_SUBSET_SIZE = 250  # half of MIN_SAMPLES, so the subsets differ and ksd_std means something
METRIC_SAMPLES = "sketch_metric_samples"
METRIC_REFERENCE = "sketch_metric_reference"


class WeightsHashError(ValueError):
    """A weights file whose sha256 is not the pinned one: changed, truncated or not these weights."""


@dataclass(frozen=True)
class RenderSpec:
    """How drawings become the extractor's input: the renderer's settings at training time."""

    canvas_size: int
    line_width: int
    margin: int


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SketchEncoder(nn.Module):
    """Conv stages -> global average pool -> linear embedding, standardised per coordinate.

    `feature_mean` / `feature_std` are the embedding's statistics over the (unaugmented) training
    drawings, stored with the weights: standardised coordinates keep KID's polynomial kernel
    (x.y / d + 1)^3 in its intended range and give every direction the same weight in the distance.
    """

    def __init__(
        self,
        channels: Sequence[int] = CHANNELS,
        strides: Sequence[int] = STRIDES,
        embed_dim: int = EMBED_DIM,
    ) -> None:
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"channels {tuple(channels)} and strides {tuple(strides)} differ in length")
        layers: list[nn.Module] = []
        in_ch = 1
        for out_ch, stride in zip(channels, strides, strict=True):
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
            in_ch = out_ch
        self.convs = nn.Sequential(*layers)
        self.project = nn.Linear(in_ch, embed_dim)
        self.register_buffer("feature_mean", torch.zeros(embed_dim))
        self.register_buffer("feature_std", torch.ones(embed_dim))

    def embed(self, x: Tensor) -> Tensor:
        """(N, 1, s, s) ink in [0, 1] -> raw (N, embed_dim) embedding (what the contrastive head reads)."""
        return self.project(self.convs(x).mean((2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return (self.embed(x) - self.feature_mean) / self.feature_std


def images_to_input(images: Tensor, render: RenderSpec, input_size: int) -> Tensor:
    """uint8 (N, 3, H, W) renders (black ink on white) -> float (N, 1, s, s) ink in [0, 1].

    Refuses another canvas size: the features depend on the line width relative to the canvas, so
    renders must use the settings the extractor was trained with.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 N x C x H x W renders, got {images.dtype} {tuple(images.shape)}")
    if images.shape[-2:] != (render.canvas_size, render.canvas_size):
        raise ValueError(
            f"renders are {tuple(images.shape[-2:])} px; this extractor was trained on {render} "
            "(sparse_dm.sketch.rasterise.render_batch with those arguments)"
        )
    ink = 1.0 - images.float().mean(1, keepdim=True) / 255.0
    return F.avg_pool2d(ink, render.canvas_size // input_size)


def save_weights(encoder: SketchEncoder, render: RenderSpec, dataset: str, path: Path) -> str:
    """Write the encoder and what it needs to be used (render settings, dataset name); returns the sha256."""
    meta = {
        "dataset": dataset,
        "canvas_size": render.canvas_size,
        "line_width": render.line_width,
        "margin": render.margin,
        "input_size": INPUT_SIZE,
        "channels": list(CHANNELS),
        "strides": list(STRIDES),
        "embed_dim": EMBED_DIM,
    }
    buffer = io.BytesIO()
    torch.save(
        {"state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()}, "meta": meta}, buffer
    )
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return sha256_bytes(data)


def load_weights(path: str | Path, expected_sha256: str) -> dict[str, Any]:
    """The weights file's contents, after its sha256 matched `expected_sha256`.

    The bytes are hashed and then parsed from memory (never re-read), with `weights_only=True`.
    """
    path = Path(path)
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if actual != expected_sha256:
        raise WeightsHashError(
            f"{path}: sha256 {actual} does not match the expected {expected_sha256}; the file was changed "
            "or is not the weights this code pins. Retrain with `python -m sparse_dm.train_sketch_features` "
            "and pin the hash it prints."
        )
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class SketchFeatures:
    """A loaded extractor with its render settings: drawings -> standardised embeddings."""

    def __init__(self, payload: dict[str, Any], sha256: str) -> None:
        meta = payload["meta"]
        self.dataset: str = meta["dataset"]
        self.sha256 = sha256
        self.render = RenderSpec(meta["canvas_size"], meta["line_width"], meta["margin"])
        self.input_size = int(meta["input_size"])
        self.encoder = SketchEncoder(meta["channels"], meta["strides"], meta["embed_dim"])
        self.encoder.load_state_dict(payload["state_dict"])
        self.encoder.requires_grad_(False).eval()

    def images(self, drawings: Sequence[Strokes]) -> Tensor:
        """Drawings rendered exactly as in training: uint8 (N, 3, H, W)."""
        r = self.render
        return render_batch(drawings, r.canvas_size, r.line_width, r.margin)

    @torch.no_grad()
    def from_images(self, images: Tensor) -> Tensor:
        """uint8 renders -> (N, embed_dim) float32 features."""
        device = next(self.encoder.parameters()).device
        return self.encoder(images_to_input(images, self.render, self.input_size).to(device)).cpu()

    def __call__(self, drawings: Sequence[Strokes], batch_size: int = FEATURE_BATCH) -> Tensor:
        """Drawings (lists of (k, 2) strokes) -> (N, embed_dim) features, rendered batch by batch."""
        if not drawings:
            raise ValueError("no drawings to compute sketch features from")
        return torch.cat(
            [
                self.from_images(self.images(drawings[i : i + batch_size]))
                for i in range(0, len(drawings), batch_size)
            ]
        )


@lru_cache(maxsize=4)
def _load_cached(path: str, sha256: str) -> SketchFeatures:
    return SketchFeatures(load_weights(path, sha256), sha256)


def load_sketch_features(weights_path: str | Path | None = None, sha256: str | None = None) -> SketchFeatures:
    """The shipped KanjiVG extractor (no arguments), or one's own weights with their sha256 (the training
    command prints it): a weights file is never loaded without a hash to check it against."""
    if weights_path is None:
        if sha256 is not None:
            raise ValueError("sha256 is only given with weights_path (the shipped weights' hash is pinned)")
        return _load_cached(str(SHIPPED_WEIGHTS), SHIPPED_SHA256)
    if sha256 is None:
        actual = sha256_bytes(Path(weights_path).read_bytes())
        raise ValueError(
            f"weights_path={weights_path} needs its sha256 (the one train_sketch_features printed); this "
            f"file's is {actual}"
        )
    return _load_cached(str(weights_path), sha256)


class SketchFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity's view of the extractor: uint8 (N, 3, H, W) renders -> one feature layer.

    `feature_extractor_weights_path` (torch-fidelity's own keyword) selects other weights; their
    sha256 then comes as `sketch_weights_sha256`.
    """

    def __init__(
        self,
        name: str,
        features_list: Sequence[str],
        feature_extractor_weights_path: str | None = None,
        sketch_weights_sha256: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, features_list)
        self.sketch = load_sketch_features(feature_extractor_weights_path, sketch_weights_sha256)
        self.encoder = self.sketch.encoder

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (FEATURE_LAYER,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        if metric not in ("fid", "kid", "prc"):
            raise ValueError(f"{EXTRACTOR_NAME} has no classifier logits for {metric!r}; use fid, kid or prc")
        return FEATURE_LAYER

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    def forward(self, images: Tensor) -> tuple[Tensor]:
        x = images_to_input(images.cpu(), self.sketch.render, self.sketch.input_size)
        return (self.encoder(x.to(next(self.encoder.parameters()).device)),)


def register() -> None:
    """Make `EXTRACTOR_NAME` known to torch-fidelity (idempotent; runs at import)."""
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, SketchFeatureExtractor)


register()


# --- distances ---------------------------------------------------------------------------------


def frechet_distance(features_1: Tensor, features_2: Tensor) -> float:
    """FID's formula, torch-fidelity's code on the float32 features exactly as `calculate_metrics` runs
    it (mean in float32, covariance and matrix square root in float64), so both routes agree exactly."""
    stats = [fid_features_to_statistics(f.detach().cpu().float()) for f in (features_1, features_2)]
    return float(fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID])


def kernel_distance(
    features_1: Tensor, features_2: Tensor, subsets: int, subset_size: int, seed: int
) -> tuple[float, float]:
    """KID (torch-fidelity's code: unbiased MMD², cubic polynomial kernel) over `subsets` random subsets
    of `subset_size` per side, on the float32 features as `calculate_metrics` does; returns (mean, std
    over subsets)."""
    out = kid_features_to_metric(
        features_1.detach().cpu().float(),
        features_2.detach().cpu().float(),
        kid_subsets=subsets,
        kid_subset_size=subset_size,
        rng_seed=seed,
        verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def fidelity_from_features(
    generated: Tensor,
    reference: Tensor,
    dataset: str,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> dict[str, float]:
    """`fsd_<dataset>`, `ksd_<dataset>` (mean) and `ksd_<dataset>_std` of two feature sets."""
    ksd, ksd_std = kernel_distance(generated, reference, kid_subsets, kid_subset_size, seed)
    return {
        f"fsd_{dataset}": frechet_distance(generated, reference),
        f"ksd_{dataset}": ksd,
        f"ksd_{dataset}_std": ksd_std,
    }


# --- drawings in, numbers out ------------------------------------------------------------------


def offsets_to_drawings(drawings: Sequence[np.ndarray | Tensor], pen_threshold: float) -> list[Strokes]:
    """(n, 3) offset rows (stroke-3, or ChiroDiff's normalised deltas) -> lists of strokes; a stroke
    ends after each row whose pen >= pen_threshold. Non-finite values are refused, naming the drawing."""
    out = []
    for i, d in enumerate(drawings):
        array = d.detach().cpu().numpy() if isinstance(d, Tensor) else np.asarray(d)
        if array.ndim != 2 or array.shape[1] != 3 or len(array) == 0:
            raise ValueError(
                f"drawing {i}: expected an (n >= 1, 3) array of (dx, dy, pen), got {array.shape}"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"drawing {i} has non-finite values (a diverged sample?); it cannot be rendered")
        out.append(deltas_to_strokes(array, pen_threshold))
    return out


def dataset_split(path: str | Path = KANJIVG_PATH, split: str = "test") -> list[np.ndarray]:
    """One split of a stroke-3 `.npz` (bundled paths resolve against sparse_dm/data/assets/): the
    reference side. KanjiVG runs compare with `dataset_split()`, its 500 test drawings."""
    return load_stroke3_npz(resolve_data_path(path), splits=(split,))[split]


def sketch_fidelity(
    generated: Sequence[np.ndarray | Tensor],
    reference: Sequence[np.ndarray | Tensor],
    pen_threshold: float = 0.5,
    weights_path: str | Path | None = None,
    weights_sha256: str | None = None,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
    min_samples: int = MIN_SAMPLES,
    batch_size: int = FEATURE_BATCH,
) -> dict[str, float]:
    """Fréchet and kernel sketch distances of generated drawings to reference drawings (lower is better).

    Both sides are (n, 3) offset arrays or tensors (ChiroDiff's `generate` output, stroke-3 from a file,
    the datamodule's normalised deltas: the renderer fits every drawing to the canvas, so units do not
    matter); `pen_threshold` splits strokes (the sampler's `sampling.pen_threshold`; real data has pen
    bits 0/1). Returns `fsd_<dataset>`, `ksd_<dataset>`, `ksd_<dataset>_std` (dataset = the weights'
    training set, `kanjivg` for the shipped ones) and the two sample counts.
    """
    for side, drawings in (("generated", generated), ("reference", reference)):
        if len(drawings) < min_samples:
            raise ValueError(
                f"{side} has {len(drawings)} drawings; the sketch metric needs >= min_samples={min_samples} "
                "per side (its values depend on the count, so runs are compared at one count)"
            )
    smaller = min(len(generated), len(reference))
    if kid_subset_size > smaller:
        raise ValueError(f"kid_subset_size={kid_subset_size} exceeds the smaller side ({smaller} drawings)")
    extractor = load_sketch_features(weights_path, weights_sha256)
    out = fidelity_from_features(
        extractor(offsets_to_drawings(generated, pen_threshold), batch_size),
        extractor(offsets_to_drawings(reference, pen_threshold), batch_size),
        extractor.dataset,
        kid_subsets,
        kid_subset_size,
        seed,
    )
    out[METRIC_SAMPLES] = float(len(generated))
    out[METRIC_REFERENCE] = float(len(reference))
    return out
