"""Checkpoints that mean what they say: explicit resume, refusal of foreign checkpoints, atomic writes,
SLURM requeue, and evaluation that names the step it scored."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import helpers.tiny_extractor as tiny_extractor
import lightning as L
import pytest
import torch
from helpers.run_config import TINY_CHIRODIFF, compose_config, evaluate_config
from helpers.toy_diffusion import ToyData, make_module
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

from sparse_dm import evaluate as evaluate_mod
from sparse_dm.run.build import build_run
from sparse_dm.run.checks import ConfigError
from sparse_dm.train import run
from sparse_dm.training.checkpointing import (
    LAST,
    AtomicCheckpointIO,
    NonFiniteStateError,
    ResumeCheckpoint,
    RunFolderNotEmpty,
    requeue_slurm_job,
    resolve_resume,
)
from sparse_dm.training.init_from import init_from_checkpoint

SHORT = [*TINY_CHIRODIFF, "num_threads=1", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny RigL run (6 steps, S=0.5) shared by the tests that only read it."""
    run_dir = tmp_path_factory.mktemp("finished")
    run(compose_config(run_dir, SHORT))
    return run_dir


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# ----- explicit resume -----------------------------------------------------------------------------
def test_lightning_resumes_silently_with_on_exception_checkpoint(tmp_path):
    """The upstream behaviour this project guards against: fit(ckpt_path=None) becomes "last"."""

    def trainer(max_steps: int, callbacks: list) -> L.Trainer:
        saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
        return L.Trainer(
            max_steps=max_steps, logger=False, enable_progress_bar=False, callbacks=[saver, *callbacks]
        )

    trainer(3, []).fit(make_module(), ToyData())
    second = trainer(5, [OnExceptionCheckpoint(dirpath=tmp_path)])
    second.fit(make_module(), ToyData(), ckpt_path=None)
    assert second.ckpt_path == str(tmp_path / LAST)  # it resumed although nobody asked it to


def test_on_exception_checkpoint_in_config_is_refused(tmp_path):
    overrides = [
        *SHORT,
        "+callbacks.crash._target_=lightning.pytorch.callbacks.OnExceptionCheckpoint",
        f"+callbacks.crash.dirpath={tmp_path}/checkpoints",
    ]
    with pytest.raises(ConfigError, match=r"OnExceptionCheckpoint.*resumes silently"):
        run(compose_config(tmp_path / "run", overrides))
    assert not (tmp_path / "run").exists()


def test_rerun_into_existing_folder_stops_and_changes_nothing(finished_run):
    before = snapshot(finished_run)
    with pytest.raises(RunFolderNotEmpty) as error:
        run(compose_config(finished_run, SHORT))
    message = str(error.value)
    assert "last.ckpt (step 6)" in message and "summary.json" in message
    assert "resume=auto" in message and "paths.output_dir" in message
    assert snapshot(finished_run) == before


def test_invalid_config_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="sparsity"):
        run(compose_config(tmp_path / "run", [*SHORT, "sparsity=1.5"]))
    with pytest.raises(FileNotFoundError, match=r"resume=missing\.ckpt"):
        run(compose_config(tmp_path / "run", [*SHORT, "resume=missing.ckpt"]))
    assert not (tmp_path / "run").exists()


def test_resume_auto_takes_newest_complete_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, step in [("step_000004.ckpt", 4), (LAST, 9), ("step_000009.ckpt", 9), ("old.ckpt", 2)]:
        torch.save({"global_step": step}, folder / name)
    (folder / "step_000012.ckpt").write_bytes(b"PK\x03\x04 truncated")  # a torn write by another tool
    (folder / ".last.ckpt.tmp-123").write_bytes(b"partial")  # an interrupted atomic write
    assert resolve_resume("auto", tmp_path) == folder / LAST
    assert resolve_resume("auto", tmp_path / "empty") is None
    assert resolve_resume(str(folder / "old.ckpt"), tmp_path) == folder / "old.ckpt"


# ----- checkpoint sanity ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "listed"),
    [
        (["sparsity=0.7"], ["sparsity: checkpoint 0.5, config 0.7"]),
        (["method=magran", "method.distribution=uniform"], ["method.name", "method.distribution"]),
        (["model.net.hidden_size=24"], ["model.net"]),
    ],
)
def test_resume_refuses_checkpoint_of_another_config(tmp_path, finished_run, overrides, listed):
    ckpt = finished_run / "checkpoints" / LAST
    with pytest.raises(ValueError, match="refusing to resume") as error:
        run(compose_config(tmp_path / "run", [*SHORT, f"resume={ckpt}", *overrides]))
    assert all(item in str(error.value) for item in listed)
    assert not (tmp_path / "run").exists()


def test_dense_checkpoint_needs_init_from_and_is_pruned_to_the_masks(tmp_path):
    dense = tmp_path / "dense"
    run(compose_config(dense, [*SHORT, "method=dense", "sparsity=0"]))
    ckpt = dense / "checkpoints" / LAST
    with pytest.raises(ValueError, match=r"dense checkpoint.*init_from="):
        run(compose_config(tmp_path / "sparse", [*SHORT, f"resume={ckpt}"]))

    cfg = compose_config(tmp_path / "sparse", [*SHORT, f"init_from={ckpt}"])
    module, _, engine = build_run(cfg)
    checkpoint = torch.load(ckpt, weights_only=True)
    init_from_checkpoint(module, engine, checkpoint)
    shadows = dict(module.ema.named_buffers())
    for weight in engine.weights:
        dense_value = checkpoint["state_dict"][f"net.{weight.name}"]
        assert torch.equal(weight.param, dense_value * weight.mask), weight.name
        assert torch.equal(shadows[weight.name.replace(".", "__")], weight.param)
    assert sum(int(w.mask.sum()) for w in engine.weights) < sum(w.mask.numel() for w in engine.weights)
    summary = run(cfg)  # and it trains from there
    assert summary["mask_updates"] == summary["mask_updates_planned"] == 1  # step 2; stop at 0.75 * 6


