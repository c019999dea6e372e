"""`python -m sparse_dm.train [overrides]`: one sparse (or dense) diffusion training run.

config -> datamodule + LightningModule -> SparseEngine masks on module.net -> callbacks, loggers,
Trainer -> fit -> summary.json (+ samples, checkpoints, CSV/W&B logs) in the run's output dir.

Resuming is always explicit (`resume=never|auto|<file.ckpt>`): a new run refuses a folder that holds
a previous one, and nothing is written before the config, the run folder and the checkpoint check out.
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
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from sparse_dm import config, preflight
from sparse_dm.band_cost import timestep_bands
from sparse_dm.cost import active_counts, compute_cost
from sparse_dm.lightning.checkpointing import (
    AtomicCheckpointIO,
    ResumeCheckpoint,
    RunFingerprint,
    TrainingPreempted,
    check_resume_compatible,
    list_checkpoints,
    read_checkpoint,
    resolve_resume,
)
from sparse_dm.lightning.csv_history import read_csv_history, restore_csv_history
from sparse_dm.lightning.diffusion_module import DiffusionModule
from sparse_dm.lightning.dst_callback import DSTCallback
from sparse_dm.lightning.fidelity_callback import FidelityCallback
from sparse_dm.lightning.init_from import check_init_compatible, init_from_checkpoint
from sparse_dm.lightning.nonfinite_guard import NonFiniteLossGuard, check_final_metric
from sparse_dm.lightning.rng_state import RNGStateCallback
from sparse_dm.lightning.wandb_logging import CSV_DIR, build_loggers, finish_loggers
from sparse_dm.sparsity.engine import EmptyLayerError, SparseEngine, check_layer_budget
from sparse_dm.summary import build_summary, sketch_stats_entry, write_summary

log = logging.getLogger(__name__)


def check_sparsity_budget(cfg: DictConfig) -> None:
    """Refuse, before data or weights exist, a sparsity that leaves a layer with no active weight
    (counts from the denoiser built on the meta device: no memory, no time)."""
    if cfg.method.name == "dense":
        return
    with torch.device("meta"):
        net = instantiate(cfg.model.net, _convert_="all")
    bands = timestep_bands(cfg)
    for key, sparsity in (
        [("sparsity", float(cfg.sparsity))]
        if bands is None
        else [(f"method.timestep_bands.sparsities[{k}]", s) for k, s in enumerate(bands.sparsities)]
    ):
        counts = active_counts(cfg, net, sparsity)
        try:
            check_layer_budget(list(counts), list(counts.values()))
        except EmptyLayerError as err:
            raise config.ConfigError(f"invalid config: {key}={sparsity}: {err}") from err


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
    engine: SparseEngine | None = None
    if cfg.method.name != "dense":  # conf/method/*: a partial of sparsity.factory.build_engine
        engine = instantiate(cfg.method, _convert_="all")(module.net)
        module.attach_engine(engine)  # a banded engine's router also becomes the denoiser call
    module.ema.remask(module.net)
    return module, datamodule, engine


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}


class RunPreempted(SystemExit):
    """Training stopped at a preemption signal after writing a resumable last.ckpt (exit status 1)."""


def refuse_implicit_resume(cfg: DictConfig) -> None:
    """With an OnExceptionCheckpoint among the callbacks, Lightning turns fit(ckpt_path=None) into
    "last" and continues whatever run the folder holds; resuming must be asked for."""
    for name, callback in cfg.callbacks.items():
        if callback is not None and str(callback.get("_target_", "")).endswith("OnExceptionCheckpoint"):
            raise config.ConfigError(
                f"invalid config: callbacks.{name} is an OnExceptionCheckpoint, with which Lightning "
                "resumes silently from the folder's last checkpoint; remove it (a crash keeps last.ckpt, "
                "a preemption signal writes it: callbacks.last) and resume with resume=auto|<file.ckpt>"
            )


def resolve_start(cfg: DictConfig, output_dir: Path) -> tuple[Path | None, int, dict[str, Any] | None]:
    """The checkpoint to resume from and the one to initialise weights from, both checked against the
    config; raises before anything is written. Ranks > 0 skip the folder check: rank 0 has already
    started writing into the same folder when they start."""
    if cfg.resume not in ("never", "auto") and cfg.init_from is not None:
        raise config.ConfigError("invalid config: resume=<path> and init_from are exclusive; set one")
    if cfg.resume == "never" and rank_zero_only.rank != 0:
        resume_path = None
    else:
        resume_path = resolve_resume(str(cfg.resume), output_dir)
    resume_step = 0
    if resume_path is not None:
        checkpoint = read_checkpoint(resume_path)
        check_resume_compatible(checkpoint, resume_path, cfg)
        resume_step = int(checkpoint["global_step"])
    init = None
    if cfg.init_from is not None and resume_path is None:
        init = read_checkpoint(Path(cfg.init_from))
        check_init_compatible(init, Path(cfg.init_from), cfg)
    return resume_path, resume_step, init


def checkpoint_records(directory: Path) -> list[dict[str, Any]]:
    """Every checkpoint of the run with the step it holds, newest first."""
    return [{"path": str(path), "step": step} for step, path in list_checkpoints(directory)]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one run and return its summary (also written to <output_dir>/summary.json)."""
    start = time.perf_counter()
    config.validate(cfg)
    refuse_implicit_resume(cfg)
    output_dir = Path(cfg.paths.output_dir)
    resume_path, resume_step, init = resolve_start(cfg, output_dir)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    module, datamodule, engine = build_run(cfg)
    datamodule.setup("fit")  # bad data fails here, naming file/split/index, before anything is written
    if init is not None:
        init_from_checkpoint(module, engine, init)
    cost = compute_cost(cfg, module)
    preflight.check_disk_space(cfg, module, output_dir)  # refuse before fit if checkpoints cannot fit
    if rank_zero_only.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    module.output_dir = output_dir
    callbacks: list[L.Callback] = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    callbacks += [RNGStateCallback(), RunFingerprint(cfg)]
    if engine is not None:
        callbacks.append(DSTCallback(engine))
    callbacks.append(NonFiniteLossGuard(int(cfg.nonfinite.max_consecutive_losses)))
    resume_checkpoint = next((c for c in callbacks if isinstance(c, ResumeCheckpoint)), None)
    if resume_checkpoint is not None and cfg.resume != "auto":
        resume_checkpoint.requeue = False  # a requeued job repeats its command: only resume=auto continues
    metrics_file = output_dir / CSV_DIR / "metrics.csv"
    history = (
        read_csv_history(metrics_file, resume_step) if resume_path and rank_zero_only.rank == 0 else None
    )
    loggers = build_loggers(cfg, output_dir)
    restore_csv_history(loggers, history)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=str(output_dir),
        plugins=[AtomicCheckpointIO()],
    )
    metrics: dict[str, float] = {}
    try:
        if cfg.validate_before_fit and resume_path is None:
            trainer.validate(module, datamodule=datamodule, verbose=False)
            metrics["val/loss_initial"] = _metrics(trainer)["val/loss"]
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path)
        except TrainingPreempted as stop:
            then = "the requeued job continues it" if stop.requeued else "continue it with resume=auto"
            raise RunPreempted(
                f"preempted ({stop.signal_name}) at step {stop.step}: {stop.path} holds that step; {then} "
                f"(same paths.output_dir={output_dir})"
            ) from stop
        if module.last_validated_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
            module.write_samples()
        metrics.update(_metrics(trainer))
        check_final_metric(metrics)  # never "succeed" with a NaN or missing final val/loss
    except BaseException:
        finish_loggers(loggers, "failed")
        raise
    summary = build_summary(
        cfg,
        cost,
        module.net,
        engine,
        metrics,
        module.sample_paths,
        checkpoint_records(output_dir / "checkpoints"),
        time.perf_counter() - start,
    )
    summary["steps_completed"] = int(trainer.global_step)  # < train_steps if trainer.max_time stopped it
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


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    summary = run(cfg)
    return summary["metrics"].get("val/loss")


if __name__ == "__main__":
    main()
