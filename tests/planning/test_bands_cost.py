"""params_stored: what a timestep-band model holds in memory and checkpoints (the union of its band masks)."""

import math

import pytest
import torch
from helpers.run_config import compose_config
from hydra.utils import instantiate

from sparse_dm.planning.bands import expected_union
from sparse_dm.planning.cost import active_counts, compute_cost, format_table, stored_counts
from sparse_dm.run.build import build_run
from sparse_dm.sparsity.bands import BAND_MASKS_SUFFIX

BANDS = "method.timestep_bands={boundaries:[500],sparsities:[0.85,0.95]}"


@pytest.mark.parametrize(
    ("numel", "counts", "union"), [(4, [2, 2], 3), (10, [10, 1], 10), (10, [0, 0], 0), (1000, [100], 100)]
)
def test_expected_union_of_independent_masks(numel, counts, union):
    assert expected_union(numel, counts) == union


def test_one_mask_stores_what_it_activates(tmp_path):
    cost = compute_cost(compose_config(tmp_path, ["method=rigl", "sparsity=0.9"], config_name="cost"))
    assert cost["params_stored"] == cost["params_active"] and cost["params_stored_basis"] == "one mask"


def test_band_union_planned_matches_the_masks_a_run_draws(tmp_path):
    """Planned (expected union) vs drawn (measured union at initialisation) on the default ChiroDiff: two
    independent uniform subsets of sizes a, b of n positions overlap in a hypergeometric count with variance
    a b (n - a)(n - b) / (n^2 (n - 1)); the layers are independent, so 6 summed SDs bound the difference."""
    cfg = compose_config(tmp_path, ["method=rigl", "sparsity=0.9", BANDS])
    planned = compute_cost(cfg)
    assert planned["params_stored_basis"].startswith("expected")
    module, _, _ = build_run(cfg)
    drawn = stored_counts(module.net)
    variance = 0.0
    for layer in planned["layers"]:
        n, (a, b) = math.prod(layer["shape"]), layer["band_nnz"]
        variance += a * b * (n - a) * (n - b) / (n * n * (n - 1))
    assert abs(sum(drawn.values()) - planned["params_stored"]) <= 6 * math.sqrt(variance) + len(drawn)
    for name, count in drawn.items():  # the union buffer is exactly the union of the band masks
        bands = module.net.get_buffer(name + BAND_MASKS_SUFFIX)
        assert count == int(bands.any(0).sum())
    # the ~1.9x of one S = 0.9 mask that the band "win" was compared against
    single = sum(active_counts(cfg, module.net, 0.9).values())
    assert planned["params_stored"] > 1.5 * single
    measured = compute_cost(cfg, module)  # a training run passes its module: measured, not expected
    assert measured["params_stored"] == sum(drawn.values())
    assert measured["params_stored_basis"] == "measured from the masks"


def test_equal_stored_params_sparsity_stores_the_union(tmp_path):
    cfg = compose_config(tmp_path, ["method=rigl", "sparsity=0.9", BANDS], config_name="cost")
    cost = compute_cost(cfg)
    with torch.device("meta"):
        net = instantiate(cfg.model.net, _convert_="all")
    sparsity = cost["timestep_bands"]["equal_stored_params_sparsity"]
    stored = sum(active_counts(cfg, net, sparsity).values())
    assert abs(stored - cost["params_stored"]) <= len(cost["layers"])  # rounding: one weight per layer
    assert 0.8 < sparsity < 0.85
    table = format_table(cost)
    assert "params_stored" in table and "equal_stored_params_sparsity" in table
