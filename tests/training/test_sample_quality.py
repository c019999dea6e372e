"""Every ChiroDiff run scores its samples with the offline sketch metric (fsd_kanjivg / ksd_kanjivg,
>= 500 samples against the test split) into summary.json, and a run that could not score them is
refused before it trains."""

from __future__ import annotations

import json
import math

import pytest
from helpers.run_config import TINY_CHIRODIFF, compose_config

from sparse_dm.metrics.sketch_features import MIN_SAMPLES, dataset_split
from sparse_dm.run.checks import ConfigError, validate
from sparse_dm.train import run

SCORED = [*TINY_CHIRODIFF, f"model.sketch_metric.num_samples={MIN_SAMPLES}", "trainer.max_steps=3"]


def test_a_chirodiff_run_records_the_sketch_metric_of_its_samples(tmp_path) -> None:
    summary = run(compose_config(tmp_path, SCORED))
    metrics = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert metrics == summary["metrics"]
    assert metrics["sketch_metric_samples"] == MIN_SAMPLES
    assert metrics["sketch_metric_reference"] == len(dataset_split("kanjivg/kanji.rdp200.npz", "test"))
    # A 3-step tiny model draws noise: far from the test drawings (the train-test floor is ~1.5).
    assert math.isfinite(metrics["fsd_kanjivg"]) and metrics["fsd_kanjivg"] > 10
    assert math.isfinite(metrics["ksd_kanjivg"]) and metrics["ksd_kanjivg_std"] >= 0
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        assert "fsd_kanjivg" in f.readline().split(",")  # the loggers get it too


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.sketch_metric.num_samples=100", r"model\.sketch_metric\.num_samples=100; allowed: 0 \(off\)"),
        ("model.sketch_metric.weights=x.pt", r"weights and model\.sketch_metric\.sha256 go together"),
    ],
)
def test_sketch_metric_settings_are_validated(tmp_path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(tmp_path, [*TINY_CHIRODIFF, override]))


def test_a_test_split_too_small_for_the_metric_stops_the_run_before_anything_is_written(tmp_path) -> None:
    out = tmp_path / "run"
    # max_len=20 drops most KanjiVG drawings (mean length ~31 points), leaving fewer than 500 test ones
    with pytest.raises(ValueError, match=r"test split has \d+ drawings .* needs >= 500"):
        run(compose_config(out, [*SCORED, "dataset.max_len=20"]))
    assert not out.exists()
