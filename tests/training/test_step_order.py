"""The order of one optimizer step's sparse bookkeeping, as `SparseStep` documents it:
gradient mask -> clip -> step -> re-mask -> EMA -> (update steps) explore -> EMA mask policy.

Recorded through the Lightning path (DiffusionModule hooks, Lightning's clipping and optimizer step,
gradient accumulation) and through `SparseStep.step` for plain loops."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from helpers.toy_diffusion import ToyData, make_module

from sparse_dm.sparsity import SparseEngine
from sparse_dm.sparsity.step import SparseStep
from sparse_dm.training.callbacks.dst import DSTCallback

INTERVAL = 3
STEPS = 7  # updates at steps 3 and 6
PLAIN_STEP = ["mask_grads", "clip", "optimizer_step", "remask", "ema_update"]
UPDATE_STEP = [*PLAIN_STEP, "explore", "ema_masks_changed"]


def record(calls: list[str], name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return wrapper


def instrument(engine: SparseEngine, ema, optimizer: torch.optim.Optimizer, calls: list[str]) -> None:
    engine.before_step = record(calls, "mask_grads", engine.before_step)
    engine.remask = record(calls, "remask", engine.remask)
    ema.update = record(calls, "ema_update", ema.update)
    ema.masks_changed = record(calls, "ema_masks_changed", ema.masks_changed)
    explore_if_due = engine.explore_if_due

    def explore(*args, **kwargs):
        report = explore_if_due(*args, **kwargs)
        if report is not None:
            calls.append("explore")
        return report

    engine.explore_if_due = explore
    optimizer.register_step_post_hook(lambda *_: calls.append("optimizer_step"))


def expected() -> list[str]:
    return [
        name for step in range(1, STEPS + 1) for name in (UPDATE_STEP if step % INTERVAL == 0 else PLAIN_STEP)
    ]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_step_runs_in_the_documented_order(tmp_path, accumulate):
    L.seed_everything(0)
    module = make_module()
    engine = SparseEngine(module.net, 0.6, grow="gradient", prune_rate=0.3, update_interval=INTERVAL)
    module.attach_engine(engine)
    calls: list[str] = []

    class Instrument(L.Callback):
        def on_train_start(self, trainer, pl_module):
            instrument(engine, pl_module.ema, trainer.optimizers[0], calls)

    clip = module.configure_gradient_clipping
    module.configure_gradient_clipping = lambda *a, **k: (calls.append("clip"), clip(*a, **k))
    L.Trainer(
        default_root_dir=tmp_path,
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        accumulate_grad_batches=accumulate,
        callbacks=[DSTCallback(engine), Instrument()],
    ).fit(module, ToyData())
    assert calls == expected()
    assert engine.num_updates == 2


def test_plain_loop_step_runs_in_the_documented_order():
    torch.manual_seed(0)
    module = make_module()
    net = module.net
    engine = SparseEngine(net, 0.6, grow="gradient", prune_rate=0.3, update_interval=INTERVAL)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    step = SparseStep(net, module.ema, engine)
    calls: list[str] = []
    instrument(engine, module.ema, optimizer, calls)
    x, t = torch.randn(8, 2), torch.randint(0, 100, (8,))
    for _ in range(STEPS):
        optimizer.zero_grad()
        net(x, t).pow(2).mean().backward()
        step.step(
            optimizer,
            clip=lambda: (calls.append("clip"), torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)),
        )
    assert calls == expected()