# ----- atomic writes -------------------------------------------------------------------------------
KILL_DURING_WRITE = textwrap.dedent(
    """
    import os, signal, sys, torch
    from sparse_dm.training.checkpointing import AtomicCheckpointIO

    path = sys.argv[1]
    real_save = torch.save

    def dying_save(obj, file):  # write half a checkpoint, then die as a SIGKILLed job does
        real_save(obj, file)
        file.truncate(file.tell() // 2)
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save
    AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.ones(100_000)}, path)
    """
)


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / LAST
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.zeros(100_000)}, path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, str(path)], env=env, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(path, weights_only=True)["global_step"] == 1  # the previous one, complete
    assert resolve_resume("auto", tmp_path) == path  # the torn temporary file is ignored


class PoisonWeight(L.Callback):
    """A NaN in a weight after the optimizer step of step 5, as an overflowing update leaves it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 5:
            with torch.no_grad():
                next(pl_module.net.parameters()).view(-1)[0] = float("nan")


def test_non_finite_state_never_overwrites_last_checkpoint(tmp_path):
    callback = ResumeCheckpoint(str(tmp_path), every_n_train_steps=3)
    trainer = L.Trainer(
        max_steps=10, logger=False, enable_progress_bar=False, callbacks=[PoisonWeight(), callback]
    )
    with pytest.raises(NonFiniteStateError, match=r"step 6.*still holds the last finite state"):
        trainer.fit(make_module(), ToyData())
    assert torch.load(tmp_path / LAST, weights_only=True)["global_step"] == 3


# ----- preemption under SLURM ----------------------------------------------------------------------
@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch) -> Path:
    """An `scontrol` on PATH that records its arguments, and the environment of a SLURM batch job."""
    record = tmp_path / "scontrol_calls"
    binary = tmp_path / "bin" / "scontrol"
    binary.parent.mkdir()
    binary.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", f"{binary.parent}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "sparse_dm"}.items():
        monkeypatch.setenv(key, value)
    return record


def test_requeue_calls_scontrol_for_the_job(fake_scontrol, monkeypatch):
    requeue_slurm_job()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    requeue_slurm_job()
    assert fake_scontrol.read_text().split("\n")[:2] == ["requeue 4242", "requeue 77_3"]


class SendSignal(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.parametrize("requeue", [True, False])
def test_preemption_signal_saves_and_requeues(tmp_path, fake_scontrol, requeue):
    callback = ResumeCheckpoint(str(tmp_path), every_n_train_steps=None, requeue=requeue)
    trainer = L.Trainer(
        max_steps=10, logger=False, enable_progress_bar=False, callbacks=[callback, SendSignal()]
    )
    with pytest.raises(Exception, match="SIGUSR1 at step 2") as error:
        trainer.fit(make_module(), ToyData())
    assert error.value.requeued == requeue
    assert torch.load(tmp_path / LAST, weights_only=True)["global_step"] == 2
    assert fake_scontrol.exists() == requeue


# ----- the step of every checkpoint ----------------------------------------------------------------
def test_summary_and_evaluate_name_the_step(tmp_path, finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    steps = {Path(c["path"]).name: c["step"] for c in summary["checkpoints"]}
    assert steps[LAST] == 6  # last.ckpt is the final step, not the last periodic one
    assert all(steps[name] == int(name[5:11]) for name in steps if name.startswith("step_"))

    cfg = evaluate_config([f"ckpt_path='{finished_run / 'checkpoints' / 'step_000003.ckpt'}'"])
    cfg.num_samples, cfg.batch_size, cfg.sampling_steps, cfg.num_reference = 8, 8, 2, 8
    cfg.device = "cpu"
    cfg.fidelity.feature_extractor = tiny_extractor.NAME
    cfg.fidelity.weights_path = str(tiny_extractor.install(tmp_path))
    cfg.fidelity.kid_subset_size = 4
    result = evaluate_mod.evaluate(cfg)
    assert result["eval_ckpt_step"] == 3
    merged = json.loads((finished_run / "summary.json").read_text())  # README: train -> evaluate
    assert merged["fid_by_steps"]["2"]["fid"] == result["fid"] and math.isfinite(result["fid"])
    assert merged["num_samples"] == 8 and merged["fid"] == result["fid"]  # the run had no FID yet


def test_last_checkpoint_is_written_once_per_optimizer_step_under_accumulation(tmp_path, monkeypatch):
    """With gradient accumulation global_step repeats over micro-batches; saving there would store a
    half-accumulated step (and write the file several times)."""
    saved: list[int] = []
    original = L.Trainer.save_checkpoint

    def record(self, filepath, *args, **kwargs):
        if Path(filepath).name == "last.ckpt":
            saved.append(self.global_step)
        return original(self, filepath, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", record)
    overrides = [
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=3",
        "callbacks.last.every_n_train_steps=1",
    ]
    run(compose_config(tmp_path, [*SHORT, *overrides]))
    assert saved == [1, 2, 3]
