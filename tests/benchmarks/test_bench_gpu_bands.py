"""benchmarks/gpu_bands.py on the CPU in quick mode: a real timestep-band training run is checked band
by band, and the markdown comes from the JSON it writes (the CUDA numbers come from a GPU session)."""

from __future__ import annotations

import json

import torch

from benchmarks.gpu_bands import QUICK, run


def test_quick_band_checks_on_cpu_read_every_band(tmp_path):
    results = run(QUICK, torch.device("cpu"), tmp_path / "bands.json", tmp_path / "bands.md")
    assert json.loads((tmp_path / "bands.json").read_text()) == json.loads(json.dumps(results))
    (check,) = results["checks"]
    assert check["returncode"] == 0, check.get("error")
    assert check["band_layers"] > 0  # the exactness below covered per-band counts, not only the union
    assert check["mask_updates"] >= 1 and check["layers_exact"] and check["values_inside_masks"]
    assert check["cpu_cuda_max_abs_diff"] == 0.0  # same device, same band routing: the same numbers
    assert "method.timestep_bands={boundaries:[500]" in (tmp_path / "bands.md").read_text()


def test_exact_counts_reads_every_band_when_a_layer_has_bands():
    from benchmarks.gpu import exact_counts

    single = {"nnz": 10, "target_nnz": 10}
    assert exact_counts(single) and not exact_counts({**single, "nnz": 9})
    banded = {"nnz": 14, "target_nnz": None, "band_nnz": [10, 6], "band_target_nnz": [10, 6]}
    assert exact_counts(banded)
    assert not exact_counts({**banded, "band_nnz": [10, 5]})  # one band off its target
