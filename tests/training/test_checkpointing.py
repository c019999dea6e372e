"""Checkpoints that mean what they say: explicit resume, refusal of foreign checkpoints, atomic writes,
SLURM requeue, and evaluation that names the step it scored."""

from __future__ import annotations

import copy
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
from omegaconf import OmegaConf

from sparse_dm import evaluate as evaluate_mod
from sparse_dm.run.build import build_run
from sparse_dm.run.checks import ConfigError
from sparse_dm.train import run
from sparse_dm.training.checkpointing import (
    FINGERPRINT_KEY,
    LAST,
    LEGACY_FINGERPRINT_KEYS,
    RESUME_MAY_CHANGE,
    AtomicCheckpointIO,
    NonFiniteStateError,
    ResumeCheckpoint,
    ResumeMismatch,
    RunFolderNotEmpty,
    check_resume_compatible,
    config_differences,
    fingerprint,
    may_change_on_resume,
    plain,
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


# Each changes the trajectory (growth randomness is seeded by `seed`); the issue found them accepted.
TRAJECTORY_CHANGES = [
    (["seed=7"], ["seed: checkpoint 0, config 7", "method.seed: checkpoint 0, config 7"]),
    (["prune_rate=0.1"], ["prune_rate: checkpoint 0.5, config 0.1"]),
    (["method.grow=random"], ["method.grow: checkpoint 'gradient', config 'random'"]),
    (["update_interval=5"], ["update_interval: checkpoint 2, config 5"]),
    (["method.end_fraction=null"], ["method.end_fraction: checkpoint 0.75, config None"]),
    (["model.optimizer.lr=0.01"], ["model.optimizer.lr: checkpoint 0.001, config 0.01"]),
    (["trainer.gradient_clip_val=1.0"], ["trainer.gradient_clip_val: checkpoint None, config 1.0"]),
    (["trainer.accumulate_grad_batches=2"], ["trainer.accumulate_grad_batches: checkpoint 1, config 2"]),
    (["dataset.batch_size=8"], ["dataset.batch_size: checkpoint 16, config 8"]),
    (["model.ema.decay=0.9"], ["model.ema.decay: checkpoint 0.995, config 0.9"]),
]


@pytest.mark.parametrize(
    ("overrides", "listed"), TRAJECTORY_CHANGES, ids=[o[0] for o, _ in TRAJECTORY_CHANGES]
)
def test_resume_with_a_trajectory_key_changed_stops_before_writing(finished_run, overrides, listed):
    before = snapshot(finished_run)
    with pytest.raises(ResumeMismatch, match="refusing to resume") as error:
        run(compose_config(finished_run, [*SHORT, "resume=auto", *overrides]))
    message = str(error.value)
    assert all(item in message for item in listed), message
    assert "start a new run" in message and "resume=never" in message
    assert snapshot(finished_run) == before  # refused before anything was written


def test_refusal_names_every_differing_key_with_both_values(tmp_path, finished_run):
    checkpoint = torch.load(finished_run / "checkpoints" / LAST, weights_only=True)
    cfg = compose_config(tmp_path, [*SHORT, "seed=3", "prune_rate=0.2", "method=magran"])
    with pytest.raises(ResumeMismatch) as error:
        check_resume_compatible(checkpoint, finished_run / "checkpoints" / LAST, cfg)
    listed = str(error.value).split("\n")[1:-1]
    assert listed == [
        "  dataset.seed: checkpoint 0, config 3",
        "  method.grow: checkpoint 'gradient', config 'random'",
        "  method.name: checkpoint 'rigl', config 'magran'",
        "  method.prune_rate: checkpoint 0.5, config 0.2",
        "  method.seed: checkpoint 0, config 3",
        "  prune_rate: checkpoint 0.5, config 0.2",
        "  seed: checkpoint 0, config 3",
    ]


def leaves(tree: dict, prefix: str = "") -> list[str]:
    return [
        k
        for name, value in tree.items()
        for k in (leaves(value, f"{prefix}{name}.") if isinstance(value, dict) and value else [prefix + name])
    ]


def test_every_key_outside_the_allow_list_is_in_the_fingerprint(tmp_path):
    """Changed one at a time, every leaf of the resolved config is named, except the documented keys a
    resume may change and the callbacks that only observe: a key added to the config is covered
    without anyone listing it."""
    base = compose_config(tmp_path, [*SHORT, "callbacks=fidelity"])
    stored = fingerprint(base)
    observing = ("callbacks.checkpoint.", "callbacks.last.", "callbacks.fidelity.")
    keys = leaves(plain(base))
    assert len(keys) > 100
    for key in keys:
        changed = copy.deepcopy(base)
        OmegaConf.update(changed, key, "__changed__", force_add=True)
        named = [line.split(":")[0] for line in config_differences(stored, changed)]
        allowed = may_change_on_resume(key) or key.startswith(observing)
        assert (key in named) != allowed, (key, named)


def test_keys_that_may_change_on_resume_are_accepted(tmp_path, finished_run):
    checkpoint = torch.load(finished_run / "checkpoints" / LAST, weights_only=True)
    assert checkpoint[FINGERPRINT_KEY]["format"] == 2
    overrides = [
        "trainer.max_steps=40",
        "num_threads=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=true",
        "callbacks.last.every_n_train_steps=5",
        "callbacks.checkpoint.save_top_k=1",
        "callbacks=fidelity",
        "nonfinite.max_consecutive_losses=9",
        "validate_before_fit=false",
    ]
    cfg = compose_config(tmp_path / "elsewhere", [*SHORT, "resume=auto", *overrides])
    check_resume_compatible(checkpoint, finished_run / "checkpoints" / LAST, cfg)
    assert {"trainer.max_steps", "logger", "num_threads", "paths", "resume"} <= set(RESUME_MAY_CHANGE)


def test_checkpoint_of_the_old_fingerprint_resumes_on_what_it_stored(tmp_path, finished_run, caplog):
    """Format 1 stored LEGACY_FINGERPRINT_KEYS only: such a checkpoint keeps resuming, checked on those
    keys (a changed seed cannot be seen: the warning says so)."""
    path = finished_run / "checkpoints" / LAST
    checkpoint = torch.load(path, weights_only=True)
    cfg = compose_config(tmp_path, SHORT)
    checkpoint[FINGERPRINT_KEY] = {k: plain(OmegaConf.select(cfg, k)) for k in LEGACY_FINGERPRINT_KEYS}
    with caplog.at_level("WARNING", logger="sparse_dm.training.checkpointing"):
        check_resume_compatible(checkpoint, path, compose_config(tmp_path, [*SHORT, "seed=7"]))
    assert "before the whole-config fingerprint" in caplog.text
    wider = compose_config(tmp_path, [*SHORT, "model.net.hidden_size=24"])
    with pytest.raises(ResumeMismatch, match=r"model\.net\.hidden_size: checkpoint 16, config 24"):
        check_resume_compatible(checkpoint, path, wider)
    checkpoint[FINGERPRINT_KEY] = {"format": 3, "config": {}}
    with pytest.raises(ValueError, match="unknown format"):
        check_resume_compatible(checkpoint, path, cfg)


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
