"""End-to-end `sparse_dm.train` runs on the bundled KanjiVG with a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.run_config import TINY_CHIRODIFF, compose_config
from PIL import Image

from sparse_dm.run.checks import ConfigError
from sparse_dm.train import run
from sparse_dm.training.modules.chirodiff import ChiroDiffModule

SUMMARY_KEYS = {
    "model",
    "dataset",
    "method",
    "sparsity",
    "prune_rate",
    "update_interval",
    "seed",
    "params_total",
    "params_prunable",
    "params_active",
    "flops_forward_dense",
    "flops_forward",
    "flops_test_per_sample",
    "flops_test_per_sample_dense",
    "flops_train",
    "flops_train_dense",
    "flops_train_ratio",
    "flops_test_ratio",
    "layers",
    "mask_updates",
    "exploration_rate",
    "metrics",
    "samples",
    "checkpoints",
    "wall_time_s",
}


@pytest.mark.parametrize("method", ["rigl", "dense"])
def test_run_writes_summary_samples_and_checkpoints(tmp_path, method):
    sparsity = "0.0" if method == "dense" else "0.5"
    summary = run(compose_config(tmp_path, [*TINY_CHIRODIFF, f"method={method}", f"sparsity={sparsity}"]))
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert set(on_disk) >= SUMMARY_KEYS
    assert math.isfinite(on_disk["metrics"]["val/loss"])
    assert math.isfinite(on_disk["metrics"]["val/loss_initial"])
    grids = sorted((tmp_path / "samples").glob("*.png"))
    assert [str(p) for p in grids] == sorted(on_disk["samples"])
    assert [p.name for p in grids] == ["step_000003.png", "step_000006.png"]
    assert all(Image.open(p).size[0] > 0 for p in grids)
    last = {"path": str(tmp_path / "checkpoints" / "last.ckpt"), "step": 6}
    assert on_disk["checkpoints"][0] == last  # the final step, named with its step
    assert (tmp_path / "csv" / "metrics.csv").exists()
    for layer in on_disk["layers"]:
        assert layer["nnz"] == layer["target_nnz"] >= layer["nonzero"]
    if method == "rigl":
        assert on_disk["mask_updates"] == on_disk["mask_updates_planned"] == 1  # step 2; stop at 0.75 * 6
        assert on_disk["params_active"] == round(0.5 * on_disk["params_prunable"])
        assert 0.5 < on_disk["exploration_rate"] <= 1.0
    else:
        assert on_disk["mask_updates"] == 0 and on_disk["flops_train_ratio"] == 1.0


def test_crash_keeps_last_checkpoint_and_resume_auto_continues(tmp_path, monkeypatch):
    original = ChiroDiffModule.training_step

    def crash_at_step_4(self, batch, batch_idx):
        if self.trainer.global_step == 4:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ChiroDiffModule, "training_step", crash_at_step_4)
    updating = [*TINY_CHIRODIFF, "method.end_fraction=null"]  # updates at steps 2 and 4
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_config(tmp_path, updating))
    # The half-finished step is not checkpointed; last.ckpt is the last step boundary written.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step_000003.ckpt"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3 and last["callbacks"]["DSTCallback"]["num_updates"] == 1

    monkeypatch.setattr(ChiroDiffModule, "training_step", original)
    summary = run(compose_config(tmp_path, [*updating, "resume=auto"]))
    assert summary["mask_updates"] == 2 and math.isfinite(summary["metrics"]["val/loss"])
    assert summary["checkpoints"][0] == {"path": str(tmp_path / "checkpoints" / "last.ckpt"), "step": 6}


def test_a_sparsity_that_empties_a_layer_is_refused_before_training(tmp_path):
    overrides = [*TINY_CHIRODIFF, "sparsity=0.999", "method.distribution=uniform"]
    with pytest.raises(ConfigError, match=r"sparsity=0\.999: .*0 active weights: .*out\.weight"):
        run(compose_config(tmp_path, overrides))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written
