"""Config checks that run before anything is built, so bad values fail fast with the key's name.

Each value has one rule. Keys that an object checks when it is built (SparseEngine's schedule and
criteria, MaskedEMA, NoiseSchedule, the sampling weights, the non-finite guard, the cost convention,
the timestep bands and the adaptive prune rate) are checked here by calling that object's own rule;
keys no object checks have their rule here; the rules between keys (dense <=> S = 0, sampling
steps <= T, a run length, what bands / adaptive p need of the method) are `check_cross_key_rules`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sparse_dm.data.stroke3 import TOO_LONG_POLICIES
from sparse_dm.diffusion.samplers import COMPVIS_MIN_STRIDE, DISCRETIZATIONS, SAMPLERS
from sparse_dm.diffusion.schedule import NoiseSchedule
from sparse_dm.sparsity import criteria
from sparse_dm.sparsity.distributions import check_distribution, check_sparsity
from sparse_dm.sparsity.ema import check_ema_settings
from sparse_dm.sparsity.engine import check_grad_ema_beta
from sparse_dm.sparsity.factory import adaptive_from, timestep_bands_from
from sparse_dm.sparsity.flops import check_convention
from sparse_dm.sparsity.schedule import UpdateSchedule
from sparse_dm.training.callbacks.nonfinite_guard import check_max_consecutive
from sparse_dm.training.modules.chirodiff import check_sketch_metric
from sparse_dm.training.modules.diffusion import check_sampling_weights

METHODS = ("dense", "static", "rigl", "magran")
BACKENDS = ("dense", "sparse")  # dense: masks over dense kernels; sparse: compact layers (sparse_backend)
SPARSE_BACKEND_PRECISIONS = ("32-true", "32", 32)  # the compiled training kernels are float32


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


@contextmanager
def _named_by_owner() -> Iterator[None]:
    """Errors of the objects that own a value's rule, as config errors (they name key and range)."""
    try:
        yield
    except ValueError as err:
        raise ConfigError(f"invalid config: {err}") from err


def _check_owned_values(cfg: DictConfig) -> None:
    """Values whose rule lives in the object that uses them, checked by that rule before anything
    is built (building a schedule or noise schedule is cheap; nothing touches data or weights)."""
    with _named_by_owner():
        check_sparsity(_get(cfg, "sparsity"))
        check_distribution(_get(cfg, "method.distribution"))
        criteria.get(criteria.PRUNE_CRITERIA, _get(cfg, "method.prune"), "method.prune")
        if _get(cfg, "method.grow") is not None:
            criteria.get(criteria.GROW_CRITERIA, cfg.method.grow, "method.grow")
        UpdateSchedule(
            _get(cfg, "update_interval"),
            _get(cfg, "prune_rate"),
            _get(cfg, "method.schedule"),
            _get(cfg, "method.end_step"),
            _get(cfg, "method.end_fraction"),
        )
        check_ema_settings(**OmegaConf.to_container(cfg.model.ema, resolve=True))
        check_sampling_weights(_get(cfg, "model.sampling.weights"))
        sketch_metric = OmegaConf.select(cfg, "model.sketch_metric")
        if sketch_metric is not None:
            check_sketch_metric(OmegaConf.to_container(sketch_metric, resolve=True))
        diffusion = cfg.model.diffusion
        NoiseSchedule(diffusion.schedule, diffusion.num_timesteps, diffusion.beta_start, diffusion.beta_end)
        check_convention(_get(cfg, "cost.convention"))
        if "nonfinite" in cfg:  # absent from run configs saved before it existed (evaluate re-reads those)
            check_max_consecutive(_get(cfg, "nonfinite.max_consecutive_losses"))
        _check_method_extras(cfg)


def _check_method_extras(cfg: DictConfig) -> None:
    """The optional method keys (absent from run configs saved before they existed; dense has none
    of grad_ema_beta): checked by the objects conf/method's factory builds from them."""
    beta = OmegaConf.select(cfg, "method.grad_ema_beta")
    if beta is not None:
        check_grad_ema_beta(beta)
    bands = OmegaConf.select(cfg, "method.timestep_bands")
    if bands is not None:
        timestep_bands_from(bands, int(cfg.model.diffusion.num_timesteps))
    adaptive = OmegaConf.select(cfg, "method.adaptive")
    if adaptive is not None:
        adaptive_from(adaptive)


def check_cross_key_rules(cfg: DictConfig) -> None:
    """Rules between keys: method <=> sparsity, sampling steps <= T (and the compvis bound), a run
    length, and what timestep bands / the adaptive prune rate need of the method."""
    if cfg.method.name == "dense" and cfg.sparsity != 0:
        raise ConfigError(
            f"invalid config: sparsity={cfg.sparsity} with method=dense; allowed: 0 (use static/rigl/magran)"
        )
    if cfg.method.name != "dense" and cfg.sparsity == 0:
        raise ConfigError(
            f"invalid config: sparsity=0 with method={cfg.method.name}; allowed: (0, 1) or method=dense"
        )
    steps = cfg.model.diffusion.num_timesteps
    _check(
        cfg, "model.sampling.steps", lambda v: _is_int(v) and 1 <= v <= steps, f"an integer in [1, {steps}]"
    )
    if OmegaConf.select(cfg, "model.sampling.discretization") == "compvis":
        most = steps // COMPVIS_MIN_STRIDE
        _check(
            cfg, "model.sampling.steps", lambda v: v <= most, f"an integer in [1, {most}] with compvis DDIM"
        )
    if cfg.trainer.max_steps == -1 and (cfg.trainer.get("max_epochs") in (None, -1)):
        raise ConfigError(
            "invalid config: trainer.max_steps=-1 and trainer.max_epochs unset; set one of them"
        )
    _check_beyond_paper_cross_keys(cfg)
    _check_backend(cfg)


