"""Calibration: the crossover rule, the cache (measured once per machine key), config checks."""

from __future__ import annotations

import pytest
from helpers.compiled_loop import compiled_loop_available

from sparse_dm.inference import calibrate
from sparse_dm.inference.calibrate import CalibrationProtocol, Thresholds, crossover, resolve_thresholds
from sparse_dm.inference.config import default_inference_config

TINY = {
    "densities": [0.1, 0.5],
    "repeats": 1,
    "runs_per_sample": 1,
    "linear_shape": [16, 16, 8],
    "gru_shape": [4, 4, 5, 3],
    "seed": 0,
}


def test_crossover_stops_at_the_first_loss():
    assert crossover({0.05: 3.0, 0.1: 2.0, 0.2: 0.9, 0.3: 1.1}) == 0.1
    assert crossover({0.05: 0.8, 0.1: 2.0}) == 0.0


def test_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    cfg = {
        **default_inference_config(),
        "threshold_linear": "auto",
        "cache_dir": str(tmp_path),
        "calibration": TINY,
        "gru_loop": "torch",
    }
    first = resolve_thresholds(cfg)
    assert (tmp_path / calibrate.CACHE_FILE).is_file()
    monkeypatch.setattr(
        calibrate, "measure_thresholds", lambda *_: pytest.fail("re-measured despite the cache")
    )
    assert resolve_thresholds(cfg) == first
    other_protocol = {**cfg, "calibration": {**TINY, "seed": 1}}
    with pytest.raises(pytest.fail.Exception):
        resolve_thresholds(other_protocol)  # a different protocol is a different cache key
    if compiled_loop_available():
        with pytest.raises(pytest.fail.Exception):
            resolve_thresholds({**cfg, "gru_loop": "compiled"})  # so is the other GRU loop


def test_fixed_thresholds_skip_calibration_and_are_checked(monkeypatch):
    monkeypatch.setattr(calibrate, "measure_thresholds", lambda *_: pytest.fail("calibrated"))
    cfg = {**default_inference_config(), "threshold_linear": 0.2, "threshold_gru": 0.1}
    assert resolve_thresholds(cfg) == Thresholds(0.2, 0.1)
    with pytest.raises(ValueError, match=r"inference.threshold_gru"):
        resolve_thresholds({**cfg, "threshold_gru": 1.5})
    with pytest.raises(ValueError, match=r"inference.calibration.densities"):
        CalibrationProtocol.from_mapping({**TINY, "densities": [0.0]})
