"""Objects come from config via hydra.utils.instantiate: the sparsity method (a partial of
sparsity.factory.build_engine fed by the top-level S/p/Te/seed and the diffusion's T), the
optimizer and LR schedule (partials the module calls), and checkpoints keep only their plain
config (torch.load(weights_only=True))."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from helpers.run_config import compose_config
from helpers.toy_diffusion import MODULE_KWARGS, ToyData, ToyModule, ToyNet
from hydra.utils import instantiate

from sparse_dm.sparsity import AdaptivePruneRate, BandedSparseEngine, SparseEngine, TimestepBands
from sparse_dm.sparsity.factory import build_engine

LR = MODULE_KWARGS["optimizer"].keywords["lr"]


@pytest.mark.parametrize("method", ["static", "rigl", "magran"])
def test_method_partial_takes_s_p_te_and_seed_from_the_top_level(tmp_path, method):
    cfg = compose_config(
        tmp_path, [f"method={method}", "sparsity=0.8", "prune_rate=0.1", "update_interval=7", "seed=3"]
    )
    build = instantiate(cfg.method, _convert_="all")
    assert isinstance(build, functools.partial) and build.func is build_engine
    engine = build(ToyNet())
    assert type(engine) is SparseEngine and engine.adaptive is None  # null bands/adaptive: one mask
    assert (engine.sparsity, engine.schedule.prune_rate, engine.schedule.interval, engine.seed) == (
        0.8,
        0.1,
        7,
        3,
    )
    assert engine.name == method and engine.dynamic == (method != "static")


def test_method_partial_builds_timestep_bands_and_adaptive_p_from_their_keys(tmp_path):
    cfg = compose_config(
        tmp_path,
        [
            "method=rigl",
            "sparsity=0.8",
            "method.timestep_bands={boundaries:[300],sparsities:[0.7,0.9]}",
            "method.adaptive={loss_ema_decay:0.9,min_prune_rate:0.1}",
        ],
    )
    engine = instantiate(cfg.method, _convert_="all")(ToyNet())
    bands = TimestepBands((300,), (0.7, 0.9), int(cfg.model.diffusion.num_timesteps))
    assert isinstance(engine, BandedSparseEngine) and engine.bands == bands
    assert isinstance(engine.adaptive, AdaptivePruneRate) and engine.adaptive.min_rate == 0.1


def test_optimizer_and_schedule_partials_from_the_model_config(tmp_path):
    cfg = compose_config(
        tmp_path,
        [
            "model.optimizer.lr=0.01",
            "+model.lr_scheduler._target_=torch.optim.lr_scheduler.LinearLR",
            "+model.lr_scheduler._partial_=true",
            "+model.lr_scheduler.start_factor=0.5",
            "+model.lr_scheduler.total_iters=4",
        ],
    )
    optimizer = instantiate(cfg.model.optimizer, _convert_="all")([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 0.01
    scheduler = instantiate(cfg.model.lr_scheduler)(optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LinearLR)


def test_lr_schedule_steps_per_optimizer_step_and_checkpoints_hold_plain_config(tmp_path):
    schedule = functools.partial(torch.optim.lr_scheduler.LinearLR, start_factor=0.5, total_iters=4)
    L.seed_everything(0)
    module = ToyModule(net=ToyNet(), lr_scheduler=schedule, **MODULE_KWARGS)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accumulate_grad_batches=2,  # the schedule counts optimizer steps, not micro-batches
    )
    trainer.fit(module, ToyData())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * (0.5 + 0.5 * 2 / 4))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]
    assert hparams["lr_scheduler"] == {
        "_target_": "torch.optim.lr_scheduler.LinearLR",
        "_partial_": True,
        "start_factor": 0.5,
        "total_iters": 4,
    }
    rebuilt = instantiate(hparams["optimizer"])([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(rebuilt, torch.optim.AdamW) and rebuilt.defaults["lr"] == LR
