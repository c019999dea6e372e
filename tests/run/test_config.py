"""Invalid config values are rejected before anything is built, naming the key and the range."""

import pytest
from helpers.run_config import CONF_DIR, TINY_CHIRODIFF, compose_config
from hydra.utils import instantiate
from torch import nn

from sparse_dm.run import checks as config
from sparse_dm.sparsity import MaskedEMA, SparseEngine
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


PRESETS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", PRESETS)
def test_every_preset_composes_and_validates(tmp_path, experiment):
    for method in ("dense", "static", "rigl", "magran"):
        sparsity = "0.0" if method == "dense" else "0.5"
        cfg = compose_config(
            tmp_path, [f"experiment={experiment}", f"method={method}", f"sparsity={sparsity}"]
        )
        config.validate(cfg)
        if method != "dense":  # the method partial resolves against the preset's S, p, Te
            build = instantiate(cfg.method, _convert_="all")
            assert (build.keywords["update_interval"], build.keywords["sparsity"]) == (
                cfg.update_interval,
                0.5,
            )


@pytest.mark.parametrize(
    ("override", "build"),
    [
        ("prune_rate=0", lambda: SparseEngine(nn.Linear(4, 4), 0.5, grow="random", prune_rate=0)),
        ("update_interval=0", lambda: SparseEngine(nn.Linear(4, 4), 0.5, update_interval=0)),
        ("method.distribution=gaussian", lambda: SparseEngine(nn.Linear(4, 4), 0.5, distribution="gaussian")),
        ("model.ema.decay=1.0", lambda: MaskedEMA(nn.Linear(4, 4), decay=1.0)),
    ],
)
def test_config_validation_and_the_constructor_share_one_rule(tmp_path, override, build):
    """The value's rule lives in the object that uses it; config validation runs that same rule early."""
    with pytest.raises(config.ConfigError) as from_config:
        config.validate(compose_config(tmp_path, [override]))
    with pytest.raises(ValueError) as from_constructor:
        build()
    assert str(from_config.value) == f"invalid config: {from_constructor.value}"
