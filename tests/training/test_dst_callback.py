"""The Lightning adapter (DiffusionModule + SparseStep + DSTCallback): step counting under
accumulation, masked EMA, checkpoint -> resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers.toy_diffusion import ToyData, make_module
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins import MixedPrecision

from sparse_dm.sparsity import MaskedEMA, SparseEngine
from sparse_dm.training.callbacks.dst import DSTCallback
from sparse_dm.training.callbacks.rng_state import RNGStateCallback


def trainer(tmp_path, max_steps: int, callbacks, **kwargs) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        **kwargs,
    )


def sparse_run(seed: int = 0, interval: int = 4, init_seed: int = 0, grow: str = "random"):
    L.seed_everything(init_seed)
    module = make_module()
    engine = SparseEngine(module.net, 0.6, grow=grow, prune_rate=0.3, update_interval=interval, seed=seed)
    module.attach_engine(engine)
    module.ema.remask(module.net)
    return module, engine, DSTCallback(engine)


def test_update_interval_counts_optimizer_steps_under_accumulation(tmp_path):
    module, engine, callback = sparse_run()
    trainer(tmp_path, 12, [callback], accumulate_grad_batches=3, enable_checkpointing=False).fit(
        module, ToyData()
    )
    assert engine.step == 12
    assert engine.num_updates == 2  # steps 4 and 8 of 36 micro-batches; never on the final step 12
    for weight, target in zip(engine.weights, engine.target_counts, strict=True):
        assert int(weight.mask.sum()) == target
        assert not weight.param[~weight.mask].any()


def test_ema_weights_are_masked_and_updated_after_remasking(tmp_path):
    module, engine, callback = sparse_run()
    trainer(tmp_path, 10, [callback], enable_checkpointing=False).fit(module, ToyData())
    buffers = dict(module.ema.named_buffers())
    for weight in engine.weights:
        shadow = buffers[weight.name.replace(".", "__")]
        assert not shadow[~weight.mask].any(), "EMA keeps pruned weights alive"
        assert shadow[weight.mask].any()
    for buffer in module.net.buffers():
        if buffer.dtype == torch.bool:
            break
    else:
        pytest.fail("masks are not bool buffers")


@pytest.mark.parametrize(  # mid-epoch, epoch boundary, mid-epoch (8 batches/epoch)
    ("stop_at", "grow"), [(5, "random"), (8, "random"), (11, "random"), (5, "momentum")]
)
def test_checkpoint_resume_reproduces_uninterrupted_run(tmp_path, stop_at, grow):
    """Momentum growth: its dense-gradient average must come back from the checkpoint too."""
    module, engine, callback = sparse_run(grow=grow)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=stop_at, save_top_k=-1)
    trainer(tmp_path / "full", 16, [callback, RNGStateCallback(), saver]).fit(module, ToyData())

    resumed, resumed_engine, resumed_cb = sparse_run(init_seed=123, grow=grow)  # other init: overwritten
    trainer(tmp_path / "resumed", 16, [resumed_cb, RNGStateCallback()], enable_checkpointing=False).fit(
        resumed, ToyData(), ckpt_path=tmp_path / f"step={stop_at}.ckpt"
    )
    assert resumed_engine.step == engine.step == 16
    assert resumed_engine.num_updates == engine.num_updates == 3  # 4, 8, 12 (not the final step 16)
    for a, b in zip(engine.weights, resumed_engine.weights, strict=True):
        assert torch.equal(a.mask, b.mask), a.name
    for (name, a), b in zip(module.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed_engine.exploration_rate() == engine.exploration_rate()
    if grow == "momentum":
        for a, b in zip(engine.grad_ema, resumed_engine.grad_ema, strict=True):
            assert torch.equal(a, b)


def _shadow(module, name: str) -> torch.Tensor:
    return module.ema.get_buffer(name.replace(".", "__"))


@pytest.mark.parametrize("policy", ["resync", "remask"])
def test_ema_follows_the_mask_update_policy(tmp_path, policy):
    """resync: right after an update the EMA *is* the live network and its warm-up restarts;
    remask: kept weights keep their averaged history, pruned positions are zero."""
    module, engine, callback = sparse_run(interval=3)
    module.ema.on_mask_update = policy
    seen: dict[str, object] = {}

    class Check(L.Callback):  # runs after the DST callback of the same step
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step != 3:
                return
            seen["num_updates"] = int(pl_module.ema.num_updates)
            seen["equal"] = all(
                torch.equal(_shadow(pl_module, n), p) for n, p in pl_module.net.named_parameters()
            )
            seen["clean"] = all(not _shadow(pl_module, w.name)[~w.mask].any() for w in engine.weights)

    trainer(tmp_path, 4, [callback, Check()], enable_checkpointing=False).fit(module, ToyData())
    assert engine.num_updates == 1 and seen["clean"]
    if policy == "resync":
        assert seen["equal"] and seen["num_updates"] == 0
    else:
        assert not seen["equal"] and seen["num_updates"] == 3


def test_ema_warmup_forgets_the_random_initialisation():
    """Without warm-up a 0.995 EMA still holds 0.995**50 = 78% of the initial weights after 50
    steps (the cause of the scribbled default samples in issue 8)."""
    net = torch.nn.Linear(4, 4)
    ema = MaskedEMA(net, decay=0.995)
    assert ema.current_decay() == pytest.approx(0.1)
    with torch.no_grad():
        net.weight.add_(1.0)
    for _ in range(50):
        ema.update(net)
    assert torch.allclose(ema.get_buffer("weight"), net.weight, atol=0.05)
    assert int(ema.state_dict()["num_updates"]) == 50
    assert ema.current_decay() == pytest.approx(51 / 60)


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_validation_logs_ema_and_raw_loss(tmp_path, weights):
    module, _, callback = sparse_run()
    module.sampling_cfg["weights"] = weights
    fit = trainer(tmp_path, 6, [callback], enable_checkpointing=False)
    fit.limit_val_batches = 2
    fit.fit(module, ToyData())
    fit.validate(module, ToyData(), verbose=False)
    metrics = fit.callback_metrics
    assert float(metrics["val/loss_ema"]) != float(metrics["val/loss_raw"])
    assert float(metrics["val/loss"]) == float(metrics[f"val/loss_{weights}"])


@pytest.mark.parametrize("where", ["loss", "bias"])
def test_amp_overflow_at_an_update_step_skips_the_update(tmp_path, where):
    """fp16 AMP: the grad scaler skips an overflowing step but Lightning still advances
    global_step; the update due at that step must be skipped too (before: pruned, not regrown).
    An overflow only in a dense bias leaves the prunable gradients finite: only the scaler knows."""
    module, engine, callback = sparse_run(interval=3)
    original = type(module).training_step

    def overflow(value):
        return value * float("inf") if module.trainer.global_step == 2 else value

    def overflow_at_update(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss if where == "bias" else overflow(loss)

    module.training_step = overflow_at_update.__get__(module)
    if where == "bias":
        module.net.out.bias.register_hook(overflow)
    amp = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer(tmp_path, 7, [callback], plugins=[amp], enable_checkpointing=False).fit(module, ToyData())
    assert (engine.num_updates, engine.skipped_updates) == (1, 1)  # step 3 skipped, step 6 ran
    engine.check_masks()
    for weight in engine.weights:
        assert not weight.param[~weight.mask].any()


class FakeWandbRun:
    """Stands in for wandb's Run object behind a real WandbLogger: records every `log` call."""

    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log(self, data: dict, *args, **kwargs) -> None:
        self.logged.append(dict(data))


