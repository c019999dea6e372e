"""Checkpoints a run can trust: atomic writes, `last.ckpt` that holds the final (or preempted) step,
and a fingerprint of the run's config so a checkpoint never silently continues as another run.

Why not Lightning's defaults: `TorchCheckpointIO` stages the file in the system temp dir and moves it,
which is a copy (not atomic) when /tmp is another file system, as on most clusters; `ModelCheckpoint`
writes `last.ckpt` at `on_train_end` when no step checkpoint was due, and that checkpoint resumes on a
different data order; `OnExceptionCheckpoint` makes `fit(ckpt_path=None)` resume silently.

The fingerprint is the whole resolved config minus `RESUME_MAY_CHANGE` (and callbacks that only
observe), so a key added to the config is covered without anyone listing it (docs/resuming.md).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from sparse_dm.files.checkpoint import read_checkpoint

log = logging.getLogger(__name__)

LAST = "last.ckpt"
FINGERPRINT_KEY = "sparse_dm_fingerprint"
FINGERPRINT_FORMAT = 2  # {"format": 2, "config": <resolved config tree>}; format 1: {key: value} below
# What checkpoints written before format 2 stored (they still resume, checked on these keys only).
LEGACY_FINGERPRINT_KEYS = (
    "model.name",
    "model.net",
    "method.name",
    "sparsity",
    "method.distribution",
    "method.include",
    "method.exclude",
    "method.timestep_bands",
    "method.adaptive",
)
# The only config keys (with everything under them) a resume may change, and why none of them changes
# a step of training. Every other key is part of the fingerprint.
RESUME_MAY_CHANGE: dict[str, str] = {
    "trainer.max_steps": "run length (the steps already taken stay; a later end_fraction stop moves with it)",
    "trainer.max_epochs": "run length",
    "trainer.max_time": "run length (a wall-time stop)",
    "trainer.log_every_n_steps": "logging",
    "trainer.enable_progress_bar": "logging",
    "trainer.enable_model_summary": "logging",
    "logger": "logging (CSV, W&B)",
    "num_threads": "CPU threads (a job may be requeued on a node with other cores)",
    "paths": "output paths",
    "resume": "resuming itself",
    "init_from": "read only when a run starts at step 0",
    "validate_before_fit": "read only when a run starts at step 0",
    "cost": "the summary's FLOP accounting",
    "model.sketch_metric": "scores samples after training (its own seed; training never reads it)",
    "nonfinite.max_consecutive_losses": "when NaN/inf losses in a row stop the run (each is skipped anyway)",
    "dataset.latent_cache_dir": "where encoded latents are cached (keyed by content)",
    "backend": "kernels only: backend=sparse trains what backend=dense trains (same masks, weights to float "
    "rounding) and both read and write the same checkpoint format",
}
# Callbacks that only observe (write checkpoints or score samples under a preserved RNG): a resume may
# add, drop or reconfigure them (checkpoint cadence included).
OBSERVING_CALLBACKS = (
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "sparse_dm.training.checkpointing.ResumeCheckpoint",
    "sparse_dm.training.callbacks.fidelity.FidelityCallback",
)
NOT_SET = "(not set)"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `<name>.tmp-<pid>` next to the target, fsyncs it, then renames it over the target, so a
    kill at any moment leaves either the previous complete file or the new complete one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """Always tensors and plain containers only: resuming never unpickles arbitrary objects."""
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)


def may_change_on_resume(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUME_MAY_CHANGE)


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the keys a resume may change and without observing callbacks."""
    tree = plain(cfg)
    callbacks = tree.get("callbacks") or {}
    tree["callbacks"] = {
        name: callback
        for name, callback in callbacks.items()
        if callback is not None and callback.get("_target_") not in OBSERVING_CALLBACKS
    }
    return _without(tree, "")


