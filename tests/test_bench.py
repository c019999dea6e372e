"""`make bench` in quick mode: every section measured, the markdown generated from the JSON."""

from __future__ import annotations

import json

from benchmarks.suite import QUICK, run


def test_quick_bench_writes_json_and_matching_markdown(tmp_path):
    results = run(QUICK, tmp_path / "results.json", tmp_path / "benchmarks.md")
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    markdown = (tmp_path / "benchmarks.md").read_text()
    for record in results["training"]:
        assert f"| {record['model']} | {record['params']:,} |" in markdown
        assert record["mask_update_ms"] > 0 and record["dense_ms"] > 0
        assert f"{record['mask_update_ms']:.1f}" in markdown
    (sampled,) = results["sampling"]
    assert sampled["max_abs_diff"] < 1e-3 * max(1.0, sampled["max_abs_sample"])  # same samples
    assert f"{sampled['speedup']:.2f}x" in markdown
    (size,) = results["size"]
    assert size["export_bytes"] < 0.25 * size["dense_state_dict_bytes"]  # S=0.9