def backend(cfg: DictConfig) -> str:
    """`backend` (absent from run configs saved before it existed: dense)."""
    return OmegaConf.select(cfg, "backend", default="dense")


def sparse_backend_refusal(cfg: DictConfig) -> str | None:
    """Why backend=sparse cannot train this config (the message a refusal gives), or None when it can:
    it needs masks (a sparse method), one mask per weight, a CPU trainer at 32-bit precision."""
    if cfg.method.name == "dense":
        return (
            "backend=sparse with method=dense (nothing is sparse); allowed: backend=dense, "
            "or a sparse method (static, rigl, magran)"
        )
    if OmegaConf.select(cfg, "method.timestep_bands") is not None:
        return (
            "backend=sparse with method.timestep_bands (one mask per band over one weight "
            "has no compact layer); allowed: method.timestep_bands=null or backend=dense"
        )
    accelerator = OmegaConf.select(cfg, "trainer.accelerator")
    if accelerator != "cpu":
        return f"trainer.accelerator={accelerator!r}; allowed: cpu with backend=sparse (CPU kernels)"
    precision = OmegaConf.select(cfg, "trainer.precision")
    if precision not in SPARSE_BACKEND_PRECISIONS:
        return (
            f"trainer.precision={precision!r}; allowed: one of {SPARSE_BACKEND_PRECISIONS} with "
            "backend=sparse (float32 kernels)"
        )
    return None


def _check_backend(cfg: DictConfig) -> None:
    _check(cfg, "backend", lambda v: v in BACKENDS, f"one of {BACKENDS}", optional=True)
    if backend(cfg) != "sparse":
        return
    refusal = sparse_backend_refusal(cfg)
    if refusal is not None:
        raise ConfigError(f"invalid config: {refusal}")


def _check_beyond_paper_cross_keys(cfg: DictConfig) -> None:
    """method.timestep_bands needs masks; method.adaptive needs masks that change and a floor
    min_prune_rate <= prune_rate."""
    if OmegaConf.select(cfg, "method.timestep_bands") is not None and cfg.method.name == "dense":
        raise ConfigError("invalid config: method.timestep_bands with method=dense; allowed: null")
    adaptive = OmegaConf.select(cfg, "method.adaptive")
    if adaptive is None:
        return
    if cfg.method.grow is None:
        raise ConfigError(
            f"invalid config: method.adaptive with method={cfg.method.name}, whose masks never change; "
            "allowed: null (or a dynamic method: rigl, magran)"
        )
    if adaptive.min_prune_rate > cfg.prune_rate:
        raise ConfigError(
            f"invalid config: method.adaptive.min_prune_rate={adaptive.min_prune_rate} with "
            f"prune_rate={cfg.prune_rate}; allowed: a number in (0, prune_rate]"
        )


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"invalid config: {key}={value!r}; allowed: one of {allowed}")


def validate(cfg: DictConfig) -> None:
    """Reject invalid values before data or models are built: keys no object checks (here), keys
    their objects check (through those objects' own rules), then the rules between keys."""
    _check(cfg, "method.name", lambda v: v in METHODS, f"one of {METHODS}")
    _check_owned_values(cfg)
    _check(cfg, "seed", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
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
    _check(cfg, "model.optimizer.lr", lambda v: _is_number(v) and v > 0, "a number > 0")
    _check(cfg, "model.optimizer.weight_decay", lambda v: _is_number(v) and v >= 0, "a number >= 0", True)
    _check(cfg, "model.sampling.sampler", lambda v: v in SAMPLERS, f"one of {SAMPLERS}")
    _check(
        cfg,
        "model.sampling.discretization",
        lambda v: v in DISCRETIZATIONS,
        f"one of {DISCRETIZATIONS}",
        True,
    )
    _check(cfg, "model.scale_lr", lambda v: isinstance(v, bool), "true or false", optional=True)
    _check(cfg, "model.sampling.num_samples", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    _check(
        cfg,
        "model.validation.band_boundaries",
        lambda v: len(v) >= 1 and all(_is_int(b) for b in v) and list(v) == sorted(set(v))
        and v[0] > 0 and v[-1] < int(_get(cfg, "model.diffusion.num_timesteps")),
        "null or a strictly increasing list of integer timesteps inside (0, model.diffusion.num_timesteps)",
        optional=True,
    )  # fmt: skip
    _check(cfg, "trainer.max_steps", lambda v: _is_int(v) and (v == -1 or v >= 1), "-1 or an integer >= 1")
    _check(
        cfg,
        "trainer.max_epochs",
        lambda v: _is_int(v) and (v == -1 or v >= 1),
        "-1 or an integer >= 1",
        optional=True,
    )
    check_cross_key_rules(cfg)
