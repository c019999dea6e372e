"""What backend=sparse refuses, before anything is written, and why: an unknown backend, nothing sparse,
what its float32 CPU kernels cannot run, a model with masked weights no compact layer trains (the
Latent Diffusion UNet's convolutions), and no C compiler (no silent, slower fallback)."""

from __future__ import annotations

import pytest
from helpers.run_config import TINY_CHIRODIFF, compose_config

from sparse_dm.run.build import BackendUnavailable, build_run
from sparse_dm.run.checks import ConfigError, validate
from sparse_dm.train import run

SPARSE = [*TINY_CHIRODIFF, "backend=sparse", "method=rigl", "sparsity=0.9"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["backend=fast"], r"backend='fast'; allowed: one of \('dense', 'sparse'\)"),
        (["method=dense", "sparsity=0"], r"backend=sparse with method=dense"),
        (["trainer.precision=bf16-mixed"], r"trainer.precision='bf16-mixed'; allowed: one of"),
        (["trainer.accelerator=gpu"], r"trainer.accelerator='gpu'; allowed: cpu with backend=sparse"),
        (
            ["+method.timestep_bands={boundaries:[500],sparsities:[0.85,0.95]}"],
            r"backend=sparse with method.timestep_bands",
        ),
    ],
)
def test_invalid_backend_configs_are_refused_naming_the_key(tmp_path, overrides, message):
    cfg = compose_config(tmp_path, [*SPARSE, *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_a_model_of_convolutions_is_refused_naming_its_layers(tmp_path):
    cfg = compose_config(
        tmp_path,
        ["experiment=ldm_tiny", "method=magran", "sparsity=0.5", "backend=sparse", "logger.wandb=null"],
    )
    with pytest.raises(ConfigError, match=r"backend=sparse with model=ldm_tiny.*input_blocks\.0\.0\.weight"):
        build_run(cfg)
    assert not (tmp_path / "config.yaml").exists()


def test_without_a_c_compiler_backend_sparse_stops_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no kernel built yet
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(
        BackendUnavailable, match=r"backend=sparse needs the compiled training kernels.*no C compiler"
    ):
        run(compose_config(tmp_path / "run", SPARSE))
    assert not (tmp_path / "run").exists()  # refused before the run folder was written
