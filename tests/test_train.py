"""End-to-end `sparse_dm.train` runs on the bundled KanjiVG with a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from run_config import TINY_CHIRODIFF, compose_config

from sparse_dm.lightning.chirodiff_module import ChiroDiffModule
from sparse_dm.train import run

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
    assert on_disk["samples"] and all((tmp_path / "samples").glob("*.png"))
    last = {"path": str(tmp_path / "checkpoints" / "last.ckpt"), "step": 6}
    assert on_disk["checkpoints"][0] == last  # the final step, named with its step
    assert (tmp_path / "csv" / "metrics.csv").exists()
    for layer in on_disk["layers"]:
        assert layer["nnz"] == layer["target_nnz"] >= layer["nonzero"]
    if method == "rigl":
        assert on_disk["mask_updates"] == 3
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
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_config(tmp_path, TINY_CHIRODIFF))
    # The half-finished step is not checkpointed; last.ckpt is the last step boundary written.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step_000003.ckpt"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3 and last["callbacks"]["DSTCallback"]["num_updates"] == 1

    monkeypatch.setattr(ChiroDiffModule, "training_step", original)
    summary = run(compose_config(tmp_path, [*TINY_CHIRODIFF, "resume=auto"]))
    assert summary["mask_updates"] == 3 and math.isfinite(summary["metrics"]["val/loss"])
    assert summary["checkpoints"][0] == {"path": str(tmp_path / "checkpoints" / "last.ckpt"), "step": 6}
