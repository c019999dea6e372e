"""backend=sparse checkpoints are the masked engine's: the same keys and tensors (dense weight + `_mask`
buffers, dense EMA shadows, dense optimizer moments in the dense net's parameter order), converted
losslessly both ways; a backend=sparse run resumes bit-exactly, resumes with backend=dense (and a dense
run with backend=sparse), and its checkpoint samples and exports with the inference form."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.run_config import compose_config
from helpers.tolerance import assert_close_computed
from omegaconf import OmegaConf

from sparse_dm.export import export
from sparse_dm.sample import sample
from sparse_dm.sparse_backend.backend import SparseBackend
from sparse_dm.sparse_backend.model import to_compact, to_dense
from sparse_dm.train import run
from sparse_dm.training.modules.chirodiff import ChiroDiffModule
from tests.commands.test_sample import dense_sampling_bound, sample_cfg
from tests.sparse_backend.kernels import kernels_for
from tests.sparse_backend.test_training_equivalence import build_side, lockstep
from tests.training.test_resume import CHIRODIFF, STEPS, assert_same_run, crash_at, training_state

SPARSE = [*CHIRODIFF, "backend=sparse", f"trainer.max_steps={STEPS}", "model.net.num_layers=2"]
DENSE = [*CHIRODIFF, "backend=dense", f"trainer.max_steps={STEPS}", "model.net.num_layers=2"]


def checkpoint_of(side: Any) -> dict[str, Any]:
    """What Lightning writes of a module and its optimizer (the part backends convert)."""
    checkpoint = {"state_dict": side.module.state_dict(), "optimizer_states": [side.optimizer.state_dict()]}
    side.module.on_save_checkpoint(checkpoint)
    return checkpoint


def restore(side: Any, checkpoint: dict[str, Any]) -> None:
    """Lightning's order: on_load_checkpoint, the module's state, then the optimizer's."""
    checkpoint = {**checkpoint, "optimizer_states": list(checkpoint["optimizer_states"])}
    side.module.on_load_checkpoint(checkpoint)
    side.module.load_state_dict(checkpoint["state_dict"])
    side.optimizer.load_state_dict(checkpoint["optimizer_states"][0])


