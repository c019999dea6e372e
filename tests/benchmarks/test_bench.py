"""`make bench` in quick mode: every section measured, the markdown generated from the JSON."""

from __future__ import annotations

import json

from benchmarks import timestep_bands
from benchmarks.suite import QUICK, run


def test_quick_bench_writes_json_and_matching_markdown(tmp_path):
    settings = {**QUICK, "inference": {**QUICK["inference"], "cache_dir": str(tmp_path / "cache")}}
    results = run(settings, tmp_path / "results.json", tmp_path / "benchmarks.md")
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    markdown = (tmp_path / "benchmarks.md").read_text()
    for record in results["training"]:
        assert f"| {record['model']} | {record['params']:,} |" in markdown
        assert record["mask_update_ms"] > 0 and record["dense_ms"] > 0
        assert f"{record['mask_update_ms']:.1f}" in markdown
        assert 0 < record["bookkeeping_ms"] < record["dense_ms"]
        assert f"{record['bookkeeping_ms']:.2f} ms" in markdown
    (sampled,) = results["sampling"]  # S = 0.9: dense, auto and every fixed choice, both GRU loops
    rows = {row["name"]: row for row in sampled["rows"]}
    assert rows["dense"]["gru_loop"] == "nn.GRU" and rows["auto"]["gru_loop"] != "nn.GRU"
    assert "torch ops" in {row["gru_loop"] for row in sampled["rows"]}
    for row in sampled["rows"]:
        assert row["max_abs_diff"] < 1e-3 * max(1.0, sampled["max_abs_sample"])  # same samples
        assert f"| {row['label']} | {row['gru_loop']} | {row['wall_s']['median']:.2f} | " in markdown
    assert f"Machine: {results['machine']['cpu']} (" in markdown
    (size,) = results["size"]
    assert size["export_bytes"] < 0.25 * size["dense_state_dict_bytes"]  # S=0.9


def test_quick_band_bench_writes_json_and_matching_markdown(tmp_path):
    results = timestep_bands.run(timestep_bands.QUICK, tmp_path / "bands.json")
    assert json.loads((tmp_path / "bands.json").read_text()) == json.loads(json.dumps(results))
    markdown = timestep_bands.write_markdown(results, tmp_path / "bands.md").read_text()
    for ratio in ("train_step_ratio_banded_over_single", "ddim_ratio_banded_over_single"):
        assert results[ratio] > 0
        assert f"{results[ratio]:.3f} |" in markdown
