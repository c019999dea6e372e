"""The offline sketch metric (fsd/ksd in a learned sketch space): pinned weights, distances, registry."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset
from torch_fidelity import calculate_metrics
from torch_fidelity.metric_fid import KEY_METRIC_FID
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD

from sparse_dm.metrics.sketch_features import (
    EMBED_DIM,
    EXTRACTOR_NAME,
    FEATURE_BATCH,
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    MIN_SAMPLES,
    SHIPPED_SHA256,
    SHIPPED_WEIGHTS,
    SketchFeatureExtractor,
    WeightsHashError,
    fidelity_from_features,
    frechet_distance,
    kernel_distance,
    load_sketch_features,
    load_weights,
    offsets_to_drawings,
    sha256_bytes,
    sketch_fidelity,
)
from sparse_dm.metrics.sketch_training import EVAL_BATCH
from sparse_dm.sketch.augment import point_noise, stroke_dropout
from sparse_dm.sketch.representation import stroke3_to_strokes

F32_EPS = float(np.finfo(np.float32).eps)
F64_EPS = float(np.finfo(np.float64).eps)
CORRUPTION_SEED = 0


@pytest.fixture(scope="module")
def kanjivg() -> dict[str, list[np.ndarray]]:
    from sparse_dm.metrics.sketch_features import dataset_split

    return {s: dataset_split(split=s) for s in ("valid", "test")}


@pytest.fixture(scope="module")
def features(kanjivg) -> dict[str, torch.Tensor]:
    """Features of the first 500 valid and the 500 test drawings, made as sketch_fidelity makes them."""
    extractor = load_sketch_features()
    sides = {"valid": kanjivg["valid"][:MIN_SAMPLES], "test": kanjivg["test"]}
    return {k: extractor(offsets_to_drawings(v, 0.5)) for k, v in sides.items()}


def tampered_copy(tmp_path, offset_fraction: float = 0.5):
    data = bytearray(SHIPPED_WEIGHTS.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0x01  # one bit of one weight (the file's middle is tensor data)
    path = tmp_path / "tampered.pt"
    path.write_bytes(bytes(data))
    return path


def test_shipped_weights_match_their_pinned_hash_and_load():
    assert sha256_bytes(SHIPPED_WEIGHTS.read_bytes()) == SHIPPED_SHA256
    extractor = load_sketch_features()
    assert extractor.dataset == "kanjivg"
    assert extractor.sha256 == SHIPPED_SHA256
    assert SHIPPED_WEIGHTS.stat().st_size < 1_000_000  # shipped in the package: small


def test_a_tampered_weights_file_is_refused_before_it_is_parsed(tmp_path):
    path = tampered_copy(tmp_path)
    with pytest.raises(WeightsHashError, match="does not match"):
        load_weights(path, SHIPPED_SHA256)
    # the same through torch-fidelity's keyword for other weights, claiming the pinned hash
    with pytest.raises(WeightsHashError):
        SketchFeatureExtractor(
            EXTRACTOR_NAME,
            ["embedding"],
            feature_extractor_weights_path=str(path),
            sketch_weights_sha256=SHIPPED_SHA256,
        )
    # and other weights are never loaded without a hash; the message gives the file's own
    with pytest.raises(ValueError, match=sha256_bytes(path.read_bytes())):
        load_sketch_features(path)


def test_identical_feature_sets_are_at_distance_zero(features):
    f = features["test"]
    d = f.shape[1]
    sigma = np.cov(f.double().numpy(), rowvar=False)
    lam_max = float(np.linalg.eigvalsh(sigma).max())
    # FID = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 sum sqrt(eig(S1 S2)). With identical sets the means
    # cancel exactly and the exact value is 0; eig(S^2) carries an absolute error up to ~d eps lam_max^2,
    # which the square root turns into at most sqrt(d eps) lam_max per eigenvalue: d of them, twice.
    tolerance = 2 * d * lam_max * math.sqrt(d * F64_EPS)
    assert abs(frechet_distance(f, f)) <= tolerance
    # KID draws its two subsets independently from the same n points. The unbiased within-set terms
    # average the off-diagonal kernel k_off, but the cross term also meets a point with itself with
    # probability 1/n, so its expectation is (2/n)(k_off - k_diag) < 0 (cubic kernel (x.y/d + 1)^3).
    # The subset draws are i.i.d., so their mean lies within 4 standard errors std/sqrt(subsets) of it.
    kernel = (f.double() @ f.double().T / d + 1) ** 3
    n = len(f)
    k_diag = float(kernel.diagonal().mean())
    k_off = float((kernel.sum() - kernel.diagonal().sum()) / (n * (n - 1)))
    ksd, ksd_std = kernel_distance(f, f, KID_SUBSETS, KID_SUBSET_SIZE, seed=0)
    assert ksd_std > 0
    assert abs(ksd - 2 / n * (k_off - k_diag)) <= 4 * ksd_std / math.sqrt(KID_SUBSETS)


@pytest.mark.parametrize(
    ("corruption", "level"),
    [(point_noise, 0.04), (stroke_dropout, 0.4)],
    ids=["point_noise", "stroke_dropout"],
)
def test_corrupted_drawings_score_worse_than_clean_ones(kanjivg, features, corruption, level):
    """500 held-out drawings vs the 500 test drawings, clean and corrupted (well above the training
    augmentations: point jitter 0.01, stroke dropout 0.1); the gap must exceed KID's subset spread."""
    rng = np.random.default_rng(CORRUPTION_SEED)
    corrupted = [corruption(stroke3_to_strokes(d), level, rng) for d in kanjivg["valid"][:MIN_SAMPLES]]
    base = fidelity_from_features(features["valid"], features["test"], "kanjivg")
    worse = fidelity_from_features(load_sketch_features()(corrupted), features["test"], "kanjivg")
    assert worse["fsd_kanjivg"] > base["fsd_kanjivg"]
    assert worse["ksd_kanjivg"] - base["ksd_kanjivg"] > base["ksd_kanjivg_std"] + worse["ksd_kanjivg_std"]


