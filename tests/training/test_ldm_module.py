"""LatentDiffusionModule: first stage handling, CFG, samplers on an LDM schedule, Lightning fit."""

import functools

import lightning as L
import pytest
import torch
from helpers.tiny_unet import tiny_unet
from helpers.tolerance import (
    SAMPLER_ROUNDINGS_PER_STEP,
    PredictionScale,
    assert_close_computed,
    reductions,
)
from torch.utils.data import DataLoader

from sparse_dm.data.images import TensorImageDataset
from sparse_dm.diffusion import ddim_sample, ddpm_sample
from sparse_dm.models.vq_autoencoder import VQModel
from sparse_dm.training.modules.diffusion import DiffusionBatch
from sparse_dm.training.modules.ldm import LatentDiffusionModule

VQ = dict(embed_dim=3, n_embed=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=3, resolution=16)


def make_module(num_classes=None, first_stage=None, steps=5, num_timesteps=1000, label_dropout=0.0, eta=0.0):
    torch.manual_seed(0)
    net = tiny_unet(num_classes=num_classes)
    with torch.no_grad():  # move away from the zero init so eps depends on its inputs
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return LatentDiffusionModule(
        name="ldm_test",
        net=net,
        diffusion=dict(
            schedule="sqrt_linear", num_timesteps=num_timesteps, beta_start=0.0015, beta_end=0.0195
        ),
        optimizer=functools.partial(
            torch.optim.AdamW, lr=1e-3, weight_decay=1e-2, betas=(0.9, 0.999), eps=1e-8
        ),
        ema=dict(decay=0.9),
        sampling=dict(
            weights="ema", sampler="ddim", steps=steps, eta=eta, num_samples=4, guidance_scale=1.0, seed=0
        ),
        validation=dict(seed=0),
        first_stage=first_stage or dict(kind="identity"),
        latent_shape=[3, 8, 8],
        conditioning=dict(label_dropout=label_dropout),
    )


def test_guidance_scale_one_equals_conditional_model():
    module = make_module(num_classes=4)
    labels = torch.tensor([0, 1, 2, 3])
    guided = module.generate(4, torch.Generator().manual_seed(1), labels=labels, guidance_scale=1.0)
    x_T = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    plain = module.sample_with(lambda x, t: module.net(x, t, labels), x_T, None)
    torch.testing.assert_close(guided, plain.clamp(-1, 1), rtol=0, atol=0)
    # the mixing formula itself: scale 1 reduces to the conditional prediction
    # In float64: the UNet chain is ~1.5e4 terms, whose float32 worst case (n u ~ 1e-3) would let a
    # wrong mix pass; in float64 it is tight (n u ~ 2e-12).
    module.double()
    x, t = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.full((4,), 500)
    null = torch.full_like(labels, module.net.null_label)
    both = lambda: (module.net(x, t, labels), module.net(x, t, null))  # noqa: E731
    (eps_c, eps_u), chain = reductions(module.net, call=both)
    guided = module.guided_eps_fn(labels, 3.0)(x, t)
    assert_close_computed(  # one batch of 8 there, two of 4 here (other blockings); the mix 3 eps_c - 2 eps_u
        guided, eps_u + 3.0 * (eps_c - eps_u), reduction_length=chain.longest + 3,  # has gain 5, 3 ops
        scale=5 * chain.scale, why="guidance batch vs two batches",
    )  # fmt: skip
    same_call = module.guided_eps_fn(labels, 1.0)(x, t)
    torch.testing.assert_close(same_call, eps_c, rtol=0, atol=0)  # the very call eps_c made: bit-exact


def test_ddim_full_schedule_eta_one_is_ddpm():
    """With every timestep and eta = 1, DDIM's update is DDPM's ancestral step (same noise draws)."""
    module = make_module(num_timesteps=20)
    eps_fn = PredictionScale(module.guided_eps_fn(None, 1.0), module.schedule)
    x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ddpm = ddpm_sample(eps_fn, x_T, module.schedule, generator=torch.Generator().manual_seed(5))
    ddim = ddim_sample(
        eps_fn, x_T, module.schedule, num_steps=20, eta=1.0, generator=torch.Generator().manual_seed(5)
    )
    assert_close_computed(  # the same 20 steps by two formulas (the net's response to them: second order)
        ddim, ddpm, reduction_length=20 * SAMPLER_ROUNDINGS_PER_STEP, scale=eps_fn.largest, why="DDIM vs DDPM"
    )
    det = [ddim_sample(eps_fn, x_T, module.schedule, num_steps=5, eta=0.0) for _ in range(2)]
    torch.testing.assert_close(det[0], det[1], rtol=0, atol=0)


def test_label_dropout_only_in_training():
    module = make_module(num_classes=4, label_dropout=1.0)
    batch = {"image": torch.randn(3, 3, 8, 8), "label": torch.tensor([0, 1, 2])}
    module.train()
    assert module.prepare_batch(batch).cond.tolist() == [4, 4, 4]
    module.eval()
    assert module.prepare_batch(batch).cond.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="labelled"):
        module.prepare_batch({"image": batch["image"]})


