"""FID/KID through the real torch-fidelity code path, offline, with a tiny extractor built and saved here."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_extractor
import torch
from omegaconf import OmegaConf

from sparse_dm.data.stroke3 import deltas_to_strokes
from sparse_dm.eval.fidelity import (
    INCEPTION,
    FidelityConfig,
    FidelityUnavailableError,
    compute_fidelity,
    to_uint8,
)
from sparse_dm.eval.rasterise import render_batch

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
    cfg = OmegaConf.create({k: v for k, v in evaluate_mod.EVALUATE_DEFAULTS.items() if k != "hydra"})
    cfg.ckpt_path = str(run / "checkpoints" / "last.ckpt")
    with pytest.raises(FidelityUnavailableError):
        evaluate_mod.evaluate(cfg)
    assert (run / "summary.json").read_text() == '{"method": "rigl"}'
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "summary.json"]