def test_every_mask_update_logs_density_per_layer_and_exploration_to_wandb(tmp_path):
    module, engine, callback = sparse_run(interval=3)
    wandb_logger = WandbLogger(save_dir=str(tmp_path), mode="offline")
    run = FakeWandbRun()
    wandb_logger._experiment = run
    L.Trainer(
        default_root_dir=tmp_path,
        max_steps=10,
        accelerator="cpu",
        logger=wandb_logger,
        log_every_n_steps=100,  # only the update logs, not the training loss
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[callback],
    ).fit(module, ToyData())
    updates = [entry for entry in run.logged if "sparsity/exploration_rate" in entry]
    assert [entry["trainer/global_step"] for entry in updates] == [3, 6, 9]
    layers = {weight.name: weight for weight in engine.weights}
    for entry in updates:
        densities = {k.removeprefix("density/"): v for k, v in entry.items() if k.startswith("density/")}
        assert densities.keys() == layers.keys()
        assert 0.0 < entry["sparsity/exploration_rate"] <= 1.0
        assert entry["sparsity/replaced"] > 0
    last = updates[-1]
    assert last["sparsity/exploration_rate"] == engine.exploration_rate()
    for name, weight in layers.items():
        assert last[f"density/{name}"] == float(weight.mask.float().mean())
