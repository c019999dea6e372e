"""Runs that used to "succeed" on bad data or NaN losses now stop with a clear error, and every
ChiroDiff run records sketch statistics of its samples beside the data's."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.run_config import TINY_CHIRODIFF, compose_config
from hydra.utils import instantiate

from sparse_dm.metrics.sketch_stats import STAT_NAMES, sketch_stats
from sparse_dm.run.checks import ConfigError, validate
from sparse_dm.train import run
from sparse_dm.training.callbacks.nonfinite_guard import (
    NonFiniteLossError,
    NonFiniteLossGuard,
    NonFiniteMetricError,
    check_final_metric,
)
from sparse_dm.training.modules.chirodiff import ChiroDiffModule

NAN = float("nan")


def write_stroke3(path: Path, sizes: dict[str, int], nan_at: tuple[str, int] | None = None) -> Path:
    """A small valid stroke-3 file; optionally one NaN coordinate in drawing `nan_at`."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in sizes.items():
        drawings = np.empty(n, dtype=object)
        for i in range(n):
            drawing = np.concatenate([rng.integers(-20, 20, (12, 2)), np.zeros((12, 1))], axis=1)
            drawing[[5, 11], 2] = 1
            drawings[i] = drawing.astype(np.float32)
        splits[split] = drawings
    if nan_at is not None:
        splits[nan_at[0]][nan_at[1]][3, 0] = NAN
    np.savez(path, **splits)
    return path


def stroke3_run(tmp_path: Path, data: Path) -> list[str]:
    return [*TINY_CHIRODIFF, "dataset=stroke3", f"dataset.path={data}"]


# --- bad data is refused before training --------------------------------------------------------


def test_a_nan_coordinate_is_refused_before_training(tmp_path: Path) -> None:
    data = write_stroke3(tmp_path / "nan.npz", {"train": 20, "valid": 4, "test": 4}, nan_at=("train", 7))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"nan\.npz \[split train, drawing 7\]: non-finite values"):
        run(compose_config(out, stroke3_run(tmp_path, data)))
    assert not (out / "summary.json").exists() and not (out / "checkpoints").exists()


def test_an_empty_train_split_is_refused_before_training(tmp_path: Path) -> None:
    data = write_stroke3(tmp_path / "empty.npz", {"train": 0, "valid": 4, "test": 4})
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"empty\.npz \[split train\]: no drawings to use"):
        run(compose_config(out, stroke3_run(tmp_path, data)))
    assert not (out / "summary.json").exists() and not (out / "checkpoints").exists()


# --- non-finite training losses -----------------------------------------------------------------


def test_nonfinite_losses_stop_the_run_and_checkpoints_stay_finite(tmp_path, monkeypatch) -> None:
    original = ChiroDiffModule.training_step

    def nan_from_step_4(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * NAN if self.trainer.global_step >= 3 else loss

    monkeypatch.setattr(ChiroDiffModule, "training_step", nan_from_step_4)
    # No mask update inside the non-finite steps (what an update does then is the DST callback's
    # business), so the weights must come out bit-identical to those before them.
    overrides = ["callbacks.last.every_n_train_steps=1", "update_interval=100"]
    cfg = compose_config(tmp_path, [*TINY_CHIRODIFF, *overrides, "nonfinite.max_consecutive_losses=3"])
    with pytest.raises(
        NonFiniteLossError,
        match=r"\(nan\) at 3 consecutive optimizer steps \(steps 4 to 6, limit "
        r"nonfinite\.max_consecutive_losses=3\)",
    ):
        run(cfg)
    assert not (tmp_path / "summary.json").exists()
    ckpts = tmp_path / "checkpoints"
    load = lambda name: torch.load(ckpts / name, map_location="cpu", weights_only=True)  # noqa: E731
    before, last = load("step_000003.ckpt"), load("last.ckpt")  # best-by-val/loss at step 3; resume point
    assert before["global_step"] == 3
    assert last["global_step"] == 5  # steps 4 and 5 were taken (and skipped) before the stop at 6
    for name, value in last["state_dict"].items():
        assert torch.isfinite(value).all() if value.is_floating_point() else True, name
        if name.startswith("net."):  # the skipped steps left the weights exactly as they were
            torch.testing.assert_close(value, before["state_dict"][name], rtol=0, atol=0)


def test_isolated_nonfinite_losses_are_skipped_and_counted() -> None:
    guard = NonFiniteLossGuard(max_consecutive=2)
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=1.0)
    trainer = SimpleNamespace(global_step=0)

    def step(loss: float) -> bool:
        """One optimizer step through the guard; True if the gradient survived."""
        param.grad = torch.ones(2)
        guard.on_before_backward(trainer, None, torch.tensor(loss))
        guard.on_before_optimizer_step(trainer, None, optimizer)
        trainer.global_step += 1
        return param.grad is not None

    assert [step(x) for x in (1.0, NAN, 1.0, math.inf, 0.5)] == [True, False, True, False, True]
    assert guard.skipped_steps == 2 and guard.consecutive == 0
    assert step(NAN) is False
    with pytest.raises(NonFiniteLossError, match=r"\(nan\) at 2 consecutive optimizer steps \(steps 6 to 7"):
        step(NAN)


