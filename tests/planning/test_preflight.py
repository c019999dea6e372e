"""Disk preflight: checkpoint files kept by the policy, refusal before fit, the cost report's resources."""

import pytest
from helpers.run_config import TINY_CHIRODIFF, compose_config

from sparse_dm.planning import disk as preflight
from sparse_dm.planning.cost import compute_resources
from sparse_dm.train import run

CKPT = "lightning.pytorch.callbacks.ModelCheckpoint"


def test_checkpoint_files_follow_the_policy():
    every_500 = {"_target_": CKPT, "every_n_train_steps": 500, "save_last": True}
    resume = {"_target_": "sparse_dm.training.checkpointing.ResumeCheckpoint", "every_n_train_steps": 500}
    files = preflight.checkpoint_files(
        {"ckpt": {**every_500, "save_top_k": -1}, "last": resume}, 156_300, 1042
    )
    assert files == {"ckpt": 312 + 1, "last": 2}  # last.ckpt + its temp file while replaced
    top3 = preflight.checkpoint_files({"ckpt": {**every_500, "save_top_k": 3}}, 156_300, 1042)
    assert top3 == {"ckpt": 3 + 1 + 1}  # 3 kept, 1 transient while replacing, last
    by_epoch = {"_target_": CKPT, "every_n_epochs": 10, "save_top_k": -1, "save_last": False}
    assert preflight.checkpoint_files({"ckpt": by_epoch}, 156_300, 1042) == {"ckpt": 15}
    with pytest.raises(ValueError, match=r"callbacks\.ckpt\.train_time_interval"):
        preflight.checkpoint_files({"ckpt": {"_target_": CKPT, "train_time_interval": "1h"}}, 10, 1)


def test_run_refuses_to_start_without_disk_for_its_checkpoints(tmp_path, monkeypatch):
    class Usage:
        free = 1024

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(
        preflight.InsufficientDiskError, match=r"checkpoint files .* GiB each = .* only 0\.000 GiB"
    ):
        run(compose_config(tmp_path / "run", TINY_CHIRODIFF))
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_cost_reports_checkpoint_disk_and_memory_of_the_paper_preset(tmp_path):
    import torch
    from hydra.utils import instantiate

    cfg = compose_config(tmp_path, ["experiment=ldm_celebahq", "method=rigl", "sparsity=0.5"], "cost")
    with torch.device("meta"):
        module = instantiate(cfg.model, _convert_="all")
    resources = compute_resources(cfg, module)
    disk, memory = resources["disk"], resources["gpu_memory"]
    params = 274_056_163
    weights = 273_872_704  # every conv / linear weight of the UNet carries a bool mask
    float_bytes = 4 * params
    adam = 2 * float_bytes + 4 * len(list(module.net.parameters()))
    ema_counter = 8  # MaskedEMA.num_updates (int64), the warm-up state
    assert disk["checkpoint_bytes"] == float_bytes * 2 + ema_counter + weights + adam  # net+EMA+masks+AdamW
    assert disk["train_steps"] == 156_300
    # conf/callbacks/default.yaml: 2 best (+1 while replacing one) and last.ckpt (+ its temp file)
    assert disk["checkpoint_files"] == {"checkpoint": 3, "last": 2}
    assert disk["disk_bytes_needed"] == 5 * disk["checkpoint_bytes"]
    assert memory["params"] == memory["grads"] == memory["ema"] - ema_counter == float_bytes
    assert memory["frozen"] == 4 * 55_322_782  # the VQ-f4 first stage sits on the GPU
    assert memory["activations"] > 0 and memory["total"] == sum(v for k, v in memory.items() if k != "total")
