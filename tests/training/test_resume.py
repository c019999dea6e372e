"""Exact resume of the real pipeline: N steps + resume + the rest == the uninterrupted run.

Compared at the final step: weights, masks, EMA, optimizer moments, DST counters and exploration
history, RNG states, data-loader position and loop counters (everything in last.ckpt except paths),
plus every logged metric. Covers a crash, continuing a finished run to a larger max_steps, a
resume between a mask update and the next validation, and the preemption checkpoint.
"""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers.run_config import TINY_CHIRODIFF, compose_config

from sparse_dm.run.start import RunPreempted
from sparse_dm.train import run
from sparse_dm.training.modules.chirodiff import ChiroDiffModule
from sparse_dm.training.modules.ldm import LatentDiffusionModule

STEPS = 12
# Mask updates at 3, 6, 9 (never on the final step 12); validations at 4, 8, 12; last.ckpt every 7
# steps: step 7 lies between the update at 6 and the validation at 8.
CHIRODIFF = [
    *TINY_CHIRODIFF,
    "update_interval=3",
    "method.end_fraction=null",
    "trainer.val_check_interval=4",
    "callbacks.last.every_n_train_steps=7",
    "trainer.log_every_n_steps=1",
    "trainer.deterministic=true",
    "num_threads=1",
    "trainer.enable_progress_bar=false",
]
LDM_TINY = [
    "experiment=ldm_tiny",
    "model.net.model_channels=32",
    "model.net.num_head_channels=32",
    "model.sampling.steps=2",
    "model.sampling.num_samples=2",
    "dataset.num_train=48",
    "dataset.num_val=8",
    "dataset.batch_size=8",
    "trainer.limit_val_batches=1",
    "update_interval=2",
    "trainer.val_check_interval=3",
    "callbacks.last.every_n_train_steps=4",
    "trainer.log_every_n_steps=1",
    "trainer.deterministic=true",
    "logger.wandb=null",
    "method=magran",
    "num_threads=1",
    "trainer.enable_progress_bar=false",
]
# Not training state: ModelCheckpoint records the run folder's path; `validate_loop` counts the batches
# of stand-alone `trainer.validate` calls (the step-0 validation, which a resumed run skips).
IGNORED = ("ModelCheckpoint", "/loops/validate_loop/")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}/{key}").items()}
    if isinstance(tree, list | tuple):
        return {k: v for i, value in enumerate(tree) for k, v in flatten(value, f"{prefix}/{i}").items()}
    return {prefix: tree}


def training_state(run_dir: Path) -> dict[str, Any]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = flatten({k: v for k, v in checkpoint.items() if k != "hyper_parameters"})
    return {k: v for k, v in state.items() if not any(part in k for part in IGNORED)}


def logged_metrics(run_dir: Path) -> dict[tuple[int, str], str]:
    """Last logged value of every (step, metric); a resumed segment re-logs the steps it repeats."""
    values: dict[tuple[int, str], str] = {}
    with open(run_dir / "csv" / "metrics.csv") as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if value != "" and key != "step":
                    values[(int(row["step"]), key)] = value
    return values


def assert_same_run(resumed: Path, straight: Path, extra_steps: frozenset[int] = frozenset()) -> None:
    a, b = training_state(resumed), training_state(straight)
    assert a.keys() == b.keys()
    differing = [k for k in a if not (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k])]
    assert not differing, [(k, a[k], b[k]) for k in differing]
    resumed_log, straight_log = logged_metrics(resumed), logged_metrics(straight)
    assert {k: resumed_log.get(k) for k in straight_log} == straight_log
    assert {step for step, _ in resumed_log.keys() - straight_log.keys()} <= extra_steps


def crash_at(module_class: type, step: int):
    original = module_class.training_step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == step:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    return training_step


@pytest.fixture(scope="module")
def straight_chirodiff(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    run(compose_config(run_dir, [*CHIRODIFF, f"trainer.max_steps={STEPS}"]))
    return run_dir


def test_continue_after_crash_from_between_update_and_validation(tmp_path, straight_chirodiff, monkeypatch):
    monkeypatch.setattr(ChiroDiffModule, "training_step", crash_at(ChiroDiffModule, 9))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_config(tmp_path, [*CHIRODIFF, f"trainer.max_steps={STEPS}"]))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    monkeypatch.undo()
    run(compose_config(tmp_path, [*CHIRODIFF, f"trainer.max_steps={STEPS}", "resume=auto"]))
    assert_same_run(tmp_path, straight_chirodiff)


def test_continue_finished_run_to_more_steps(tmp_path, straight_chirodiff):
    """Exact when the shorter run's last step is not an update step of the longer one: an update never
    happens on a run's final step, and the stop of `method.end_fraction` follows the planned length."""
    first = run(compose_config(tmp_path, [*CHIRODIFF, "trainer.max_steps=7"]))
    assert first["checkpoints"][0]["step"] == 7  # last.ckpt holds the final step
    run(compose_config(tmp_path, [*CHIRODIFF, f"trainer.max_steps={STEPS}", "resume=auto"]))
    # The finished 7-step run validated its final step; the rest of the log is the straight run's.
    assert_same_run(tmp_path, straight_chirodiff, extra_steps=frozenset({6, 7}))


class SignalAt(L.Callback):
    """Sends this process a signal in the middle of a step, as SLURM or a cluster manager would."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_checkpoint_resumes_exactly(tmp_path, straight_chirodiff, monkeypatch, signum):
    monkeypatch.setattr(ChiroDiffModule, "configure_callbacks", lambda self: [SignalAt(4, signum)])
    with pytest.raises(RunPreempted, match=r"at step 5.*resume=auto"):
        run(compose_config(tmp_path, [*CHIRODIFF, f"trainer.max_steps={STEPS}"]))
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)  # handlers restored
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert not (tmp_path / "summary.json").exists()  # an unfinished run writes no summary
    monkeypatch.undo()
    run(compose_config(tmp_path, [*CHIRODIFF, f"trainer.max_steps={STEPS}", "resume=auto"]))
    assert_same_run(tmp_path, straight_chirodiff)


def test_ldm_tiny_resumes_exactly_after_crash(tmp_path, monkeypatch):
    run(compose_config(tmp_path / "straight", [*LDM_TINY, "trainer.max_steps=8"]))
    monkeypatch.setattr(LatentDiffusionModule, "training_step", crash_at(LatentDiffusionModule, 6))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_config(tmp_path / "resumed", [*LDM_TINY, "trainer.max_steps=8"]))
    monkeypatch.undo()
    run(compose_config(tmp_path / "resumed", [*LDM_TINY, "trainer.max_steps=8", "resume=auto"]))
    assert_same_run(tmp_path / "resumed", tmp_path / "straight")