def _without(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    kept = {}
    for name, value in tree.items():
        key = prefix + str(name)
        if may_change_on_resume(key):
            continue
        kept[name] = _without(value, key + ".") if isinstance(value, dict) else value
    return kept


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """What a checkpoint stores of its run's config: every key that can change the trajectory."""
    return {"format": FINGERPRINT_FORMAT, "config": run_config(cfg)}


def _select(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return NOT_SET
        tree = tree[part]
    return tree


def _tree_differences(stored: Any, wanted: Any, key: str) -> list[str]:
    """'key: checkpoint X, config Y' for every leaf (or sub-tree, where only one side has one) that
    differs; keys in sorted order."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        found = []
        for name in sorted(set(stored) | set(wanted), key=str):
            sub = f"{key}.{name}" if key else str(name)
            found += _tree_differences(stored.get(name, NOT_SET), wanted.get(name, NOT_SET), sub)
        return found
    if stored == wanted:
        return []
    return [f"{key}: checkpoint {_show(stored)}, config {_show(wanted)}"]


def _show(value: Any) -> str:
    return value if value is NOT_SET else repr(value)


def is_legacy_fingerprint(stored: dict[str, Any]) -> bool:
    """Format 1 (a few keys, before the whole-config fingerprint); anything else unknown is refused
    rather than read as either."""
    if stored.get("format") == FINGERPRINT_FORMAT:
        return False
    if set(stored) <= set(LEGACY_FINGERPRINT_KEYS):
        return True
    raise ValueError(
        f"{FINGERPRINT_KEY} of an unknown format (keys {sorted(stored)}): written by a newer sparse_dm? "
        "Resume it with the version that wrote it"
    )


def config_differences(
    stored: dict[str, Any], cfg: DictConfig, keys: Sequence[str] | None = None
) -> list[str]:
    """'key: checkpoint X, config Y' for every differing key under `keys` (None: all the fingerprint
    covers). A checkpoint of format 1 is compared on the keys it stored."""
    if is_legacy_fingerprint(stored):
        checked = [k for k in keys if k in stored] if keys is not None else list(stored)
        return [d for k in checked for d in _tree_differences(stored[k], _select(plain(cfg), k), k)]
    tree, wanted = stored["config"], run_config(cfg)
    if keys is None:
        return _tree_differences(tree, wanted, "")
    return [d for k in keys for d in _tree_differences(_select(tree, k), _select(wanted, k), k)]


def plain(value: Any) -> Any:
    """DictConfig/ListConfig as dicts and lists: storable with weights_only=True, comparable with ==."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


class RunFingerprint(L.Callback):
    """Stores `fingerprint(cfg)` in every checkpoint (checked by `check_resume_compatible`)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.values = fingerprint(cfg)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[FINGERPRINT_KEY] = self.values


class ResumeMismatch(ValueError):
    """The checkpoint was written by a run with another config: resuming would train a different run."""


def is_sparse_checkpoint(checkpoint: dict[str, Any]) -> bool:
    return any(key.endswith("_mask") for key in checkpoint.get("state_dict", {}))


def check_resume_compatible(checkpoint: dict[str, Any], path: Path, cfg: DictConfig) -> None:
    """Refuse a checkpoint written by a run with another config (any key outside RESUME_MAY_CHANGE),
    naming every differing key with both values; called before anything is written."""
    sparse_run = cfg.method.name != "dense"
    if sparse_run and not is_sparse_checkpoint(checkpoint):
        raise ValueError(
            f"{path} is a dense checkpoint (no masks) but this run is method={cfg.method.name} "
            f"sparsity={cfg.sparsity}. To start a sparse run from its weights, pass init_from={path} "
            "(weights pruned to the configured masks; optimizer and step start fresh) instead of resume."
        )
    stored = checkpoint.get(FINGERPRINT_KEY)
    if stored is None:
        raise ValueError(
            f"{path} has no {FINGERPRINT_KEY} (not written by sparse_dm.train), so its config cannot be "
            "checked; resume only from checkpoints of sparse_dm runs"
        )
    if is_legacy_fingerprint(stored):
        log.warning(
            "%s was written before the whole-config fingerprint: only %s can be checked; resume it with "
            "the run's own seed, method, optimizer and data (its config.yaml)",
            path,
            ", ".join(stored),
        )
    differences = config_differences(stored, cfg)
    if differences:
        raise ResumeMismatch(
            f"refusing to resume from {path}: it was written by a run with another config "
            f"({len(differences)} key(s) differ; each changes what training does):\n  "
            + "\n  ".join(differences)
            + "\nTo continue that run, resume with its own values (config.yaml in its run folder). To "
            "train with these values, start a new run: resume=never in a new folder (paths.output_dir="
            "... or hydra.run.dir=...), with init_from=<checkpoint> to start from its weights. Keys a "
            "resume may change: " + ", ".join(RESUME_MAY_CHANGE) + " and observing callbacks "
            "(docs/resuming.md)."
        )


def checkpoint_step(path: Path) -> int:
    return int(read_checkpoint(path, mmap=True)["global_step"])


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (temporary files of interrupted writes are skipped) with their steps,
    newest first; at equal steps last.ckpt first (it is the one written at a step boundary)."""
    found = []
    for path in directory.glob("*.ckpt") if directory.is_dir() else []:
        try:
            found.append((checkpoint_step(path), path))
        except ValueError as err:
            log.warning("skipping unreadable checkpoint: %s", err)
    return sorted(found, key=lambda item: (-item[0], item[1].name != LAST, -item[1].stat().st_mtime))


# Written by Hydra or Lightning's DDP launcher before the job starts: not a sign of a previous run.
LAUNCHER_ENTRIES = (".hydra", ".pl_hydra")


def previous_run_entries(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return sorted(
        p
        for p in output_dir.iterdir()
        if not p.name.startswith(LAUNCHER_ENTRIES) and not (p.is_file() and p.suffix == ".log")
    )


def describe_run_folder(output_dir: Path, entries: Sequence[Path]) -> str:
    parts = []
    for entry in entries:
        if entry.name == "checkpoints" and entry.is_dir():
            ckpts = ", ".join(f"{p.name} (step {step})" for step, p in list_checkpoints(entry))
            parts.append(f"checkpoints/: {ckpts or 'no complete checkpoint'}")
        elif entry.is_dir():
            parts.append(f"{entry.name}/ ({sum(1 for _ in entry.rglob('*'))} entries)")
        else:
            parts.append(entry.name)
    return "; ".join(parts)


class RunFolderNotEmpty(FileExistsError):
    """A new run (resume=never) pointed at a folder that holds a previous run."""


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """`never`: the run folder must hold no previous run; `auto`: its newest complete checkpoint (None
    when it has none yet, e.g. the first attempt of a requeued job); else an explicit checkpoint path."""
    checkpoint_dir = output_dir / "checkpoints"
    if resume == "never":
        entries = previous_run_entries(output_dir)
        if entries:
            raise RunFolderNotEmpty(
                f"run folder {output_dir} already holds a run: {describe_run_folder(output_dir, entries)}.\n"
                "Continue it with resume=auto (newest checkpoint) or resume=<file.ckpt>, or choose another "
                "folder (paths.output_dir=... or hydra.run.dir=...)."
            )
        return None
    if resume == "auto":
        found = list_checkpoints(checkpoint_dir)
        if not found:
            log.info("resume=auto: no checkpoint in %s, starting at step 0", checkpoint_dir)
            return None
        step, path = found[0]
        log.info("resume=auto: continuing from %s (step %d)", path, step)
        return path
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(
            f"resume={resume}: no such checkpoint file; allowed: never, auto or a .ckpt path"
        )
    return path


class ResumeCheckpoint(Checkpoint):
    """Keeps `last.ckpt` resumable: written every `every_n_train_steps`, at the final step, and at the
    first step boundary after a preemption signal (SIGTERM at preemption or cancellation; SIGUSR1 or
    submitit's SIGUSR2 before the wall time); then, under SLURM, the job is requeued and training
    stops before the next step.

    It is a `Checkpoint`, so Lightning runs it after every other callback (the mask update included):
    the saved state is the state the next step starts from.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int | None = None,
        signals: Sequence[str] = ("SIGTERM", "SIGUSR1", "SIGUSR2"),
        requeue: bool = True,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self.signals = [signal.Signals[name] for name in signals]
        self.requeue = requeue
        self.received: signal.Signals | None = None
        self._last_step: int | None = None
        self._stop: TrainingPreempted | None = None
        self._previous_handlers: dict[signal.Signals, Any] = {}

    @property
    def state_key(self) -> str:
        return "ResumeCheckpoint"

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)  # acted on at the next step boundary, never mid-step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        # Installed after Lightning's own handlers (registered before the loop starts), replacing them.
        for signum in self.signals:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # an accumulation micro-batch: no step boundary, nothing to save
            return
        self._last_step = step
        preempt = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        periodic = bool(self.every_n_train_steps) and step % int(self.every_n_train_steps) == 0
        if preempt or periodic or is_final_step(trainer):
            refuse_non_finite(pl_module, step, self.path)
            trainer.save_checkpoint(self.path, weights_only=False)  # resumable: optimizer, loops, callbacks
        if preempt:
            requeued = self.requeue and SLURMEnvironment.detect()
            if requeued and trainer.is_global_zero:
                requeue_slurm_job()
            signal_name = self.received.name if self.received else "signal"
            self._stop = TrainingPreempted(signal_name, step, self.path, requeued)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Stop before the next step rather than right after saving: Lightning logs the saved step's
        # metrics (and runs its validation, if due) in between, as an uninterrupted run does. An
        # exception, not `should_stop`: Lightning validates once more before a requested stop. Raised on
        # every rank at the same step, since the decision was all-reduced.
        if self._stop is not None:
            raise self._stop


class TrainingPreempted(RuntimeError):
    """Training stopped at a step boundary after a preemption signal, with last.ckpt written."""

    def __init__(self, signal_name: str, step: int, path: Path, requeued: bool) -> None:
        self.signal_name, self.step, self.path, self.requeued = signal_name, step, path, requeued
        super().__init__(
            f"{signal_name} at step {step}: saved {path}" + (" and requeued" if requeued else "")
        )


class NonFiniteStateError(RuntimeError):
    """The model holds NaN/inf; saving it would replace the last good resume point."""


def refuse_non_finite(module: L.LightningModule, step: int, path: Path) -> None:
    """Stop before a NaN/inf state overwrites last.ckpt, naming the tensors."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteStateError(
            f"non-finite values at step {step} in {len(bad)} tensor(s) ({', '.join(bad[:5])}); "
            f"{path} was not overwritten and still holds the last finite state"
        )


def is_final_step(trainer: L.Trainer) -> bool:
    """True in on_train_batch_end of the step that ends fit (max_steps, or the last batch of max_epochs)."""
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
    return bool(last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def requeue_slurm_job() -> None:
    """`scontrol requeue` this job (array jobs: this task), as Lightning's SLURM auto-requeue does."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    result = subprocess.run(["scontrol", "requeue", job], check=False, capture_output=True, text=True)
    if result.returncode == 0:
        log.warning("requeued SLURM job %s; it will continue with resume=auto", job)
    else:
        log.error("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
