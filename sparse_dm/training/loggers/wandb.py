"""Loggers for a training job: a CSV logger always, W&B (offline by default) when enabled.

Run names, groups and tags come from (model, dataset, method, S, p) so W&B dashboards can compare the
paper's grid directly; the group leaves out the seed so seeds aggregate. S is left out for Dense and p
for Dense and Static-DM, which do not depend on them. Every non-null node of `logger` (conf/logger/)
is built with hydra.utils.instantiate; the WANDB_MODE environment variable (online / offline /
disabled) overrides `logger.wandb.mode`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from sparse_dm.training.loggers.console_noise import silence_known_noise

P_DEPENDENT = frozenset({"rigl", "magran"})  # methods whose masks change with the prune rate p
CSV_DIR = "csv"  # <output_dir>/csv/metrics.csv (one version per run dir, no version_N nesting)


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """W&B name (unique per job), group (the configuration, without the seed) and tags."""
    method = cfg.method.name
    parts = [cfg.model.name, cfg.dataset.name, method]
    tags = [cfg.model.name, cfg.dataset.name, method]
    if method != "dense":
        parts.append(f"S{cfg.sparsity:g}")
        tags.append(f"S={cfg.sparsity:g}")
    if method in P_DEPENDENT:
        parts.append(f"p{cfg.prune_rate:g}")
        tags.append(f"p={cfg.prune_rate:g}")
    group = "-".join(parts)
    return {"name": f"{group}-seed{cfg.seed}", "group": group, "tags": tags}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b.c": leaf}, the form W&B's run table can filter and sort on."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config, flattened (hydra's own node is not part of the run config)."""
    return flatten(OmegaConf.to_container(cfg, resolve=True))


def wandb_mode(cfg: DictConfig) -> str:
    """WANDB_MODE from the environment wins over the config (tests and laptops set "disabled")."""
    return os.environ.get("WANDB_MODE") or cfg.logger.wandb.mode


def finish_wandb() -> None:
    """End the active W&B run, if any, so the next job of a multirun starts its own run (a run with
    W&B off never imported it, so there is nothing to end)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def build_loggers(cfg: DictConfig, output_dir: Path) -> list[Logger]:
    """Every logger configured under `logger` for one job (W&B with the run identity and config,
    the CSV log at <output_dir>/csv/ with the config as hparams); also installs the console-noise
    filters, since the loggers are set up before the Trainer prints."""
    loggers: list[Logger] = []
    config = flat_config(cfg)
    for node in cfg.logger.values():
        if node is None:
            continue
        kind = get_class(node._target_)
        if issubclass(kind, WandbLogger):
            finish_wandb()  # a previous job in this process (sequential multirun) must not be reused
            # `config` is also instantiate()'s own first parameter: pass it to the partial instead
            build = instantiate(
                node, _partial_=True, save_dir=str(output_dir), mode=wandb_mode(cfg), **run_identity(cfg)
            )
            logger = build(config=config)
            # Lightning always sends `anonymous=None`, which W&B reports as a deprecated setting on
            # every run; leaving the key out is what None means.
            logger._wandb_init.pop("anonymous", None)
        else:
            layout = {"name": CSV_DIR, "version": ""} if issubclass(kind, CSVLogger) else {}
            logger = instantiate(node, save_dir=str(output_dir), **layout)
            logger.log_hyperparams(config)
        loggers.append(logger)
    silence_known_noise()
    return loggers


def finish_loggers(loggers: list[Logger], status: str = "success") -> None:
    """Call at the end of a job: flush CSV and close the job's W&B run (one run per multirun job)."""
    for logger in loggers:
        logger.finalize(status)
    finish_wandb()
