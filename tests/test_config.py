"""Invalid config values are rejected before anything is built, naming the key and the range."""

import pytest
from run_config import TINY_CHIRODIFF, compose_config

from sparse_dm import config
from sparse_dm.train import run


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sparsity=1.0", r"sparsity=1\.0; allowed: a number in \[0, 1\)"),
        ("sparsity=-0.1", "sparsity=-0.1"),
        ("prune_rate=0", r"prune_rate=0; allowed: a number in \(0, 1\]"),
        ("update_interval=0", "update_interval=0; allowed: an integer >= 1"),
        ("seed=-1", "seed=-1"),
        ("method.distribution=gaussian", "method.distribution='gaussian'"),
        ("method.grow=snip", "method.grow='snip'"),
        ("model.sampling.steps=5000", r"model\.sampling\.steps=5000; allowed: an integer in \[1, 1000\]"),
        ("dataset.batch_size=0", "dataset.batch_size=0"),
        ("model.optimizer.lr=-1", r"model\.optimizer\.lr=-1"),
        ("sparsity=0.0", "sparsity=0 with method=rigl"),
    ],
)
def test_invalid_values_name_the_key_and_range(tmp_path, override, message):
    cfg = compose_config(tmp_path, [override])
    with pytest.raises(config.ConfigError, match=message):
        config.validate(cfg)


def test_dense_rejects_a_sparsity_and_forces_zero_by_default(tmp_path):
    assert compose_config(tmp_path, ["method=dense"]).sparsity == 0.0
    with pytest.raises(config.ConfigError, match="with method=dense"):
        config.validate(compose_config(tmp_path, ["method=dense", "sparsity=0.5"]))


def test_bad_values_fail_before_training_starts(tmp_path):
    with pytest.raises(config.ConfigError):
        run(compose_config(tmp_path, [*TINY_CHIRODIFF, "prune_rate=2"]))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("experiment", ["chirodiff_kanjivg", "ldm_celebahq", "ldm_tiny", "ldm_imagenet_cond"])
def test_every_preset_composes_and_validates(tmp_path, experiment):
    for method in ("dense", "static", "rigl", "magran"):
        sparsity = "0.0" if method == "dense" else "0.5"
        config.validate(
            compose_config(tmp_path, [f"experiment={experiment}", f"method={method}", f"sparsity={sparsity}"])
        )
