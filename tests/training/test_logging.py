"""Run identity for W&B and the job's loggers, offline (WANDB_MODE=disabled / offline, no network)."""

from __future__ import annotations

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import OmegaConf

from sparse_dm import CONFIG_DIR
from sparse_dm.training.loggers.wandb import (
    build_loggers,
    finish_loggers,
    flat_config,
    run_identity,
    wandb_mode,
)

LOGGER_CONFIG = CONFIG_DIR / "logger" / "default.yaml"


def make_cfg(method: str = "rigl", sparsity: float = 0.9, prune_rate: float = 0.05, seed: int = 1):
    return OmegaConf.create(
        {
            "model": {"name": "chirodiff", "net": {"hidden_size": 96}},
            "dataset": {"name": "kanjivg", "batch_size": 128},
            "method": {"name": method},
            "sparsity": sparsity,
            "prune_rate": prune_rate,
            "seed": seed,
            "trainer": {"max_steps": "${dataset.batch_size}"},
            "paths": {"output_dir": "the job's folder (build_loggers is given it)"},
            "logger": OmegaConf.load(LOGGER_CONFIG),
        }
    )


def test_identity_names_groups_tags():
    rigl = run_identity(make_cfg())
    assert rigl == {
        "name": "chirodiff-kanjivg-rigl-S0.9-p0.05-seed1",
        "group": "chirodiff-kanjivg-rigl-S0.9-p0.05",
        "tags": ["chirodiff", "kanjivg", "rigl", "S=0.9", "p=0.05"],
    }
    # seeds share a group; p does not split Static-DM, S and p do not split Dense
    assert run_identity(make_cfg(seed=2))["group"] == rigl["group"]
    assert run_identity(make_cfg("static", 0.5, 0.5))["group"] == "chirodiff-kanjivg-static-S0.5"
    assert run_identity(make_cfg("static", 0.5, 0.05))["group"] == "chirodiff-kanjivg-static-S0.5"
    assert run_identity(make_cfg("dense", 0.0))["name"] == "chirodiff-kanjivg-dense-seed1"


def test_flat_config_resolved():
    flat = flat_config(make_cfg())
    assert flat["model.net.hidden_size"] == 96 and flat["trainer.max_steps"] == 128
    assert flat["logger.wandb.entity"] is None


def test_mode_env_overrides_config(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(make_cfg()) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(make_cfg()) == "disabled"


def test_disabled_loggers_work_offline_one_run_per_job(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    runs = []
    for seed in (0, 1):  # two jobs of a sequential multirun in one process
        loggers = build_loggers(make_cfg(seed=seed), tmp_path / f"job{seed}")
        csv, wb = loggers
        assert isinstance(csv, CSVLogger) and isinstance(wb, WandbLogger)
        for logger in loggers:
            logger.log_metrics({"train/loss": 0.5}, step=1)
        runs.append(wb.experiment)
        finish_loggers(loggers)
        assert (tmp_path / f"job{seed}" / "csv" / "metrics.csv").is_file()
        assert "model.net.hidden_size" in (tmp_path / f"job{seed}" / "csv" / "hparams.yaml").read_text()
    assert runs[0] is not runs[1]


def test_wandb_can_be_switched_off(tmp_path):
    cfg = make_cfg()
    cfg.logger.wandb = None
    assert [type(x) for x in build_loggers(cfg, tmp_path)] == [CSVLogger]


def test_offline_by_default_writes_local_run(tmp_path, monkeypatch):
    """No WANDB_MODE: the config's offline mode writes the run under the job dir, no network needed."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    loggers = build_loggers(make_cfg(), tmp_path)
    loggers[1].log_metrics({"train/loss": 0.5}, step=1)
    finish_loggers(loggers)
    assert list((tmp_path / "wandb").glob("offline-run-*"))
