"""`make bench-train-kernels` in quick mode: every case measured, the markdown generated from the JSON."""

from __future__ import annotations

import json

from benchmarks.train_step import QUICK, run
from tests.sparse_backend.kernels import kernels_for


def test_quick_kernel_bench_writes_json_and_matching_markdown(tmp_path) -> None:
    kernels_for("compiled")  # skips, saying why, where the kernels cannot be built
    settings = {**QUICK, "batch": 8, "pairs": 1}
    results = run(settings, tmp_path / "results.json", tmp_path / "kernels.md")
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    markdown = (tmp_path / "kernels.md").read_text()
    cases = {r["case"] for r in results["cases"]}
    assert cases == {"gru", "gru_l0", "gru_l1", "gru_dense_grad", "proj", "proj_columns", "model_step"}
    for r in results["cases"]:
        assert r["dense_ms_cpu"] > 0 and r["sparse_ms_cpu"] > 0
        assert f"| {r['case']} | {r['sparsity']} | {r['threads']} | {r['dense_ms_cpu']:.1f} |" in markdown
    assert {r["kernel"] for r in results["kernels"]} == {"spmm", "spmm_transpose", "sddmm"}
    assert all(value > 0 for value in results["limits"].values()) and len(results["limits"]) == 3
    assert results["machine"]["cpu"] in markdown and results["machine"]["compiler"] in markdown
