"""Compose the real Hydra config (as the CLI would) for in-process runs in tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from sparse_dm import CONFIG_DIR

CONF_DIR = CONFIG_DIR

# A tiny ChiroDiff on the bundled KanjiVG: seconds per run on 2 cores (conf/debug/tiny.yaml).
TINY_CHIRODIFF = ["debug=tiny"]


def compose_config(output_dir: Path, overrides: list[str], config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=[f"paths.output_dir={output_dir}", *overrides])


def evaluate_config(overrides: list[str]) -> DictConfig:
    """conf/evaluate.yaml with overrides, as `python -m sparse_dm.evaluate` composes it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)
