"""summary.json: one machine-readable record per run, the same keys for every model family."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sparse_dm.planning.cost import stored_counts
from sparse_dm.sparse_backend.backend import train_state_bytes
from sparse_dm.sparse_backend.optimizer import tensor_bytes
from sparse_dm.sparsity.engine import SparseEngine
from sparse_dm.sparsity.masks import MASK_SUFFIX, find_prunable

STEPS_KEY = "fid_by_steps"  # evaluations at several DDIM steps: {"50": {"fid": ...}, "100": {...}}


def _to_float(value: Any) -> float:
    return float(value.item() if torch.is_tensor(value) else value)


def layer_records(net: torch.nn.Module, engine: SparseEngine | None) -> list[dict]:
    """Final per-layer counts: nnz from the masks, nonzero from the values (dense runs: all active)."""
    if engine is not None:
        keys = ("name", "numel", "nnz", "target_nnz", "nonzero", "band_nnz", "band_target_nnz")
        return [{k: s[k] for k in keys if k in s} for s in engine.layer_stats()]
    return [
        {
            "name": w.name,
            "numel": w.param.numel(),
            "nnz": w.param.numel(),
            "target_nnz": w.param.numel(),
            "nonzero": int(torch.count_nonzero(w.param.detach())),
        }
        for w in find_prunable(net)
    ]


def final_stored(net: torch.nn.Module) -> dict[str, Any]:
    """params_stored at the end of the run, measured from the masks (band runs: their union)."""
    counts = stored_counts(net)
    return {} if counts is None else {"params_stored": sum(counts.values()),
                                      "params_stored_basis": "measured from the masks"}  # fmt: skip


def method_label(cfg: DictConfig) -> str:
    """The method as reports group it: the paper's name, plus `+tbands` (method.timestep_bands) and
    `+adaptive` (method.adaptive), so those variants never pool with the paper's method."""
    label = cfg.method.name
    if OmegaConf.select(cfg, "method.timestep_bands") is not None:
        label += "+tbands"
    if OmegaConf.select(cfg, "method.adaptive") is not None:
        label += "+adaptive"
    return label


def build_summary(
    cfg: DictConfig,
    cost: dict,
    net: torch.nn.Module,
    engine: SparseEngine | None,
    metrics: dict[str, Any],
    samples: list[str],
    checkpoints: list[dict],
    wall_time_s: float,
) -> dict:
    finite = {k: _to_float(v) for k, v in metrics.items()}
    summary = {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "method": method_label(cfg),
        "timestep_bands": None,  # replaced by the cost's per-band figures for timestep-band runs
        "sparsity": float(cfg.sparsity),
        "prune_rate": float(cfg.prune_rate),
        "update_interval": int(cfg.update_interval),
        "seed": int(cfg.seed),
        **{k: v for k, v in cost.items() if k != "layers"},
        "layers": layer_records(net, engine),
        **final_stored(net),
        "mask_updates": engine.num_updates if engine else 0,
        "mask_updates_skipped": engine.skipped_updates if engine else 0,
        "exploration_rate": engine.exploration_rate() if engine else 1.0,
        # method.adaptive: the p of every mask update ({step, prune_rate, loss_decrease})
        "prune_rate_effective": engine.adaptive.history if engine and engine.adaptive else None,
        "metrics": {k: (v if math.isfinite(v) else None) for k, v in finite.items()},
        "samples": samples,
        "checkpoints": checkpoints,  # [{path, step}], newest first
        "wall_time_s": wall_time_s,
    }
    return summary


def _finite_or_none(stats: dict[str, float] | None) -> dict[str, float | None] | None:
    return None if stats is None else {k: (v if math.isfinite(v) else None) for k, v in stats.items()}


def sketch_stats_entry(module: torch.nn.Module) -> dict:
    """`sketch_stats` ({samples, data, ...}) for modules that compute them (ChiroDiff), else {}."""
    record = getattr(module, "sketch_stats_record", None)
    if record is None:
        return {}
    return {
        "sketch_stats": {
            **record,
            "samples": _finite_or_none(record["samples"]),
            "data": _finite_or_none(record["data"]),
        }
    }


def backend_entry(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, layers: list[dict]
) -> dict[str, Any]:
    """`backend` (dense | sparse), each layer record with the `kernel` that trained it, and
    `train_memory`: tensor bytes of weights, gradients and optimizer state as measured at the end of
    the run (backend=sparse: also the dense tensors a masked run holds for the same state)."""
    backend = getattr(module, "sparse_backend", None)
    if backend is not None:
        kernels = backend.layer_kernels()
        details = backend.record(optimizer)
        memory = details.pop("memory")
    else:
        net = module.net
        kernels = {w.name: f"dense (torch {type(w.module).__name__}, masked)" for w in find_prunable(net)}
        details = {}
        state = optimizer.state_dict() if optimizer is not None else None
        dense = train_state_bytes(net.parameters(), state)
        dense["masks"] = tensor_bytes([b for n, b in net.named_buffers() if n.endswith(MASK_SUFFIX)])
        memory = {"dense": dense}
    return {
        "backend": "dense" if backend is None else backend.name,
        "backend_details": details,
        "layers": [{**layer, "kernel": kernels.get(layer["name"])} for layer in layers],
        "train_memory": memory,
    }


def write_summary(path: Path, summary: dict) -> Path:
    """Write (or merge into) summary.json; later writers such as evaluate add keys."""
    existing = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**existing, **summary}, indent=2))
    return path


def merge_results(summary_path: Path, result: dict[str, Any], steps: int, default_steps: int) -> None:
    """Record this evaluation; the headline FID follows the run's configured step count."""
    summary = json.loads(summary_path.read_text())
    update: dict[str, Any] = {STEPS_KEY: {**summary.get(STEPS_KEY, {}), str(steps): result}}
    if steps == default_steps or summary.get("fid") is None:
        update.update(result)
    write_summary(summary_path, update)
