"""The Lightning adapter: step counting under accumulation, masked EMA, checkpoint -> resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from toy_diffusion import ToyData, make_module

from sparse_dm.lightning.dst_callback import DSTCallback
from sparse_dm.lightning.rng_state import RNGStateCallback
from sparse_dm.sparsity import SparseEngine


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


def sparse_run(seed: int = 0, interval: int = 4, init_seed: int = 0):
    L.seed_everything(init_seed)
    module = make_module()
    engine = SparseEngine(module.net, 0.6, grow="random", prune_rate=0.3, update_interval=interval, seed=seed)
    module.ema.remask(module.net)
    return module, engine, DSTCallback(engine)


def test_update_interval_counts_optimizer_steps_under_accumulation(tmp_path):
    module, engine, callback = sparse_run()
    trainer(tmp_path, 12, [callback], accumulate_grad_batches=3, enable_checkpointing=False).fit(
        module, ToyData()
    )
    assert engine.step == 12
    assert engine.num_updates == 3  # steps 4, 8, 12 of 36 micro-batches
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


@pytest.mark.parametrize("stop_at", [5, 8, 11])  # mid-epoch, epoch boundary, mid-epoch (8 batches/epoch)
def test_checkpoint_resume_reproduces_uninterrupted_run(tmp_path, stop_at):
    module, engine, callback = sparse_run()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=stop_at, save_top_k=-1)
    trainer(tmp_path / "full", 16, [callback, RNGStateCallback(), saver]).fit(module, ToyData())

    resumed, resumed_engine, resumed_cb = sparse_run(init_seed=123)  # other init: must be overwritten
    trainer(tmp_path / "resumed", 16, [resumed_cb, RNGStateCallback()], enable_checkpointing=False).fit(
        resumed, ToyData(), ckpt_path=tmp_path / f"step={stop_at}.ckpt"
    )
    assert resumed_engine.step == engine.step == 16
    assert resumed_engine.num_updates == engine.num_updates == 4
    for a, b in zip(engine.weights, resumed_engine.weights, strict=True):
        assert torch.equal(a.mask, b.mask), a.name
    for (name, a), b in zip(module.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed_engine.exploration_rate() == engine.exploration_rate()


def test_ema_is_remasked_at_each_mask_update(tmp_path):
    module, engine, callback = sparse_run(interval=1)
    seen: list[bool] = []

    class Check(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            buffers = dict(pl_module.ema.named_buffers())
            seen.append(all(not buffers[w.name.replace(".", "__")][~w.mask].any() for w in engine.weights))

    trainer(tmp_path, 6, [callback, Check()], enable_checkpointing=False).fit(module, ToyData())
    assert engine.num_updates == 6 and seen == [True] * 6
