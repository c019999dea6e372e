"""`python -m sparse_dm.cost <train overrides>`: parameters and FLOPs of a run without training.

The model is built on the meta device (no memory, no weights), one batch-1 forward with hooks
measures how often each weight is used, and the method's exact per-layer counts give the sparse
figures. Writes cost.json in the run's output dir and prints a table.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from sparse_dm import config
from sparse_dm.sparsity import criteria
from sparse_dm.sparsity.distributions import layer_counts
from sparse_dm.sparsity.flops import cost_summary, measure_weight_uses
from sparse_dm.sparsity.masks import find_prunable
from sparse_dm.sparsity.schedule import UpdateSchedule

log = logging.getLogger(__name__)


def active_counts(cfg: DictConfig, net: torch.nn.Module) -> dict[str, int]:
    """Active weights per prunable layer, exactly as the engine will initialise them."""
    weights = find_prunable(net, cfg.method.include, cfg.method.exclude)
    counts = layer_counts([tuple(w.param.shape) for w in weights], cfg.sparsity, cfg.method.distribution)
    return {w.name: c for w, c in zip(weights, counts, strict=True)}


class TrainingSetUnknown(RuntimeError):
    """Epoch-based train FLOPs need the training-set size, and neither config nor data gives it."""


def num_train_samples(cfg: DictConfig) -> int:
    """The training-set size: the configured subset size, else counted from the datamodule."""
    if cfg.cost.num_train is not None:
        return int(cfg.cost.num_train)
    try:
        return int(instantiate(cfg.dataset, _convert_="all").num_train_samples())
    except (MissingMandatoryValue, FileNotFoundError) as err:
        raise TrainingSetUnknown(
            "train FLOPs need the training-set size: set dataset.num_train=N or point the dataset at "
            f"its data ({err})"
        ) from err


def train_steps(cfg: DictConfig) -> int:
    """Optimizer steps of the run: max_steps, or epochs x ceil(N / (batch x devices x accumulation))."""
    trainer = cfg.trainer
    max_steps = int(trainer.max_steps)
    max_epochs = trainer.get("max_epochs")
    if max_epochs in (None, -1):
        return max_steps
    devices = trainer.devices if isinstance(trainer.devices, int) and trainer.devices > 0 else 1
    batches = math.ceil(num_train_samples(cfg) / (cfg.dataset.batch_size * devices))
    by_epochs = int(max_epochs) * math.ceil(batches / int(trainer.get("accumulate_grad_batches", 1)))
    return by_epochs if max_steps == -1 else min(max_steps, by_epochs)


def compute_cost(cfg: DictConfig, module: torch.nn.Module | None = None) -> dict:
    """All cost figures of a config. Without a built module, the model is built on the meta device
    (no memory); a training run passes its own module (one batch-1 forward, faster than meta for RNNs)."""
    if module is None:
        with torch.device("meta"):
            module = instantiate(cfg.model, _convert_="all")
    net = module.net
    uses = measure_weight_uses(net, module.example_net_inputs(1))
    active = {w.name: w.numel for w in uses} if cfg.method.name == "dense" else active_counts(cfg, net)
    grow = cfg.method.grow
    dense_grads = grow is not None and criteria.get(criteria.GROW_CRITERIA, grow, "method.grow").needs_grad
    try:
        steps: int | None = train_steps(cfg)
    except TrainingSetUnknown as err:
        log.warning("%s; train FLOPs are reported as null", err)
        steps = None
    schedule = UpdateSchedule(
        int(cfg.update_interval),
        float(cfg.prune_rate),
        cfg.method.schedule,
        cfg.method.end_step,
        cfg.method.end_fraction,
        steps,
    )
    stop = schedule.stop_step
    window = min(1.0, stop / steps) if stop is not None and steps else (cfg.method.end_fraction or 1.0)
    cost = cost_summary(
        net,
        uses,
        active,
        sampling_steps=int(cfg.model.sampling.steps),
        train_steps=steps,
        batch_size=int(cfg.dataset.batch_size),
        update_interval=int(cfg.update_interval) if dense_grads else None,
        dense_grad_updates=dense_grads,
        convention=cfg.cost.convention,
        update_window=window,
    )
    planned = schedule.num_updates() if grow is not None else 0
    return {**cost, "mask_updates_planned": planned, "mask_updates_stop_step": stop if grow else None}


def _fmt(value: float | None, spec: str) -> str:
    return f"{'n/a':>16}" if value is None else f"{value:>16{spec}}"


def format_table(cost: dict) -> str:
    """A human-readable summary of a cost dict."""
    lines = [f"{'layer':<60} {'shape':<22} {'density':>8} {'nnz':>12}"]
    for layer in cost["layers"]:
        shape = "x".join(map(str, layer["shape"]))
        lines.append(f"{layer['name']:<60} {shape:<22} {layer['density']:>8.4f} {layer['nnz']:>12,}")
    lines.append("")
    for key in ("params_total", "params_prunable", "params_active"):
        lines.append(f"{key:<30} {cost[key]:>16,}")
    for key in (
        "flops_forward_dense",
        "flops_forward",
        "flops_test_per_sample_dense",
        "flops_test_per_sample",
        "flops_train_dense",
        "flops_train",
    ):
        lines.append(f"{key:<30} {_fmt(cost[key], '.4e')}")
    for key in ("flops_train_ratio", "flops_test_ratio"):
        lines.append(f"{key:<30} {_fmt(cost[key], '.4f')}")
    lines.append(
        f"{'train_steps':<30} {_fmt(cost['train_steps'], ',')}  (convention: {cost['flops_convention']})"
    )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="cost")
def main(cfg: DictConfig) -> None:
    config.validate(cfg)
    cost = compute_cost(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(cost, indent=2))
    print(format_table(cost))
    print(f"\nwrote {out / 'cost.json'}")


if __name__ == "__main__":
    main()
