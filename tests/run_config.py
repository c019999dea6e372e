"""Compose the real Hydra config (as the CLI would) for in-process runs in tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# A tiny ChiroDiff on the bundled KanjiVG: seconds per run on 2 cores.
TINY_CHIRODIFF = [
    "model.net.hidden_size=16",
    "model.net.num_layers=1",
    "model.sampling.num_samples=4",
    "model.sampling.steps=3",
    "dataset.batch_size=16",
    "dataset.num_train=64",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "update_interval=2",
    "logger.wandb.enabled=false",
    "callbacks.last.every_n_train_steps=3",
]


def compose_config(output_dir: Path, overrides: list[str], config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=[f"paths.output_dir={output_dir}", *overrides])


def evaluate_config(overrides: list[str]) -> DictConfig:
    """conf/evaluate.yaml with overrides, as `python -m sparse_dm.evaluate` composes it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)
