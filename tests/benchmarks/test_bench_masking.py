"""benchmarks/masking.py in quick mode: both sides of every pair timed, the markdown made from the JSON."""

from __future__ import annotations

import json

from benchmarks.masking import QUICK, run


def test_quick_masking_bench_writes_json_and_matching_markdown(tmp_path):
    results = run(QUICK, tmp_path / "masking.json", tmp_path / "masking.md")
    assert json.loads((tmp_path / "masking.json").read_text()) == json.loads(json.dumps(results))
    markdown = (tmp_path / "masking.md").read_text()
    assert f"Machine: {results['machine']['cpu']} (" in markdown
    assert "not re-measured" in markdown
    for record in results["records"]:
        assert record["prunable_tensors"] > 1 and record["dense_step_ms"] > 0
        for part in ("masks", "ema"):
            cell = record[part]
            assert cell["before_ms"] > 0 and cell["after_ms"] > 0 and cell["after_over_before"] > 0
        row = f"| {record['model']} | {record['threads']} | {record['prunable_tensors']} |"
        assert row in markdown and f"{record['masks']['after_over_before']:.2f} |" in markdown
