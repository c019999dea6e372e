"""`python -m sparse_dm.train [overrides]`: one sparse (or dense) diffusion training run.

config -> datamodule + LightningModule -> SparseEngine masks on module.net -> callbacks, loggers,
Trainer -> fit -> summary.json (+ samples, checkpoints, CSV/W&B logs) in the run's output dir.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sparse_dm import config, preflight
from sparse_dm.cost import active_counts, compute_cost
from sparse_dm.lightning.diffusion_module import DiffusionModule
from sparse_dm.lightning.dst_callback import DSTCallback
from sparse_dm.lightning.fidelity_callback import FidelityCallback
from sparse_dm.lightning.nonfinite_guard import NonFiniteLossGuard, check_final_metric
from sparse_dm.lightning.rng_state import RNGStateCallback
from sparse_dm.lightning.wandb_logging import build_loggers, finish_loggers
from sparse_dm.sparsity.engine import EmptyLayerError, SparseEngine, check_layer_budget
from sparse_dm.summary import build_summary, sketch_stats_entry, write_summary

log = logging.getLogger(__name__)


def build_engine(cfg: DictConfig, net: torch.nn.Module) -> SparseEngine | None:
    """Masks for the configured method on `net` (None for dense)."""
    if cfg.method.name == "dense":
        return None
    return SparseEngine(
        net,
        sparsity=float(cfg.sparsity),
        distribution=cfg.method.distribution,
        prune=cfg.method.prune,
        grow=cfg.method.grow,
        prune_rate=float(cfg.prune_rate),
        update_interval=int(cfg.update_interval),
        schedule=cfg.method.schedule,
        end_step=cfg.method.end_step,
        end_fraction=cfg.method.end_fraction,
        seed=int(cfg.seed),
        include=cfg.method.include,
        exclude=list(cfg.method.exclude),
    )


def check_sparsity_budget(cfg: DictConfig) -> None:
    """Refuse, before data or weights exist, a sparsity that leaves a layer with no active weight
    (counts from the denoiser built on the meta device: no memory, no time)."""
    if cfg.method.name == "dense":
        return
    with torch.device("meta"):
        net = instantiate(cfg.model.net, _convert_="all")
    counts = active_counts(cfg, net)
    try:
        check_layer_budget(list(counts), list(counts.values()))
    except EmptyLayerError as err:
        raise config.ConfigError(f"invalid config: sparsity={cfg.sparsity}: {err}") from err


def build_run(cfg: DictConfig) -> tuple[DiffusionModule, L.LightningDataModule, SparseEngine | None]:
    """Datamodule, module and (for sparse methods) the engine with masks attached to module.net.

    Used by training and by evaluation (which then loads a checkpoint into the returned module).
    """
    config.validate(cfg)
    check_sparsity_budget(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    # Plain containers (not DictConfig) so checkpoints load with torch.load(weights_only=True).
    datamodule = instantiate(cfg.dataset, _convert_="all")
    module: DiffusionModule = instantiate(cfg.model, _convert_="all")
    engine = build_engine(cfg, module.net)
    module.ema.remask(module.net)
    return module, datamodule, engine


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one run and return its summary (also written to <output_dir>/summary.json)."""
    start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    module, datamodule, engine = build_run(cfg)
    datamodule.setup("fit")  # bad data fails here, naming file/split/index, before any checkpoint
    module.output_dir = output_dir
    cost = compute_cost(cfg, module)
    preflight.check_disk_space(cfg, module, output_dir)  # refuse before fit if checkpoints cannot fit
    callbacks: list[L.Callback] = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    callbacks.append(RNGStateCallback())
    if engine is not None:
        callbacks.append(DSTCallback(engine))
    callbacks.append(NonFiniteLossGuard(int(cfg.nonfinite.max_consecutive_losses)))
    loggers = build_loggers(cfg, output_dir)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, default_root_dir=str(output_dir)
    )
    metrics: dict[str, float] = {}
    try:
        if cfg.validate_before_fit and cfg.ckpt_path is None:
            trainer.validate(module, datamodule=datamodule, verbose=False)
            metrics["val/loss_initial"] = _metrics(trainer)["val/loss"]
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        if module.last_validated_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
            module.write_samples()
        metrics.update(_metrics(trainer))
        check_final_metric(metrics)  # never "succeed" with a NaN or missing final val/loss
    except BaseException:
        finish_loggers(loggers, "failed")
        raise
    checkpoints = sorted(str(p) for p in (output_dir / "checkpoints").glob("*.ckpt"))
    summary = build_summary(
        cfg, cost, module.net, engine, metrics, module.sample_paths, checkpoints, time.perf_counter() - start
    )
    summary.update(sketch_stats_entry(module))
    fidelity = next((c for c in callbacks if isinstance(c, FidelityCallback)), None)
    if fidelity is not None:
        summary["fid_curve"] = [dict(record) for record in fidelity.history]
    if trainer.is_global_zero:
        path = write_summary(output_dir / "summary.json", summary)
        log.info(
            "val/loss %s -> %s; summary: %s", metrics.get("val/loss_initial"), metrics.get("val/loss"), path
        )
    finish_loggers(loggers)
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    summary = run(cfg)
    return summary["metrics"].get("val/loss")


if __name__ == "__main__":
    main()
