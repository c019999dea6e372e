"""The cost report reproduces the paper's parameter and FLOPs figures (meta device, no allocation)."""

import pytest
import torch
from helpers.run_config import compose_config
from helpers.tolerance import unit_roundoff

from sparse_dm.planning.cost import compute_cost


def cost(tmp_path, *overrides):
    return compute_cost(compose_config(tmp_path, list(overrides), config_name="cost"))


@pytest.mark.parametrize(
    ("experiment", "params"),
    [("chirodiff_quickdraw", 736_027), ("chirodiff_kanjivg", 416_859), ("chirodiff_vmnist", 65_019)],
)
def test_chirodiff_presets_have_the_paper_parameter_counts(tmp_path, experiment, params):
    assert cost(tmp_path, f"experiment={experiment}")["params_total"] == params


def test_ldm_celebahq_matches_table_1(tmp_path):
    ratios = {0.1: 0.9736, 0.25: 0.9079, 0.5: 0.6751}
    for sparsity, ratio in ratios.items():
        report = cost(tmp_path, "experiment=ldm_celebahq", "method=static", f"sparsity={sparsity}")
        assert report["params_total"] == 274_056_163
        assert report["flops_forward_dense"] == pytest.approx(1.92036e11, rel=1e-5)
        assert report["flops_test_per_sample_dense"] == pytest.approx(1.92e13, rel=1e-3)
        assert report["flops_train_dense"] == pytest.approx(9.00e16, rel=1e-3)
        assert report["flops_test_ratio"] == pytest.approx(ratio, abs=1e-4)
        # the active count is round((1 - sparsity) * prunable): half a weight off at most, then 2 roundings
        prunable = report["params_prunable"]
        slack = 0.5 / prunable + 2 * unit_roundoff(torch.float64)
        assert report["params_active"] / prunable == pytest.approx(1 - sparsity, abs=slack)


@pytest.mark.parametrize(
    ("experiment", "train"), [("ldm_lsun_bedrooms", 7.64e16), ("ldm_imagenette", 6.83e16)]
)
def test_ldm_train_flops_of_the_other_datasets(tmp_path, experiment, train):
    assert cost(tmp_path, f"experiment={experiment}", "method=dense")["flops_train_dense"] == pytest.approx(
        train, rel=1e-3
    )


def test_rigl_adds_its_dense_gradient_cost(tmp_path):
    static = cost(tmp_path, "experiment=ldm_celebahq", "method=static", "sparsity=0.5")
    rigl = cost(tmp_path, "experiment=ldm_celebahq", "method=rigl", "sparsity=0.5")
    f_s, f_d, te = static["flops_forward"], static["flops_forward_dense"], 1100
    assert rigl["flops_train_ratio"] == pytest.approx((3 * f_s * te + 2 * f_s + f_d) / (te + 1) / (3 * f_d))
    assert rigl["flops_test_ratio"] == static["flops_test_ratio"]


def test_cost_cli_prints_the_table_and_writes_cost_json(tmp_path):
    """The README's `python -m sparse_dm.cost experiment=... method=... sparsity=...`, end to end."""
    import json
    import subprocess
    import sys

    overrides = ["experiment=chirodiff_kanjivg", "method=rigl", "sparsity=0.5"]
    result = subprocess.run(
        [sys.executable, "-m", "sparse_dm.cost", *overrides, f"paths.output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "cost.json").read_text())
    expected = cost(tmp_path, *overrides)
    assert written["params_total"] == expected["params_total"] == 416_859
    assert written["flops_test_per_sample"] == pytest.approx(expected["flops_test_per_sample"])
    table = dict(
        line.split(maxsplit=1)
        for line in result.stdout.splitlines()
        if line.startswith(("params_", "flops_"))
    )
    assert table["params_total"].strip() == "416,859"
    assert float(table["flops_test_ratio"]) == pytest.approx(expected["flops_test_ratio"], abs=1e-4)
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    for layer in expected["layers"]:
        assert float(rows[layer["name"]][2]) == pytest.approx(layer["density"], abs=1e-4), layer["name"]
