"""Building a run from its config: datamodule, module and (for sparse methods) the engine; for training
with backend=sparse, the compact layers (`attach_backend`)."""

from __future__ import annotations

import logging

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from sparse_dm.inference.calibrate import default_cache_dir
from sparse_dm.planning.bands import timestep_bands
from sparse_dm.planning.cost import active_counts
from sparse_dm.run import checks as config
from sparse_dm.sparse_backend import KernelUnavailable, load_train_kernels
from sparse_dm.sparse_backend.backend import SparseBackend
from sparse_dm.sparse_backend.model import NotConvertibleError, check_convertible
from sparse_dm.sparsity.engine import EmptyLayerError, SparseEngine, check_layer_budget
from sparse_dm.sparsity.masks import find_prunable
from sparse_dm.training.modules.diffusion import DiffusionModule

log = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """backend=sparse cannot run here (no C compiler, a failed kernel build); the message says why."""


def check_sparsity_budget(cfg: DictConfig) -> None:
    """Refuse, before data or weights exist, a sparsity that leaves a layer with no active weight
    (counts from the denoiser built on the meta device: no memory, no time)."""
    if cfg.method.name == "dense":
        return
    with torch.device("meta"):
        net = instantiate(cfg.model.net, _convert_="all")
    bands = timestep_bands(cfg)
    for key, sparsity in (
        [("sparsity", float(cfg.sparsity))]
        if bands is None
        else [(f"method.timestep_bands.sparsities[{k}]", s) for k, s in enumerate(bands.sparsities)]
    ):
        counts = active_counts(cfg, net, sparsity)
        try:
            check_layer_budget(list(counts), list(counts.values()))
        except EmptyLayerError as err:
            raise config.ConfigError(f"invalid config: {key}={sparsity}: {err}") from err


def check_sparse_backend_layers(cfg: DictConfig) -> None:
    """backend=sparse: refuse, before data or weights exist, a model whose masked weights include
    ones no compact layer trains (the Latent Diffusion UNet's convolutions), naming them."""
    if config.backend(cfg) != "sparse":
        return
    with torch.device("meta"):
        net = instantiate(cfg.model.net, _convert_="all")
    try:
        check_convertible(find_prunable(net, cfg.method.include, cfg.method.exclude))
    except NotConvertibleError as err:
        raise config.ConfigError(
            f"invalid config: backend=sparse with model={cfg.model.name}: {err}"
        ) from err


def attach_backend(
    cfg: DictConfig, module: DiffusionModule, engine: SparseEngine | None
) -> SparseBackend | None:
    """backend=sparse (training only): convert module.net to compact layers trained by the compiled
    kernels, in place. Without the kernels (no C compiler, a failed build) it stops and says why:
    there is no slower fallback. Call it after everything that reads the dense net (init_from, the
    cost report, the disk estimate) and before the Trainer is built."""
    if config.backend(cfg) != "sparse":
        return None
    if engine is None:
        raise config.ConfigError(
            "invalid config: backend=sparse needs a sparse method (static, rigl, magran)"
        )
    try:
        kernels = load_train_kernels(default_cache_dir())
    except KernelUnavailable as err:
        raise BackendUnavailable(
            f"backend=sparse needs the compiled training kernels (sparse_dm/kernels/csrc/sparse_train.c), "
            f"which are unavailable here: {err}. Train with backend=dense (masks over dense kernels, the "
            "same results, no speed-up), or make a C compiler available (gcc or clang, or CC=...)"
        ) from err
    backend = SparseBackend(module.net, module.ema, engine, kernels)
    module.attach_sparse_backend(backend)
    log.info(
        "backend=sparse: %d weight(s) in %d compact layer(s) (%s), kernels %s",
        len(engine.weights),
        len(backend.layers),
        ", ".join(layer.path for layer in backend.layers),
        kernels.library.name,
    )
    return backend


def build_run(cfg: DictConfig) -> tuple[DiffusionModule, L.LightningDataModule, SparseEngine | None]:
    """Datamodule, module and (for sparse methods) the engine with masks attached to module.net.

    Used by training and by evaluation (which then loads a checkpoint into the returned module).
    """
    config.validate(cfg)
    check_sparsity_budget(cfg)
    check_sparse_backend_layers(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    # Plain containers (not DictConfig) so checkpoints load with torch.load(weights_only=True).
    datamodule = instantiate(cfg.dataset, _convert_="all")
    module: DiffusionModule = instantiate(cfg.model, _convert_="all")
    engine: SparseEngine | None = None
    if cfg.method.name != "dense":  # conf/method/*: a partial of sparsity.factory.build_engine
        engine = instantiate(cfg.method, _convert_="all")(module.net)
        module.attach_engine(engine)  # a banded engine's router also becomes the denoiser call
    module.ema.remask(module.net)
    return module, datamodule, engine