class RenderDataset(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def test_registered_with_torch_fidelity_and_equal_to_sketch_fidelity(kanjivg):
    """calculate_metrics(feature_extractor=...) through the registry gives exactly sketch_fidelity's
    numbers: same renders, same batches (FEATURE_BATCH), same torch-fidelity formulas on the same float32
    features and the same KID seed, so no tolerance is needed."""
    extractor = load_sketch_features()
    valid, test = kanjivg["valid"][:MIN_SAMPLES], kanjivg["test"]
    images = [extractor.images(offsets_to_drawings(side, 0.5)) for side in (valid, test)]
    metrics = calculate_metrics(
        input1=RenderDataset(images[0]),
        input2=RenderDataset(images[1]),
        feature_extractor=EXTRACTOR_NAME,
        fid=True,
        kid=True,
        kid_subsets=KID_SUBSETS,
        kid_subset_size=KID_SUBSET_SIZE,
        rng_seed=0,
        batch_size=FEATURE_BATCH,
        cuda=False,
        cache=False,
        save_cpu_ram=True,  # no DataLoader worker processes
        verbose=False,
    )
    ours = sketch_fidelity(valid, test)
    assert ours["sketch_metric_samples"] == ours["sketch_metric_reference"] == MIN_SAMPLES
    assert metrics[KEY_METRIC_FID] == ours["fsd_kanjivg"]
    assert metrics[KEY_METRIC_KID_MEAN] == ours["ksd_kanjivg"]
    assert metrics[KEY_METRIC_KID_STD] == ours["ksd_kanjivg_std"]


def test_inputs_it_cannot_score_are_refused(kanjivg):
    extractor = load_sketch_features()
    with pytest.raises(ValueError, match="trained on"):
        extractor.from_images(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))  # another canvas size
    bad = [d.copy() for d in kanjivg["test"]]
    bad[7][0, 0] = np.nan
    with pytest.raises(ValueError, match="drawing 7 has non-finite"):
        offsets_to_drawings(bad, 0.5)
    with pytest.raises(ValueError, match="min_samples=500"):
        sketch_fidelity(kanjivg["test"][:499], kanjivg["test"])


def test_train_command_writes_weights_that_load_with_their_hash(tmp_path):
    """A few SimCLR steps of the real command; its weights load with the sha256 it records, and the
    stored standardisation makes the training drawings' features mean 0, std 1."""
    num_train, batch = 64, 32
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "sparse_dm.train_sketch_features", f"hydra.run.dir={out}", "num_threads=1",
        f"dataset.num_train={num_train}", f"batch_size={batch}", "epochs=1", "warmup_steps=0",
        "progress=false",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path, timeout=300)
    record = json.loads((out / "sketch_features_kanjivg.pt.json").read_text())
    assert record["steps"] == num_train // batch
    assert all(math.isfinite(v) for v in record["epoch_loss"])
    extractor = load_sketch_features(record["weights"], record["sha256"])
    from sparse_dm.metrics.sketch_features import dataset_split

    train = [stroke3_to_strokes(d) for d in dataset_split(split="train")[:num_train]]
    z = extractor(train, batch_size=EVAL_BATCH).double()  # one batch, as the command computed it
    assert z.shape == (num_train, EMBED_DIM)
    # float32 rounding of the stored mean/std (a log2(n)-deep sum) and of the standardisation itself
    # float32 rounding of the stored mean/std (log2(n)-deep sums) and of the standardisation act on the
    # raw embedding e = z std + mean, so they scale with max |e| / std, not with max |z|
    encoder = extractor.encoder
    raw_scale = float((z.abs().max(0).values + (encoder.feature_mean / encoder.feature_std).abs()).max())
    rounding = (math.log2(num_train) + 3) * F32_EPS
    assert float(z.mean(0).abs().max()) <= rounding * raw_scale
    assert float((z.std(0) - 1).abs().max()) <= rounding * raw_scale**2
