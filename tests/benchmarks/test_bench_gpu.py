"""benchmarks/gpu.py runs on the CPU in quick mode (the GPU numbers come from a GPU session): its checks
read real training runs, and the markdown is generated from the JSON it writes."""

from __future__ import annotations

import json

import torch

from benchmarks.gpu import QUICK, run


def test_quick_gpu_bench_on_cpu_checks_runs_and_writes_markdown(tmp_path):
    results = run(QUICK, torch.device("cpu"), tmp_path / "gpu.json", tmp_path / "gpu.md")
    assert json.loads((tmp_path / "gpu.json").read_text()) == json.loads(json.dumps(results))
    markdown = (tmp_path / "gpu.md").read_text()
    for check in results["checks"]:
        assert check["returncode"] == 0, check.get("error")
        assert check["mask_updates"] >= 1 and check["layers_exact"] and check["values_inside_masks"]
        assert check["cpu_cuda_max_abs_diff"] == 0.0  # same device: the same numbers
    (training,) = results["training"]
    assert f"| {training['model']} | {training['params']:,} |" in markdown
    (kernel,) = results["kernels"]
    assert kernel["csr"]["0.9"]["speedup"] > 0
    assert "needs an NVIDIA GPU" in kernel["semi_structured_2_4"]["error"]
