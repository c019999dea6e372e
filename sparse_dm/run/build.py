"""Building a run from its config: datamodule, module and (for sparse methods) the engine."""

from __future__ import annotations

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from sparse_dm.planning.bands import timestep_bands
from sparse_dm.planning.cost import active_counts
from sparse_dm.run import checks as config
from sparse_dm.sparsity.engine import EmptyLayerError, SparseEngine, check_layer_budget
from sparse_dm.training.modules.diffusion import DiffusionModule


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


def build_run(cfg: DictConfig) -> tuple[DiffusionModule, L.LightningDataModule, SparseEngine | None]:
    """Datamodule, module and (for sparse methods) the engine with masks attached to module.net.

    Used by training and by evaluation (which then loads a checkpoint into the returned module).
    """
    config.validate(cfg)
    check_sparsity_budget(cfg)
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
