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

from sparse_dm.planning import disk as preflight
from sparse_dm.planning.cost import compute_cost
from sparse_dm.run import checks as config
from sparse_dm.run.build import attach_backend, build_run
from sparse_dm.run.start import RunPreempted, checkpoint_records, refuse_implicit_resume, resolve_start
from sparse_dm.run.summary import backend_entry, build_summary, sketch_stats_entry, write_summary
from sparse_dm.training.callbacks.dst import DSTCallback
from sparse_dm.training.callbacks.fidelity import FidelityCallback
from sparse_dm.training.callbacks.nonfinite_guard import NonFiniteLossGuard, check_final_metric
from sparse_dm.training.callbacks.rng_state import RNGStateCallback
from sparse_dm.training.checkpointing import (
    AtomicCheckpointIO,
    ResumeCheckpoint,
    RunFingerprint,
    TrainingPreempted,
)
from sparse_dm.training.init_from import init_from_checkpoint
from sparse_dm.training.loggers.csv_history import read_csv_history, restore_csv_history
from sparse_dm.training.loggers.wandb import CSV_DIR, build_loggers, finish_loggers

log = logging.getLogger(__name__)


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}


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
    module.prepare_sample_quality(datamodule)  # and a reference the end-of-run metric cannot use
    if init is not None:
        init_from_checkpoint(module, engine, init)
    cost = compute_cost(cfg, module)
    preflight.check_disk_space(cfg, module, output_dir)  # refuse before fit if checkpoints cannot fit
    attach_backend(cfg, module, engine)  # backend=sparse: compact layers (stops here without a compiler)
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
        if trainer.is_global_zero:
            quality = module.sample_quality()  # ChiroDiff: fsd_<space> / ksd_<space>
            for logger in trainer.loggers:
                logger.log_metrics(quality, step=trainer.global_step)
            metrics.update(quality)
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
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    summary.update(backend_entry(module, optimizer, summary["layers"]))  # backend, kernels, memory
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
