"""backend=sparse under DDP (two real CPU processes, gloo, through the `sparse_dm.train` CLI): DDP reduces
the gradients of the compact values only (no dense weight is a parameter), RigL's dense gradient is
averaged over the ranks on update steps, and both ranks hold identical masks, weights, EMA, moments and
engine state after every mask update (the run also checks mask checksums itself after each update)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from helpers.run_config import TINY_CHIRODIFF

from tests.training.test_ddp import SHORT, TWO_RANKS, assert_identical, rank_states, train_two_ranks


class ReducedParameters(L.Callback):
    """Each rank writes the parameters its DDP wrapper reduces (name, numel)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        reduced = [(n, p.numel()) for n, p in trainer.strategy.model.named_parameters() if p.requires_grad]
        torch.save(reduced, self.out_dir / f"rank{trainer.global_rank}_reduced.pt")


def test_two_ranks_reduce_active_values_only_and_stay_identical(tmp_path):
    probe = [
        f"+callbacks.reduced._target_={__name__}.ReducedParameters",
        f"+callbacks.reduced.out_dir={tmp_path}/probe",
    ]
    overrides = [*TINY_CHIRODIFF, *SHORT, *TWO_RANKS, "method=rigl", "backend=sparse", *probe]
    result = train_two_ranks(tmp_path, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    for tag in ("start", "update1", "update2", "end"):
        rank0, rank1 = rank_states(tmp_path / "probe", tag)
        assert_identical(rank0, rank1, tag)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["backend"] == "sparse" and summary["mask_updates"] == 2
    assert summary["backend_details"]["dense_grad_steps"] == 2  # RigL's updates only
    reduced = [torch.load(tmp_path / "probe" / f"rank{r}_reduced.pt", weights_only=True) for r in (0, 1)]
    assert reduced[0] == reduced[1]
    masked = {layer["name"]: layer for layer in summary["layers"]}
    names = {name.removeprefix("module.net.") for name, _ in reduced[0]}
    assert not names & set(masked), "a dense masked weight is a DDP parameter"
    for name, layer in masked.items():  # each masked weight is reduced as its nnz active values
        assert (f"module.net.{name}_values", layer["nnz"]) in reduced[0]
