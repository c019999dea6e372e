"""`python -m sparse_dm.sample`: same seed -> the same drawings from a .ckpt or an .sdm, on the dense
network or the sparse inference form; bad choices are refused naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.run_config import CONF_DIR
from helpers.tiny_run import fake_run
from helpers.tolerance import assert_close_computed, sampling_bound
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sparse_dm.export import export
from sparse_dm.metrics.sketch_stats import sketch_stats
from sparse_dm.run.load import load_module
from sparse_dm.sample import sample


def sample_cfg(tmp_path, ckpt, **overrides):
    items = [f"ckpt_path={ckpt}", f"out_dir={tmp_path / 'out'}", "num_samples=5", "steps=4"]
    items += ["inference.threshold_linear=1.0", "inference.threshold_gru=1.0"]  # no calibration here
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("sample", overrides=[*items, *(f"{k}={v}" for k, v in overrides.items())])


def dense_sampling_bound(cfg) -> tuple[int, float]:
    """The dense run of `cfg` done again with its reductions counted: (longest step chain, scale)
    bounding how far another kernel's rounding moves its drawings (helpers.tolerance.sampling_bound)."""
    module, _ = load_module(Path(cfg.ckpt_path), cfg.run_dir)
    with module.sampling_weights():
        _, n, scale = sampling_bound(
            module, int(cfg.num_samples), torch.Generator().manual_seed(int(cfg.seed)), steps=int(cfg.steps)
        )
    return n, scale


def test_sparse_and_dense_backends_and_export_give_the_same_drawings(tmp_path):
    ckpt = fake_run(tmp_path / "run")
    sdm = export(OmegaConf.create({"ckpt_path": str(ckpt), "run_dir": None, "out": None, "weights": "ema"}))
    dense = sample(sample_cfg(tmp_path, ckpt, backend="dense"))
    sparse = sample(sample_cfg(tmp_path, ckpt, backend="sparse"))
    exported = sample(sample_cfg(tmp_path, sdm, backend="sparse"))
    arrays = [np.load(r["arrays"], allow_pickle=False) for r in (dense, sparse, exported)]
    n, scale = dense_sampling_bound(sample_cfg(tmp_path, ckpt, backend="dense"))
    for other in arrays[1:]:
        assert np.array_equal(other["lengths"], arrays[0]["lengths"])
        assert_close_computed(  # the export holds the EMA weights: its dense rounding is the ckpt's
            other["deltas"], arrays[0]["deltas"], reduction_length=n, scale=scale, why="CSR vs dense, DDIM"
        )
    assert dense["grid"].is_file() and dense["grid"].stat().st_size > 0
    record = json.loads((tmp_path / "out" / "samples_dense.json").read_text())
    deltas, lengths = arrays[0]["deltas"], arrays[0]["lengths"]
    drawings = np.split(deltas, np.cumsum(lengths)[:-1])
    assert record["sketch_stats"] == pytest.approx(sketch_stats(drawings, 0.5))
    assert (record["weights"], record["backend"], record["sparse_form"]) == ("ema", "dense", None)
    form = json.loads((tmp_path / "out" / "samples_sparse.json").read_text())["sparse_form"]
    assert form["csr_matrices"] == form["matrices"] > 0  # thresholds 1.0: every matrix CSR
    assert form["gru"] in ("compiled (openmp)", "compiled (pthreads)", "torch ops")


def test_bad_choices_are_refused(tmp_path):
    ckpt = fake_run(tmp_path / "run")
    with pytest.raises(ValueError, match=r"backend='fast'"):
        sample(sample_cfg(tmp_path, ckpt, backend="fast"))
    with pytest.raises(ValueError, match=r"inference.threshold_linear"):
        sample(sample_cfg(tmp_path, ckpt, **{"inference.threshold_linear": 2.0}))
    sdm = export(OmegaConf.create({"ckpt_path": str(ckpt), "run_dir": None, "out": None, "weights": "ema"}))
    with pytest.raises(ValueError, match=r"weights=raw with an exported \.safetensors file"):
        sample(sample_cfg(tmp_path, sdm, weights="raw"))
