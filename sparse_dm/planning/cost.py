"""Parameters, FLOPs and resources of a run, from its config, before it trains.

The model is built on the meta device (no memory, no weights), one batch-1 forward with hooks measures how
often each weight is used, and the method's exact per-layer counts give the sparse figures.
"""

from __future__ import annotations

import logging

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from sparse_dm.planning.bands import banded_cost, timestep_bands
from sparse_dm.planning.disk import GIB, disk_estimate
from sparse_dm.planning.memory import training_memory
from sparse_dm.planning.run_length import TrainingSetUnknown, train_steps
from sparse_dm.sparsity import criteria
from sparse_dm.sparsity.distributions import layer_counts
from sparse_dm.sparsity.flops import cost_summary, measure_weight_uses
from sparse_dm.sparsity.masks import MASK_SUFFIX, find_prunable
from sparse_dm.sparsity.schedule import UpdateSchedule

log = logging.getLogger(__name__)


def active_counts(cfg: DictConfig, net: torch.nn.Module, sparsity: float | None = None) -> dict[str, int]:
    """Active weights per prunable layer, exactly as the engine will initialise them (at `sparsity`,
    default the config's; a timestep band passes its own)."""
    weights = find_prunable(net, cfg.method.include, cfg.method.exclude)
    sparsity = float(cfg.sparsity) if sparsity is None else sparsity
    counts = layer_counts([tuple(w.param.shape) for w in weights], sparsity, cfg.method.distribution)
    return {w.name: c for w, c in zip(weights, counts, strict=True)}


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
    criterion = None if grow is None else criteria.get(criteria.GROW_CRITERIA, grow, "method.grow")
    dense_grads = criterion is not None and criterion.needs_grad
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
    summary_args = dict(
        sampling_steps=int(cfg.model.sampling.steps),
        train_steps=steps,
        batch_size=int(cfg.dataset.batch_size),
        update_interval=int(cfg.update_interval) if dense_grads else None,
        dense_grad_updates=dense_grads,
        convention=cfg.cost.convention,
        update_window=window,
        dense_grad_every_step=criterion is not None and criterion.needs_grad_ema,
    )
    bands = timestep_bands(cfg)
    if bands is None:
        cost = cost_summary(net, uses, active, **summary_args)
    else:
        per_band = [
            cost_summary(net, uses, active_counts(cfg, net, s), **summary_args) for s in bands.sparsities
        ]
        cost = banded_cost(cfg, bands, per_band, uses, lambda s: active_counts(cfg, net, s))
    if bands is None:
        cost["params_stored"], cost["params_stored_basis"] = cost["params_active"], "one mask"
    measured = stored_counts(net)
    if measured is not None and bands is not None:
        cost["params_stored"], cost["params_stored_basis"] = sum(measured.values()), "measured from the masks"
    planned = schedule.num_updates() if grow is not None else 0
    return {**cost, "mask_updates_planned": planned, "mask_updates_stop_step": stop if grow else None}


def stored_counts(net: torch.nn.Module) -> dict[str, int] | None:
    """Active positions of each `<param>_mask` (with timestep bands: the union of the band masks, what a
    checkpoint and memory hold); None before masks exist (a dense run, or a net on the meta device)."""
    masks = {name.removesuffix(MASK_SUFFIX): mask for name, mask in net.named_buffers()
             if name.endswith(MASK_SUFFIX)}  # fmt: skip
    if not masks or any(mask.is_meta for mask in masks.values()):
        return None
    return {name: int(mask.sum()) for name, mask in masks.items()}


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
    lines.append(f"{'params_stored':<30} {cost['params_stored']:>16,}  ({cost['params_stored_basis']})")
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
    bands = cost.get("timestep_bands")
    for band in bands["bands"] if bands else []:
        lines.append(
            f"band t in [{band['t_range'][0]}, {band['t_range'][1]}): sparsity {band['sparsity']}, "
            f"{band['params_active']:,} active, forward {band['flops_forward_ratio']:.4f} of dense, "
            f"{band['sampling_steps']} sampling steps"
        )
    if bands:
        lines.append(
            f"{'equal_sampling_flops_sparsity':<30} {bands['equal_sampling_flops_sparsity']:>16.4f}"
            "  (the single mask with the same average sampling FLOPs)"
        )
        lines.append(
            f"{'equal_stored_params_sparsity':<30} {bands['equal_stored_params_sparsity']:>16.4f}"
            "  (the single mask that stores as many weights as the union of the band masks)"
        )
    return "\n".join(lines)


def mask_bytes(cfg: DictConfig, net: torch.nn.Module) -> int:
    """Bytes of the boolean masks the engine will attach (none for dense; with timestep bands, the
    union plus one mask per band)."""
    if cfg.method.name == "dense":
        return 0
    masks = find_prunable(net, cfg.method.include, cfg.method.exclude)
    bands = timestep_bands(cfg)
    per_weight = 1 if bands is None else 1 + bands.num_bands
    return per_weight * sum(w.param.numel() for w in masks) * torch.empty(0, dtype=torch.bool).element_size()


def compute_resources(cfg: DictConfig, module: torch.nn.Module) -> dict:
    """Checkpoint size, disk needed by the checkpoint policy and GPU memory per training step."""
    masks = mask_bytes(cfg, module.net)
    try:
        disk: dict | None = disk_estimate(cfg, module, extra_state_bytes=masks)
    except TrainingSetUnknown as err:
        log.warning("%s; disk needs are reported as null", err)
        disk = None
    batch = int(cfg.dataset.batch_size)
    return {"disk": disk, "gpu_memory": training_memory(module, batch, masks), "batch_size": batch}


def format_resources(resources: dict) -> str:
    disk, memory = resources["disk"], resources["gpu_memory"]
    lines = [""]
    if disk is None:
        lines.append(f"{'checkpoint / disk':<30} {'n/a (training-set size unknown)':>16}")
    else:
        files = ", ".join(f"{k} {v}" for k, v in disk["checkpoint_files"].items())
        lines += [
            f"{'checkpoint_size_gib':<30} {disk['checkpoint_bytes'] / GIB:>16.3f}",
            f"{'train_steps':<30} {disk['train_steps']:>16,}",
            f"{'checkpoint_files':<30} {sum(disk['checkpoint_files'].values()):>16,}  ({files})",
            f"{'disk_needed_gib':<30} {disk['disk_bytes_needed'] / GIB:>16.3f}",
        ]
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in memory.items() if k != "total")
    lines.append(
        f"{'gpu_memory_gib':<30} {memory['total'] / GIB:>16.2f}  (batch {resources['batch_size']}: {parts})"
    )
    return "\n".join(lines)
