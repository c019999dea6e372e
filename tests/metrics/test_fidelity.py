"""FID/KID through the real torch-fidelity code path, offline, with a tiny extractor built and saved here."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import helpers.tiny_extractor as tiny_extractor
import numpy as np
import pytest
import torch
from helpers.run_config import evaluate_config
from helpers.tolerance import Reductions, assert_close_computed, float_bound, reductions
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

from sparse_dm.metrics.fidelity import (
    INCEPTION,
    FeatureStats,
    FidelityConfig,
    FidelityUnavailableError,
    compute_fidelity,
    reference_stats,
    to_uint8,
)
from sparse_dm.sketch.rasterise import render_batch
from sparse_dm.sketch.representation import deltas_to_strokes

NUM_SAMPLES = 24
IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> FidelityConfig:
    path = tiny_extractor.install(tmp_path_factory.mktemp("extractor"))
    return FidelityConfig(feature_extractor=tiny_extractor.NAME, weights_path=str(path), cuda=False)


def random_images(seed: int, brightness: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(NUM_SAMPLES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
    return to_uint8((x + brightness).clamp(-1, 1))


def test_image_path_small_sample_kid_subset_adapts(tiny_cfg):
    """LDM path: decoded [-1, 1] images -> uint8; 24 samples < default KID subset size 1000."""
    ref = random_images(0)
    same = compute_fidelity(random_images(1), ref, tiny_cfg)
    shifted = compute_fidelity(random_images(2, brightness=0.8), ref, tiny_cfg)
    assert set(same) == {"fid", "kid_mean", "kid_std"}
    assert all(torch.isfinite(torch.tensor(v)) for v in [*same.values(), *shifted.values()])
    assert shifted["fid"] > same["fid"]
    assert shifted["kid_mean"] > same["kid_mean"]


def test_sketch_path_through_rasteriser(tiny_cfg):
    """ChiroDiff path: delta sequences -> strokes -> the project's renderer -> uint8 images -> FID/KID."""
    g = torch.Generator().manual_seed(0)
    points, pen_threshold = 12, 0.8

    def sketches(scale: float) -> list:
        out = []
        for _ in range(NUM_SAMPLES):
            deltas = torch.randn(points, 3, generator=g) * scale
            deltas[:, 2] = 0.0
            deltas[points // 2, 2] = 1.0  # two strokes per drawing
            out.append(deltas_to_strokes(deltas, pen_threshold))
        return out

    ref = render_batch(sketches(1.0))
    assert ref.dtype == torch.uint8 and ref.shape[:2] == (NUM_SAMPLES, 3)
    near = compute_fidelity(render_batch(sketches(1.0)), ref, tiny_cfg)
    blank = compute_fidelity(render_batch([[]] * NUM_SAMPLES), ref, tiny_cfg)
    assert set(near) == {"fid", "kid_mean", "kid_std"}
    assert 0.0 <= near["fid"] < blank["fid"]


def test_missing_weights_fail_clearly_and_write_nothing(tmp_path, monkeypatch):
    """No Inception weights in the (empty) cache and none configured: clear error, nothing written."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.chdir(tmp_path)
    images = random_images(0)
    with pytest.raises(FidelityUnavailableError, match="weights_path"):
        compute_fidelity(images, images, FidelityConfig(feature_extractor=INCEPTION, cuda=False))
    with pytest.raises(FidelityUnavailableError, match="not found"):
        compute_fidelity(images, images, FidelityConfig(weights_path=str(tmp_path / "nope.pth"), cuda=False))
    assert list(Path(tmp_path).iterdir()) == []


def test_config_rejects_unknown_keys():
    with pytest.raises(KeyError, match="kid_subset"):
        FidelityConfig.from_mapping({"kid_subset": 10})


def test_evaluate_without_weights_fails_before_sampling(tmp_path, monkeypatch):
    """sparse_dm.evaluate checks the weights first: no model is built, no sample or result is written."""
    evaluate_mod = pytest.importorskip("sparse_dm.evaluate")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "summary.json").write_text('{"method": "rigl"}')
    cfg = evaluate_config([f"ckpt_path='{run / 'checkpoints' / 'last.ckpt'}'"])
    with pytest.raises(FidelityUnavailableError):
        evaluate_mod.evaluate(cfg)
    assert (run / "summary.json").read_text() == '{"method": "rigl"}'
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "summary.json"]


def extractor_features(images: torch.Tensor, cfg: FidelityConfig) -> tuple[torch.Tensor, Reductions]:
    """The tiny extractor's features of `images` (as torch-fidelity feeds it) and its reductions."""
    net = tiny_extractor.tiny_net()
    net.load_state_dict(torch.load(cfg.weights_path, weights_only=True))
    return reductions(net, images.float() / 255.0)


def first_order_sensitivity(metric, features: list[torch.Tensor], step: float = 1e-6) -> float:
    """sum |d metric / d feature| over every feature (central differences, float64): how far the
    metric moves per unit of error on every feature at once."""
    total = 0.0
    for which, f in enumerate(features):
        for index in np.ndindex(*f.shape):
            moved = [g.clone() for g in features]
            moved[which][index] += step
            up = metric(*moved)
            moved[which][index] -= 2 * step
            total += abs(up - metric(*moved)) / (2 * step)
    return total


def test_streamed_statistics_equal_torch_fidelity_on_all_images(tiny_cfg):
    """Our streaming FID/KID equals torch-fidelity's own calculate_metrics on the same images."""
    import torch_fidelity

    from sparse_dm.metrics.fidelity import RGB_CHANNELS

    class Images(torch.utils.data.Dataset):
        def __init__(self, images):
            self.images = images

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.images[i]

    gen, ref = random_images(1), random_images(2, brightness=0.3)
    assert gen.shape[1] == RGB_CHANNELS
    ours = compute_fidelity(gen, ref, replace(tiny_cfg, kid_subsets=7, batch_size=5))
    theirs = torch_fidelity.calculate_metrics(
        input1=Images(gen),
        input2=Images(ref),
        fid=True,
        kid=True,
        feature_extractor=tiny_extractor.NAME,
        feature_extractor_weights_path=tiny_cfg.weights_path,
        kid_subset_size=NUM_SAMPLES,
        kid_subsets=7,
        cuda=False,
        save_cpu_ram=True,
        verbose=False,
    )
    # The features differ by the extractor's rounding (batches of 5 here, of 24 there); FID and KID
    # move by their first-order sensitivity times that. KID is summed in float32 over subsets that
    # are permutations of all 24 samples (other seeds: other orders): row and total sums of its
    # kernel matrices (2 * 24 terms), after the d-term dot products and (x.y / d + 1)^3.
    (gen_f, gen_chain), (ref_f, ref_chain) = (extractor_features(x, tiny_cfg) for x in (gen, ref))
    feature_error = max(float_bound(c.longest, c.scale) for c in (gen_chain, ref_chain))

    def fid(f1, f2):
        stats = [{"mu": f.mean(0).numpy(), "sigma": np.cov(f.numpy(), rowvar=False)} for f in (f1, f2)]
        return float(fid_statistics_to_metric(*stats, False)[KEY_METRIC_FID])

    def kid(f1, f2):
        args = {"kid_subsets": 1, "kid_subset_size": NUM_SAMPLES, "rng_seed": 0, "verbose": False}
        return float(kid_features_to_metric(f1, f2, **args)[KEY_METRIC_KID_MEAN])

    exact = [gen_f.double(), ref_f.double()]
    fid_bound = first_order_sensitivity(fid, exact) * feature_error + float_bound(
        NUM_SAMPLES, fid(*exact), torch.float64
    )  # + the statistics' float64 sums over 24 rows
    assert abs(ours["fid"] - theirs["frechet_inception_distance"]) <= fid_bound
    d = gen_f.shape[1]
    kernels = [((a @ b.T) / d + 1) ** 3 for a, b in ((exact[0], exact[0]), (exact[1], exact[1]), exact)]
    kid_terms = float(kernels[0].abs().mean() + kernels[1].abs().mean() + 2 * kernels[2].abs().mean())
    kid_bound = first_order_sensitivity(kid, exact) * feature_error + float_bound(
        2 * NUM_SAMPLES + d + 4, kid_terms
    )
    assert abs(ours["kid_mean"] - theirs["kernel_inception_distance_mean"]) <= kid_bound


def test_feature_memory_is_bounded_by_the_pool():
    stats = FeatureStats(dim=3, pool_size=8, seed=0)
    rows = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    for chunk in rows.split(7):
        stats.add(chunk)
    assert stats.count == 500 and stats.pool.shape == (8, 3)
    assert any(bool((rows[400:] == row).all(1).any()) for row in stats.pool)  # late rows reach the pool
    fid = stats.fid_statistics()
    # streamed float64 sums vs numpy's (pairwise): the mean sums 500 |x| / 500; the covariance
    # (sum x x^T - n mu mu^T) / (n - 1) sums 500 products and cancels n mu mu^T against them
    x = rows.double()
    mean_terms = float(x.abs().mean(0).max())
    assert_close_computed(
        torch.from_numpy(fid["mu"]), x.mean(0), reduction_length=len(x) + 1, scale=mean_terms, why="sums"
    )
    cov_terms = (x.abs().T @ x.abs() + len(x) * x.mean(0).abs()[:, None] * x.mean(0).abs()) / (len(x) - 1)
    assert_close_computed(
        torch.from_numpy(fid["sigma"]), torch.from_numpy(np.cov(x.numpy(), rowvar=False)),
        reduction_length=len(x) + 3, scale=float(cov_terms.max()), why="covariance sums",
    )  # fmt: skip


def test_reference_statistics_are_computed_once_per_identity(tiny_cfg, tmp_path):
    cfg = replace(tiny_cfg, cache_dir=str(tmp_path / "cache"))
    calls = []

    def batches():
        calls.append(1)
        yield random_images(0)

    first = reference_stats("celebahq|train|16x16|n=24|abc", batches, cfg)
    again = reference_stats("celebahq|train|16x16|n=24|abc", batches, cfg)
    assert len(calls) == 1 and again.count == first.count == NUM_SAMPLES
    torch.testing.assert_close(again.outer, first.outer, rtol=0, atol=0)  # read back from the cache
    reference_stats("celebahq|train|32x32|n=24|abc", batches, cfg)  # another resolution: its own stats
    reference_stats("celebahq|train|16x16|n=24|abc", batches, replace(cfg, kid_pool_size=5))
    assert len(calls) == 3
    assert len(list((tmp_path / "cache").glob("celebahq-*.pt"))) == 3


def test_samples_are_generated_lazily_batch_by_batch():
    from helpers.toy_diffusion import MODULE_KWARGS, ToyModule, ToyNet

    from sparse_dm.metrics.images_for_fid import ImageFidSource, generated_batches

    class Images(ImageFidSource, ToyModule):
        calls = 0

        def generate(self, num_samples, generator, **kwargs):
            Images.calls += 1
            return torch.rand(num_samples, 1, 4, 4, generator=generator) * 2 - 1

    stream = generated_batches(Images(net=ToyNet(), **MODULE_KWARGS), 10, 4, torch.Generator(), steps=2)
    first = next(stream)
    assert first.shape == (4, 3, 4, 4) and first.dtype == torch.uint8 and Images.calls == 1
    assert [len(b) for b in stream] == [4, 2] and Images.calls == 3
