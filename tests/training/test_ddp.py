"""Two real processes (Lightning strategy=ddp, gloo on CPU) through the `sparse_dm.train` CLI: masks,
weights, EMA and optimizer state stay identical on both ranks after every mask update; each rank
trains on its own shard; a rank whose masks diverge stops the run; rank 0 alone writes outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.run_config import TINY_CHIRODIFF, compose_config

from sparse_dm.train import run

ROOT = Path(__file__).resolve().parents[2]
TWO_RANKS = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "num_threads=1"]
SHORT = [
    "trainer.max_steps=6",
    "update_interval=2",
    "method.end_fraction=null",  # updates at 2 and 4 (never on the final step 6)
    "trainer.val_check_interval=3",
    "trainer.enable_progress_bar=false",
    "validate_before_fit=false",
]
TINY_LDM = [
    "experiment=ldm_tiny",
    "model.sampling.steps=2",
    "model.sampling.num_samples=2",
    "dataset.num_train=64",
    "dataset.num_val=8",
    "dataset.batch_size=8",
    "trainer.limit_val_batches=1",
    "logger.wandb=null",
]
MODELS = {"chirodiff": TINY_CHIRODIFF, "ldm_tiny": TINY_LDM}


def train_two_ranks(run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    probe = [
        "+callbacks.probe._target_=helpers.ddp_probe.RankStateProbe",
        f"+callbacks.probe.out_dir={run_dir}/probe",
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "sparse_dm.train", f"hydra.run.dir={run_dir}", *overrides, *probe]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def rank_states(probe_dir: Path, tag: str) -> tuple[dict, dict]:
    return tuple(torch.load(probe_dir / f"rank{r}_{tag}.pt", weights_only=True) for r in (0, 1))


def assert_identical(a, b, where: str) -> None:
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def structure(value):
    """Keys and types, not values: what a consumer of summary.json relies on."""
    if isinstance(value, dict):
        return {k: structure(v) for k, v in value.items()}
    if isinstance(value, list):
        return [structure(value[0])] if value else []
    return "number" if isinstance(value, int | float) else type(value).__name__


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["static", "rigl", "magran"])
def test_two_ranks_stay_identical(tmp_path, model, method):
    result = train_two_ranks(tmp_path, [*MODELS[model], *SHORT, *TWO_RANKS, f"method={method}"])
    assert result.returncode == 0, result.stderr[-3000:]
    probe = tmp_path / "probe"
    tags = ["start", *(f"update{k}" for k in (1, 2) if method != "static"), "end"]
    for tag in tags:
        rank0, rank1 = rank_states(probe, tag)
        assert_identical(rank0, rank1, f"{model}/{method}/{tag}")
    masks = [k for k in rank0["module"] if k.endswith("_mask")]
    assert masks and rank0["optimizer"]["state"], "nothing sparse or no optimizer state was compared"
    batches = [torch.load(probe / f"rank{r}_batches.pt", weights_only=True) for r in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == 6
    assert all(a != b for a, b in zip(*batches, strict=True)), "the ranks trained on the same batches"
    # Rank 0 alone writes outputs (each rank keeps its own Hydra log file).
    entries = {p.name for p in tmp_path.iterdir() if p.suffix != ".log"}
    assert entries == {".hydra", "checkpoints", "config.yaml", "csv", "samples", "summary.json", "probe"}
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000003.png", "step_000006.png"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["checkpoints"][0]["step"] == 6 and summary["mask_updates"] == (
        0 if method == "static" else 2
    )
    if model == "chirodiff" and method == "rigl":
        single = run(compose_config(tmp_path / "one_rank", [*TINY_CHIRODIFF, *SHORT, "method=rigl"]))
        assert structure(json.loads(json.dumps(single))) == structure(summary)


def test_diverging_rank_stops_the_run(tmp_path):
    overrides = [*TINY_CHIRODIFF, *SHORT, *TWO_RANKS, "method=magran", "callbacks.last.every_n_train_steps=1"]
    result = train_two_ranks(tmp_path, [*overrides, "+callbacks.probe.diverge_rank=1"])
    assert result.returncode != 0
    assert "masks differ between ranks after the mask update at step 2: rank(s) [1]" in result.stderr
    # Nothing of the diverged state was saved: last.ckpt holds step 1, before the first update.
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 1