def test_vq_first_stage_frozen_outside_net_and_optimizer(tmp_path):
    vq = VQModel(**VQ)
    torch.save({"state_dict": vq.state_dict()}, tmp_path / "vq.ckpt")
    module = make_module(first_stage=dict(kind="vq", ckpt_path=None, params=VQ))
    with pytest.raises(ValueError, match="ckpt_path"):
        module.setup("fit")
    module.first_stage_cfg["ckpt_path"] = str(tmp_path / "vq.ckpt")
    module.setup("fit")
    module.train()
    assert not module.first_stage.training and module.net.training
    assert not any(p.requires_grad for p in module.first_stage.parameters())
    optimised = {id(p) for g in module.configure_optimizers().param_groups for p in g["params"]}
    assert optimised == {id(p) for p in module.net.parameters()}
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    batch = module.prepare_batch({"image": images})
    torch.testing.assert_close(batch.x0, vq.encode(images).detach(), rtol=0, atol=0)  # same weights, kernels
    cached = module.prepare_batch({"latent": batch.x0})
    assert cached.x0 is batch.x0 and cached.cond is None
    samples = module.generate(2, torch.Generator().manual_seed(0))
    assert samples.shape == (2, 3, 16, 16) and samples.abs().max() <= 1
    assert module.save_samples(samples, tmp_path / "s" / "grid.png").is_file()


def test_example_net_inputs_on_meta():
    with torch.device("meta"):
        module = make_module(num_classes=10, first_stage=dict(kind="vq", ckpt_path=None, params=VQ))
    inputs = module.example_net_inputs(2)
    assert [tuple(a.shape) for a in inputs] == [(2, 3, 8, 8), (2,), (2,)] and inputs[0].is_meta
    assert module.net(*inputs).shape == (2, 3, 8, 8)


class TinyLatents(L.LightningDataModule):
    batch_size = 4

    def __init__(self, data):
        super().__init__()
        self.data = data

    def train_dataloader(self):
        return DataLoader(TensorImageDataset(self.data), batch_size=4, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorImageDataset(self.data[:4]), batch_size=4)


def test_fit_trains_only_the_net(tmp_path):
    module = make_module(steps=2)
    module.output_dir = tmp_path
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=TinyLatents(torch.rand(8, 3, 8, 8) * 2 - 1))
    assert any(not torch.equal(a, b) for a, b in zip(before, module.net.parameters(), strict=True))
    assert "val/loss" in trainer.callback_metrics
    assert (tmp_path / "samples" / "step_000003.png").is_file()
    assert isinstance(module.prepare_batch({"image": torch.zeros(1, 3, 8, 8)}), DiffusionBatch)


def fit_briefly(module, tmp_path, ckpt_path=None, **trainer_kw):
    trainer = L.Trainer(
        max_steps=trainer_kw.pop("max_steps", 1),
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        **trainer_kw,
    )
    trainer.fit(module, datamodule=TinyLatents(torch.rand(8, 3, 8, 8) * 2 - 1), ckpt_path=ckpt_path)
    return trainer


def test_checkpoints_leave_out_the_first_stage_and_verify_its_hash(tmp_path):
    vq_path = tmp_path / "vq.ckpt"
    torch.save({"state_dict": VQModel(**VQ).state_dict()}, vq_path)
    first_stage = dict(kind="vq", ckpt_path=str(vq_path), params=VQ)
    trainer = fit_briefly(make_module(first_stage=first_stage), tmp_path)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert not [k for k in checkpoint["state_dict"] if k.startswith("first_stage.")]
    assert any(k.startswith("net.") for k in checkpoint["state_dict"])

    restored = make_module(first_stage=first_stage)  # evaluate.py's order: weights, then the hook
    restored.load_state_dict(checkpoint["state_dict"])
    restored.on_load_checkpoint(checkpoint)
    for key, value in torch.load(vq_path, weights_only=True)["state_dict"].items():
        assert torch.equal(restored.first_stage.state_dict()[key], value)

    torch.manual_seed(123)
    torch.save({"state_dict": VQModel(**VQ).state_dict()}, vq_path)  # another autoencoder, same path
    with pytest.raises(ValueError, match=r"first stage mismatch: model\.first_stage\.ckpt_path=.*vq\.ckpt"):
        make_module(first_stage=first_stage).on_load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="first stage mismatch"):  # resuming a run refuses it too
        fit_briefly(make_module(first_stage=first_stage), tmp_path, ckpt_path=tmp_path / "run.ckpt")


def test_sampling_uses_the_configured_discretization():
    module = make_module(steps=4)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    eps_fn = module.guided_eps_fn(None, 1.0)
    for discretization in ("compvis", "uniform"):
        module.sampling_cfg["discretization"] = discretization
        direct = ddim_sample(eps_fn, x_T, module.schedule, num_steps=4, discretization=discretization)
        assert torch.equal(module.sample_with(eps_fn, x_T, None), direct)
    assert not torch.equal(
        module.sample_with(eps_fn, x_T, None, discretization="compvis"), module.sample_with(eps_fn, x_T, None)
    )


def test_scale_lr_multiplies_by_batch_devices_and_accumulation(tmp_path):
    module = make_module()
    module.scale_lr = True
    trainer = fit_briefly(module, tmp_path, accumulate_grad_batches=2, max_epochs=1)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 4 * 1 * 2)
    assert module.hparams["optimizer"]["lr"] == 1e-3
    plain = make_module()
    assert fit_briefly(plain, tmp_path).optimizers[0].param_groups[0]["lr"] == 1e-3
