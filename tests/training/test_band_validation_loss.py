"""Validation loss per timestep band (`model.validation.band_boundaries`): the per-band losses are the
per-sample losses of the samples whose fixed t falls below / above each boundary, for any model (one-mask
controls of a band study need them too)."""

from __future__ import annotations

import pytest
import torch
from helpers.run_config import TINY_CHIRODIFF, compose_config
from helpers.toy_diffusion import make_module

from sparse_dm.run.checks import ConfigError, validate
from sparse_dm.train import run


def test_band_losses_are_the_band_samples_mean_and_pool_to_the_whole(tmp_path):
    overrides = [*TINY_CHIRODIFF, "method=rigl", "model.validation.band_boundaries=[500]"]
    summary = run(compose_config(tmp_path, overrides))
    metrics = summary["metrics"]
    for weights in ("raw", "ema"):
        low, high = metrics[f"val/loss_{weights}_band0"], metrics[f"val/loss_{weights}_band1"]
        assert low != high  # eps prediction is harder at small t: the bands differ
        assert min(low, high) <= metrics[f"val/loss_{weights}"] <= max(low, high)
    assert metrics["val/loss_band0"] == metrics["val/loss_ema_band0"]  # sampling.weights = ema


def test_per_band_means_match_a_direct_computation():
    module = make_module()
    steps = module.schedule.num_timesteps
    low, high = steps // 3, 2 * steps // 3
    module.validation_cfg["band_boundaries"] = [low, high]
    logged: dict[str, list[tuple[float, int]]] = {}

    def log(key, value, **kwargs):
        logged.setdefault(key, []).append((float(value), kwargs["batch_size"]))

    module.log = log
    batch = (torch.randn(64, 2, generator=torch.Generator().manual_seed(0)),)
    module.validation_step(batch, 0)
    data = module.prepare_batch(batch)
    t, noise = module._fixed_noise(data.x0, 0)
    with torch.no_grad():
        per_sample = module.per_sample_loss(data, t, noise)
    for band, chosen in enumerate([t < low, (t >= low) & (t < high), t >= high]):
        assert chosen.any()
        (value, size), = logged[f"val/loss_raw_band{band}"]
        assert size == int(chosen.sum())
        assert value == float(per_sample[chosen].mean())  # the same ops on the same values: bit-equal


@pytest.mark.parametrize("value", ["[0]", "[500,500]", "[700,300]", "[1000]", "[]", "[1.5]"])
def test_bad_boundaries_are_refused(tmp_path, value):
    cfg = compose_config(tmp_path, [*TINY_CHIRODIFF, f"model.validation.band_boundaries={value}"])
    with pytest.raises(ConfigError, match=r"model\.validation\.band_boundaries"):
        validate(cfg)
