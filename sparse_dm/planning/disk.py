"""Preflight: before a long run starts, estimate the disk its checkpoints need and refuse to start
when the output folder cannot hold them.

Checkpoint size is computed from the state that will actually be saved: the module's state_dict (the
net, its masks, the EMA copy; the frozen LDM first stage is excluded by the module) plus AdamW's
state (two moments per trainable parameter and one float32 step counter per parameter tensor).
The number of files comes from the composed checkpoint callbacks (``cfg.callbacks``): every
ModelCheckpoint's save events (``every_n_train_steps`` or ``every_n_epochs``) limited by
``save_top_k`` (plus one transient file while a top-k checkpoint replaces another), ``save_last``,
and the OnExceptionCheckpoint written on a crash.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from sparse_dm.planning.run_length import steps_per_epoch, train_steps

log = logging.getLogger(__name__)

ADAM_MOMENTS = 2  # exp_avg and exp_avg_sq, each shaped like its parameter
STEP_COUNTER_BYTES = torch.tensor(0.0).element_size()  # AdamW keeps `step` as a float32 scalar tensor
MODEL_CHECKPOINT = "ModelCheckpoint"
RESUME_CHECKPOINT = "ResumeCheckpoint"
GIB = 2**30


class InsufficientDiskError(RuntimeError):
    """The run's checkpoints would not fit in the output folder's free space."""


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(params: Iterable[nn.Parameter]) -> int:
    """AdamW's saved state for these parameters (works on meta tensors: shapes and dtypes only)."""
    trainable = [p for p in params if p.requires_grad]
    return ADAM_MOMENTS * tensor_bytes(trainable) + STEP_COUNTER_BYTES * len(trainable)


def checkpoint_bytes(module: nn.Module, extra_state_bytes: int = 0) -> dict[str, int]:
    """Bytes of tensors one checkpoint holds. ``extra_state_bytes``: state not attached yet (masks
    of a model built on the meta device without its engine)."""
    state = tensor_bytes(module.state_dict().values()) + extra_state_bytes
    optimizer = optimizer_state_bytes(module.net.parameters())
    return {"module_state": state, "optimizer_state": optimizer, "total": state + optimizer}


def _target_name(cb: Mapping[str, Any]) -> str:
    return str(cb.get("_target_", "")).rsplit(".", 1)[-1]


def checkpoint_files(callbacks: Mapping[str, Any], steps: int, epoch_steps: int) -> dict[str, int]:
    """Most checkpoint files on disk at once under the configured callbacks, per callback name."""
    files = {}
    for name, cb in callbacks.items():
        if cb is None:
            continue
        kind = _target_name(cb)
        if kind == RESUME_CHECKPOINT:
            files[name] = 2  # last.ckpt and, while it is replaced atomically, its temp file
        elif kind == MODEL_CHECKPOINT:
            if cb.get("train_time_interval") is not None:
                raise ValueError(
                    f"callbacks.{name}.train_time_interval: the disk preflight cannot count time-based "
                    "saves; use every_n_train_steps or every_n_epochs"
                )
            every_steps = cb.get("every_n_train_steps")
            if every_steps:
                events = steps // int(every_steps)
            else:
                every_epochs = cb.get("every_n_epochs") or 1
                events = math.ceil(steps / epoch_steps) // int(every_epochs)
            top_k = int(cb.get("save_top_k", 1))
            kept = events if top_k == -1 else min(top_k, events) + int(events > top_k > 0)
            files[name] = kept + int(cb.get("save_last") is True)
    return files


def disk_estimate(cfg: DictConfig, module: nn.Module, extra_state_bytes: int = 0) -> dict[str, Any]:
    """Checkpoint size x the number of files the checkpoint policy keeps (at its peak)."""
    steps = train_steps(cfg)
    size = checkpoint_bytes(module, extra_state_bytes)
    files = checkpoint_files(cfg.callbacks, steps, steps_per_epoch(cfg))
    return {
        "checkpoint_bytes": size["total"],
        "checkpoint_parts": size,
        "train_steps": steps,
        "checkpoint_files": files,
        "disk_bytes_needed": size["total"] * sum(files.values()),
    }


def check_disk_space(cfg: DictConfig, module: nn.Module, output_dir: Path) -> dict[str, Any]:
    """Refuse to start when the output folder's free space cannot hold the run's checkpoints."""
    estimate = disk_estimate(cfg, module)
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())  # not created yet
    free = shutil.disk_usage(existing).free
    estimate["disk_bytes_free"] = free
    needed = estimate["disk_bytes_needed"]
    summary = (
        f"{sum(estimate['checkpoint_files'].values())} checkpoint files "
        f"({', '.join(f'{k}: {v}' for k, v in estimate['checkpoint_files'].items())}) x "
        f"{estimate['checkpoint_bytes'] / GIB:.3f} GiB each = {needed / GIB:.3f} GiB over "
        f"{estimate['train_steps']} steps"
    )
    if needed > free:
        raise InsufficientDiskError(
            f"not enough disk for this run's checkpoints in {output_dir}: {summary}, but only "
            f"{free / GIB:.3f} GiB are free. Free space, choose another paths.output_dir, or keep fewer "
            "checkpoints (callbacks.checkpoint.save_top_k)."
        )
    log.info("disk preflight: %s; %.3f GiB free in %s", summary, free / GIB, output_dir)
    return estimate
