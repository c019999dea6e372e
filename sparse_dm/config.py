"""Config checks that run before anything is built, so bad values fail fast with the key's name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sparse_dm.data.stroke3 import TOO_LONG_POLICIES
from sparse_dm.diffusion.samplers import COMPVIS_MIN_STRIDE, DISCRETIZATIONS, SAMPLERS
from sparse_dm.lightning.diffusion_module import SAMPLING_WEIGHTS
from sparse_dm.sparsity.adaptive import check_adaptive
from sparse_dm.sparsity.criteria import GROW_CRITERIA, PRUNE_CRITERIA
from sparse_dm.sparsity.distributions import DISTRIBUTIONS
from sparse_dm.sparsity.ema import MASK_UPDATE_POLICIES
from sparse_dm.sparsity.flops import CONVENTIONS
from sparse_dm.sparsity.schedule import SCHEDULES
from sparse_dm.sparsity.timestep_bands import check_bands

METHODS = ("dense", "static", "rigl", "magran")


class ConfigError(ValueError):
    """An invalid config value; the message names the key and the allowed values."""


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def _check(
    cfg: DictConfig, key: str, ok: Callable[[Any], bool], allowed: str, optional: bool = False
) -> None:
    value = _get(cfg, key)
    if value is None and optional:
        return
    try:
        valid = ok(value)
    except TypeError:
        valid = False
    if not valid:
        raise ConfigError(f"invalid config: {key}={value!r}; allowed: {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def validate(cfg: DictConfig) -> None:
    """Reject invalid sparsity/method/optimisation values before data or models are built."""
    _check(cfg, "method.name", lambda v: v in METHODS, f"one of {METHODS}")
    _check(cfg, "sparsity", lambda v: _is_number(v) and 0.0 <= v < 1.0, "a number in [0, 1)")
    if cfg.method.name == "dense" and cfg.sparsity != 0:
        raise ConfigError(
            f"invalid config: sparsity={cfg.sparsity} with method=dense; allowed: 0 (use static/rigl/magran)"
        )
    if cfg.method.name != "dense" and cfg.sparsity == 0:
        raise ConfigError(
            f"invalid config: sparsity=0 with method={cfg.method.name}; allowed: (0, 1) or method=dense"
        )
    _check(cfg, "prune_rate", lambda v: _is_number(v) and 0.0 < v <= 1.0, "a number in (0, 1]")
    _check(cfg, "update_interval", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    _check(cfg, "seed", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check(cfg, "method.distribution", lambda v: v in DISTRIBUTIONS, f"one of {DISTRIBUTIONS}")
    _check(cfg, "method.prune", lambda v: v in PRUNE_CRITERIA, f"one of {sorted(PRUNE_CRITERIA)}")
    _check(cfg, "method.grow", lambda v: v in GROW_CRITERIA, f"one of {sorted(GROW_CRITERIA)}", optional=True)
    _check(cfg, "method.schedule", lambda v: v in SCHEDULES, f"one of {SCHEDULES}")
    _check(cfg, "method.end_step", lambda v: _is_int(v) and v >= 1, "null or an integer >= 1", optional=True)
    _check(
        cfg,
        "method.end_fraction",
        lambda v: _is_number(v) and 0.0 < v <= 1.0,
        "null or a number in (0, 1]",
        optional=True,
    )
    if cfg.method.schedule == "cosine" and cfg.method.end_step is None and cfg.method.end_fraction is None:
        raise ConfigError(
            "invalid config: method.schedule=cosine decays to 0 at the last update; allowed: set "
            "method.end_fraction (e.g. 0.75) or method.end_step"
        )
    validate_beyond_paper(cfg)
    _check(cfg, "dataset.batch_size", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    _check(
        cfg, "dataset.num_train", lambda v: _is_int(v) and v >= 1, "null or an integer >= 1", optional=True
    )
    _check(cfg, "dataset.max_len", lambda v: _is_int(v) and v >= 2, "an integer >= 2", optional=True)
    _check(
        cfg,
        "dataset.too_long",
        lambda v: v in TOO_LONG_POLICIES,
        f"one of {TOO_LONG_POLICIES}",
        optional=True,
    )
    if "nonfinite" in cfg:  # absent from run configs saved before it existed (evaluate re-reads those)
        _check(cfg, "nonfinite.max_consecutive_losses", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    _check(cfg, "model.optimizer.lr", lambda v: _is_number(v) and v > 0, "a number > 0")
    _check(cfg, "model.optimizer.weight_decay", lambda v: _is_number(v) and v >= 0, "a number >= 0")
    _check(cfg, "model.ema.decay", lambda v: _is_number(v) and 0.0 <= v < 1.0, "a number in [0, 1)")
    _check(cfg, "model.ema.warmup", lambda v: isinstance(v, bool), "true or false")
    _check(
        cfg, "model.ema.on_mask_update", lambda v: v in MASK_UPDATE_POLICIES, f"one of {MASK_UPDATE_POLICIES}"
    )
    _check(cfg, "model.sampling.weights", lambda v: v in SAMPLING_WEIGHTS, f"one of {SAMPLING_WEIGHTS}")
    steps = _get(cfg, "model.diffusion.num_timesteps")
    _check(cfg, "model.diffusion.num_timesteps", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    _check(
        cfg, "model.sampling.steps", lambda v: _is_int(v) and 1 <= v <= steps, f"an integer in [1, {steps}]"
    )
    _check(cfg, "model.sampling.sampler", lambda v: v in SAMPLERS, f"one of {SAMPLERS}")
    _check(
        cfg,
        "model.sampling.discretization",
        lambda v: v in DISCRETIZATIONS,
        f"one of {DISCRETIZATIONS}",
        True,
    )
    if OmegaConf.select(cfg, "model.sampling.discretization") == "compvis":
        most = steps // COMPVIS_MIN_STRIDE
        _check(
            cfg, "model.sampling.steps", lambda v: v <= most, f"an integer in [1, {most}] with compvis DDIM"
        )
    _check(cfg, "model.optimizer.scale_lr", lambda v: isinstance(v, bool), "true or false", optional=True)
    _check(cfg, "model.sampling.num_samples", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    _check(cfg, "cost.convention", lambda v: v in CONVENTIONS, f"one of {CONVENTIONS}")
    _check(cfg, "trainer.max_steps", lambda v: _is_int(v) and (v == -1 or v >= 1), "-1 or an integer >= 1")
    _check(
        cfg,
        "trainer.max_epochs",
        lambda v: _is_int(v) and (v == -1 or v >= 1),
        "-1 or an integer >= 1",
        optional=True,
    )
    if cfg.trainer.max_steps == -1 and (cfg.trainer.get("max_epochs") in (None, -1)):
        raise ConfigError(
            "invalid config: trainer.max_steps=-1 and trainer.max_epochs unset; set one of them"
        )


def validate_beyond_paper(cfg: DictConfig) -> None:
    """method.timestep_bands and method.adaptive (both optional: null or absent = the paper's method)."""
    bands = OmegaConf.select(cfg, "method.timestep_bands")
    adaptive = OmegaConf.select(cfg, "method.adaptive")
    if bands is not None:
        if cfg.method.name == "dense":
            raise ConfigError("invalid config: method.timestep_bands with method=dense; allowed: null")
        if not isinstance(bands, DictConfig) or set(bands) != {"boundaries", "sparsities"}:
            raise ConfigError(
                f"invalid config: method.timestep_bands={bands!r}; allowed: null or "
                "{boundaries: [t_1, ...], sparsities: [S_0, ..., S_K-1]}"
            )
        try:
            check_bands(
                list(bands.boundaries), list(bands.sparsities), int(cfg.model.diffusion.num_timesteps)
            )
        except ValueError as err:
            raise ConfigError(str(err)) from err
    if adaptive is not None:
        if cfg.method.grow is None:
            raise ConfigError(
                f"invalid config: method.adaptive with method={cfg.method.name}, whose masks never change; "
                "allowed: null (or a dynamic method: rigl, magran)"
            )
        if not isinstance(adaptive, DictConfig) or set(adaptive) != {"loss_ema_decay", "min_prune_rate"}:
            raise ConfigError(
                f"invalid config: method.adaptive={adaptive!r}; allowed: null or "
                "{loss_ema_decay: [0, 1), min_prune_rate: (0, prune_rate]}"
            )
        try:
            check_adaptive(adaptive.loss_ema_decay, adaptive.min_prune_rate, float(cfg.prune_rate))
        except ValueError as err:
            raise ConfigError(str(err)) from err
