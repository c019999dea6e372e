"""Where a run starts: fresh, resumed from a checkpoint or initialised from one; all checked before
anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from sparse_dm.files.checkpoint import read_checkpoint
from sparse_dm.run import checks as config
from sparse_dm.training.checkpointing import (
    check_resume_compatible,
    list_checkpoints,
    resolve_resume,
)
from sparse_dm.training.init_from import check_init_compatible


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
        checkpoint = read_checkpoint(resume_path, mmap=True)
        check_resume_compatible(checkpoint, resume_path, cfg)
        resume_step = int(checkpoint["global_step"])
    init = None
    if cfg.init_from is not None and resume_path is None:
        init = read_checkpoint(Path(cfg.init_from), mmap=True)
        check_init_compatible(init, Path(cfg.init_from), cfg)
    return resume_path, resume_step, init


def checkpoint_records(directory: Path) -> list[dict[str, Any]]:
    """Every checkpoint of the run with the step it holds, newest first."""
    return [{"path": str(path), "step": step} for step, path in list_checkpoints(directory)]