# --- final metric -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({}, "without a final val/loss"),
        ({"val/loss": NAN}, "non-finite final val/loss=nan"),
        ({"val/loss": math.inf}, "non-finite final val/loss=inf"),
    ],
)
def test_a_missing_or_nonfinite_final_metric_is_an_error(metrics: dict, message: str) -> None:
    with pytest.raises(NonFiniteMetricError, match=message):
        check_final_metric(metrics)
    assert check_final_metric({"val/loss": 0.25}) == 0.25


def test_a_run_with_nan_validation_loss_does_not_succeed(tmp_path, monkeypatch) -> None:
    original = ChiroDiffModule.per_sample_loss  # what training (its mean) and validation compute

    def nan_in_validation(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        return loss if self.training else loss * NAN

    monkeypatch.setattr(ChiroDiffModule, "per_sample_loss", nan_in_validation)
    overrides = [
        *TINY_CHIRODIFF,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "validate_before_fit=false",
    ]
    with pytest.raises(NonFiniteMetricError, match="non-finite final val/loss=nan"):
        run(compose_config(tmp_path, overrides))
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "nonfinite.max_consecutive_losses=0",
            r"nonfinite\.max_consecutive_losses=0; allowed: an integer >= 1",
        ),
        ("dataset.too_long=truncate", r"dataset\.too_long='truncate'; allowed: one of \('drop', 'refuse'\)"),
        ("dataset.max_len=1", r"dataset\.max_len=1; allowed: an integer >= 2"),
    ],
)
def test_sanity_config_keys_are_validated(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(tmp_path, [override]))


# --- sketch statistics --------------------------------------------------------------------------


def test_sketch_stats_are_logged_and_in_the_summary(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, TINY_CHIRODIFF)
    summary = run(cfg)
    stats = json.loads((tmp_path / "summary.json").read_text())["sketch_stats"]
    assert stats["num_drawings"] == cfg.model.sampling.num_samples == 4
    assert set(stats["samples"]) == set(stats["data"]) == set(STAT_NAMES)
    assert stats == json.loads(json.dumps(summary["sketch_stats"]))
    # The data side is measured on exactly what the model trains on (so in the samples' units):
    # num_samples validation drawings, evenly spaced over the split, as the loader delivers them.
    dm = instantiate(cfg.dataset, _convert_="all")
    delivered = [x[:n] for b in dm.val_dataloader() for x, n in zip(b["x"], b["lengths"], strict=True)]
    spaced = [delivered[round(i * (len(delivered) - 1) / 3)] for i in range(4)]
    assert stats["data"] == pytest.approx(sketch_stats(spaced, cfg.model.sampling.pen_threshold))
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["sketch/pen_up_rate"]]
    assert [int(r["step"]) for r in rows] == [3, 6]  # every validation's sample grid
    for name in STAT_NAMES:
        assert float(rows[-1][f"sketch/{name}"]) == pytest.approx(stats["samples"][name])
        assert float(rows[-1][f"sketch_data/{name}"]) == pytest.approx(stats["data"][name])