def assert_bit_exact(a: Any, b: Any, where: str = "") -> None:
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (where, set(a) ^ set(b))
        for key in a:
            assert_bit_exact(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bit_exact(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory) -> tuple[Any, Any]:
    """Both backends after 25 lockstep steps with mask updates (moments at moved positions)."""
    tmp = tmp_path_factory.mktemp("pair")
    overrides = ["method=rigl", "model.net.num_layers=2", "update_interval=10"]
    dense, datamodule = build_side(tmp / "dense", overrides, "dense", torch.float32)
    sparse, _ = build_side(tmp / "sparse", overrides, "sparse", torch.float32, kernels_for("compiled"))
    assert lockstep(dense, sparse, datamodule, 25, torch.float32).updates == [10, 20]
    return dense, sparse


def test_compact_form_and_back_are_bit_exact(tmp_path):
    side, _ = build_side(tmp_path, ["method=magran", "model.net.num_layers=2"], "dense", torch.float32)
    before = side.module.net.state_dict()
    to_compact(side.module.net, side.engine.weights, kernels_for("compiled"))
    assert_bit_exact(side.module.net.state_dict(), before)  # already the usual format
    assert_bit_exact(to_dense(side.module.net).state_dict(), before)


def test_checkpoints_hold_the_masked_format_and_convert_losslessly(tmp_path, trained_pair):
    dense, sparse = trained_pair
    from_dense, from_sparse = checkpoint_of(dense), checkpoint_of(sparse)
    for key in ("state_dict", "optimizer_states"):  # same structure: keys, shapes, dtypes, order
        flat_d = json.dumps(tree_shapes(from_dense[key]), sort_keys=True)
        assert flat_d == json.dumps(tree_shapes(from_sparse[key]), sort_keys=True), key
    # A backend=sparse checkpoint loads into backend=dense and back out unchanged, and the other way.
    overrides = ["method=rigl", "model.net.num_layers=2", "update_interval=10"]
    fresh_dense, _ = build_side(tmp_path / "d", overrides, "dense", torch.float32)
    fresh_sparse, _ = build_side(tmp_path / "s", overrides, "sparse", torch.float32, kernels_for("compiled"))
    restore(fresh_dense, from_sparse)
    assert_bit_exact(checkpoint_of(fresh_dense), from_sparse)
    restore(fresh_sparse, from_dense)
    assert_bit_exact(checkpoint_of(fresh_sparse), from_dense)


def tree_shapes(tree: Any) -> Any:
    if torch.is_tensor(tree):
        return [str(tree.dtype), list(tree.shape)]
    if isinstance(tree, dict):
        return {str(k): tree_shapes(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [tree_shapes(v) for v in tree]
    return tree


@pytest.fixture(scope="module")
def straight_sparse(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight_sparse")
    run(compose_config(run_dir, SPARSE))
    return run_dir


def test_resume_is_bit_exact_within_backend_sparse(tmp_path, straight_sparse, monkeypatch):
    monkeypatch.setattr(ChiroDiffModule, "training_step", crash_at(ChiroDiffModule, 9))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_config(tmp_path, SPARSE))
    monkeypatch.undo()
    run(compose_config(tmp_path, [*SPARSE, "resume=auto"]))
    assert_same_run(tmp_path, straight_sparse)


@pytest.mark.parametrize(("first", "then"), [(SPARSE, DENSE), (DENSE, SPARSE)])
def test_resume_with_the_other_backend(tmp_path, straight_sparse, monkeypatch, first, then):
    """A crash at step 9 (last.ckpt: step 7) continued by the other backend: its mask update at step 9
    and everything exact (masks, counters, exploration history) equal the uninterrupted sparse run's;
    weights and moments differ by float rounding (the equivalence tests bound it)."""
    monkeypatch.setattr(ChiroDiffModule, "training_step", crash_at(ChiroDiffModule, 9))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_config(tmp_path, first))
    monkeypatch.undo()
    summary = run(compose_config(tmp_path, [*then, "resume=auto"]))
    assert summary["backend"] == ("sparse" if then is SPARSE else "dense")
    resumed, straight = training_state(tmp_path), training_state(straight_sparse)
    assert resumed.keys() == straight.keys()
    for key in resumed:
        a, b = resumed[key], straight[key]
        if torch.is_tensor(a) and a.is_floating_point():
            assert a.shape == b.shape and bool(torch.isfinite(a).all()), key
        elif torch.is_tensor(a):
            assert torch.equal(a, b), key  # masks, exploration history, counters, RNG states
        elif not key.endswith("global_step") and "loops" not in key:
            assert a == b, key


def test_a_sparse_run_samples_and_exports_with_the_inference_form(tmp_path, straight_sparse):
    ckpt = straight_sparse / "checkpoints" / "last.ckpt"
    dense = sample(sample_cfg(tmp_path, ckpt, backend="dense"))
    sparse = sample(sample_cfg(tmp_path, ckpt, backend="sparse"))
    exported = export(
        OmegaConf.create({"ckpt_path": str(ckpt), "run_dir": None, "out": None, "weights": "ema"})
    )
    from_export = sample(sample_cfg(tmp_path, exported, backend="sparse"))
    arrays = [np.load(r["arrays"], allow_pickle=False) for r in (dense, sparse, from_export)]
    n, scale = dense_sampling_bound(sample_cfg(tmp_path, ckpt, backend="dense"))
    for other in arrays[1:]:
        assert np.array_equal(other["lengths"], arrays[0]["lengths"])
        assert_close_computed(
            other["deltas"], arrays[0]["deltas"], reduction_length=n, scale=scale, why="CSR vs dense, DDIM"
        )


def test_summary_records_backend_kernels_and_memory(straight_sparse):
    summary = json.loads((straight_sparse / "summary.json").read_text())
    assert summary["backend"] == "sparse"
    assert {layer["name"] for layer in summary["layers"]} == {
        *(f"gru.weight_{k}_l{i}{s}" for k in ("ih", "hh") for i in (0, 1) for s in ("", "_reverse")),
        "proj.weight",
        "out.weight",
    }
    for layer in summary["layers"]:
        expected = "csr recurrence" if "weight_hh" in layer["name"] else "csr (sparse_train.c"
        assert layer["kernel"].startswith(expected), layer
    details, memory = summary["backend_details"], summary["train_memory"]
    assert (
        details["kernels"]["library"].endswith(".so")
        and details["dense_grad_steps"] == summary["mask_updates"]
    )
    sparse, dense = memory["sparse"], memory["dense"]
    nnz = sum(layer["nnz"] for layer in summary["layers"])
    numel = sum(layer["numel"] for layer in summary["layers"])
    # the compact weights hold nnz values where the dense ones hold numel; AdamW: two moments each
    assert dense["weights"] - sparse["weights"] == 4 * (numel - nnz)
    assert dense["optimizer_state"] - sparse["optimizer_state"] == 2 * 4 * (numel - nnz)
    assert sparse["indices"] > 0 and sparse["masks"] == dense["masks"] == numel


def test_dense_runs_record_their_kernels(tmp_path):
    summary = run(compose_config(tmp_path, [*DENSE, "trainer.max_steps=2", "validate_before_fit=false"]))
    assert summary["backend"] == "dense" and summary["backend_details"] == {}
    assert all(layer["kernel"].startswith("dense (torch") for layer in summary["layers"])
    assert summary["train_memory"]["dense"]["total"] > 0


def test_sparse_backend_keeps_the_engine_order(tmp_path):
    """The converted module's step bookkeeping is the compact step; the engine's weights are the
    compact layers', in the engine's order and with its names."""
    side, _ = build_side(tmp_path, ["method=rigl"], "dense", torch.float32)
    names = [w.name for w in side.engine.weights]
    backend = SparseBackend(side.module.net, side.module.ema, side.engine, kernels_for("compiled"))
    assert [w.name for w in side.engine.weights] == names
    assert all(w.param.shape == w.mask.shape for w in side.engine.weights)
    assert backend.step.engine is side.engine
