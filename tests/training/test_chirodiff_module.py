"""ChiroDiffModule: configs compose, padding-free loss, seeded sampling of real lengths, PNG grids."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.tolerance import assert_close_computed, mse_bound, reductions
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from sparse_dm import CONFIG_DIR
from sparse_dm.data.stroke3 import Stroke3DataModule, collate_stroke3
from sparse_dm.sparsity.flops import forward_flops, measure_weight_uses
from sparse_dm.training.modules.chirodiff import LENGTH_POOL_KEY, ChiroDiffModule
from sparse_dm.training.modules.diffusion import factory_config

pytestmark = pytest.mark.usefixtures("single_thread")


CONF = str(CONFIG_DIR)
TINY = [
    "model.net.hidden_size=8",
    "model.net.num_layers=1",
    "model.diffusion.num_timesteps=40",
    "model.sampling.steps=5",
    "model.sampling.num_samples=4",
]


def config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=overrides)


def tiny_module(extra: list[str] = ()) -> ChiroDiffModule:
    return instantiate(config([*TINY, *extra]).model)


def drawings_batch(lengths: list[int], pad: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    items = [{"x": torch.randn(n, 3, generator=gen)} for n in lengths]
    batch = collate_stroke3(items)
    if pad:
        batch["x"] = torch.cat([batch["x"], torch.full((len(lengths), pad, 3), 50.0)], dim=1)
        batch["mask"] = torch.cat([batch["mask"], torch.zeros(len(lengths), pad, dtype=torch.bool)], dim=1)
    return batch


@pytest.mark.parametrize(
    ("overrides", "params", "test_flops"),
    [
        (["experiment=chirodiff_quickdraw", "dataset.root=x"], 736_027, 1.29e10),
        (["experiment=chirodiff_kanjivg"], 416_859, 7.35e9),
        (["experiment=chirodiff_vmnist", "dataset.path=x.npz"], 65_019, 7.11e8),
    ],
)
def test_paper_presets(overrides: list[str], params: int, test_flops: float) -> None:
    cfg = config(overrides)
    assert cfg.dataset.batch_size == 128 and cfg.model.optimizer.lr == 1e-3
    assert cfg.model.optimizer.weight_decay == 1e-2 and cfg.model.diffusion.num_timesteps == 1000
    assert cfg.trainer.max_epochs == 600 and cfg.trainer.max_steps == -1 and cfg.update_interval == 800
    assert cfg.model.sampling.sampler == "ddim" and cfg.model.sampling.steps == 50
    with torch.device("meta"):
        module = instantiate(cfg.model)
    assert sum(p.numel() for p in module.net.parameters()) == params
    # FLOPs at cost_seq_len reproduce the paper's dense test FLOPs (50 DDIM steps) to within 1%.
    # (Measured on a short sequence, then scaled: every weight is used once per step.)
    short = module.cost_seq_len // 16
    module.cost_seq_len = short
    per_step = forward_flops(measure_weight_uses(module.net, module.example_net_inputs(1))) / short
    assert per_step * cfg.model.cost_seq_len * 50 == pytest.approx(test_flops, rel=0.01)


def test_conditional_preset() -> None:
    cfg = config(["experiment=chirodiff_quickdraw_cond", "dataset.root=x"])
    assert len(cfg.dataset.categories) == cfg.model.net.num_classes == 7
    assert cfg.trainer.max_epochs == 150 and cfg.dataset.conditional
    with torch.device("meta"):
        module = instantiate(cfg.model)
    assert module.num_classes == 7 and len(module.example_net_inputs(2)) == 4


def test_default_is_cpu_kanjivg() -> None:
    cfg = config([])
    assert cfg.model.name == "chirodiff" and cfg.dataset.name == "kanjivg"
    assert cfg.trainer.accelerator == "cpu"
    assert Path(instantiate(cfg.dataset).path).name == "kanji.rdp200.npz"


def test_stroke3_requires_a_path() -> None:
    cfg = config(["dataset=stroke3"])
    with pytest.raises(MissingMandatoryValue, match=r"dataset\.path"):
        instantiate(cfg.dataset)


def test_loss_ignores_padding() -> None:
    module = tiny_module()
    lengths = [5, 9, 2]
    plain = module.prepare_batch(drawings_batch(lengths))
    padded = module.prepare_batch(drawings_batch(lengths, 6))
    assert plain.mask.shape == (3, 9, 1)
    t = torch.tensor([1, 20, 39])
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(padded.x0.shape, generator=gen)
    loss_plain, chain = reductions(module.net, plain, t, noise[:, :9], call=module.diffusion_loss)
    n, scale = mse_bound(float(loss_plain), noise[:, :9].numel(), chain)  # 9 vs 15 columns: other blockings
    assert_close_computed(
        module.diffusion_loss(padded, t, noise), loss_plain, reduction_length=n, scale=scale, why="padding"
    )


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_is_seeded_and_uses_requested_lengths(sampler: str) -> None:
    module = tiny_module([f"model.sampling.sampler={sampler}"])
    lengths = torch.tensor([3, 11, 6])
    a = module.generate(3, torch.Generator().manual_seed(7), lengths=lengths)
    b = module.generate(3, torch.Generator().manual_seed(7), lengths=lengths)
    c = module.generate(3, torch.Generator().manual_seed(8), lengths=lengths)
    assert [len(s) for s in a] == lengths.tolist() and all(s.shape[1] == 3 for s in a)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)  # the same run twice: bit-exact
    assert not torch.allclose(a[0], c[0])


def test_lengths_come_from_the_pool_and_survive_checkpoints() -> None:
    module = tiny_module()
    with pytest.raises(RuntimeError, match="length pool"):
        module.generate(2, torch.Generator().manual_seed(0))
    module.set_length_pool(torch.tensor([4, 7]))
    samples = module.generate(16, torch.Generator().manual_seed(0))
    assert {len(s) for s in samples} <= {4, 7}
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    restored = tiny_module()
    restored.on_load_checkpoint(checkpoint)
    assert restored.length_pool.tolist() == [4, 7] and LENGTH_POOL_KEY in checkpoint


def test_conditional_generation_cycles_classes(tmp_path: Path) -> None:
    module = tiny_module(["model.net.num_classes=3", "model.net.class_embed_dim=2"])
    module.set_length_pool(torch.tensor([5]))
    samples = module.generate(6, torch.Generator().manual_seed(0))
    assert len(samples) == 6
    path = module.save_samples(samples, tmp_path / "cond.png")
    assert path.exists()
    batch = drawings_batch([3, 4])
    with pytest.raises(ValueError, match="labelled"):
        module.prepare_batch(batch)
    batch["label"] = torch.tensor([0, 2])
    assert module.prepare_batch(batch).cond.tolist() == [0, 2]


def test_short_fit_writes_samples_and_finite_val_loss(tmp_path: Path) -> None:
    module = tiny_module()
    module.output_dir = tmp_path
    dm = Stroke3DataModule("kanjivg/kanji.rdp200.npz", batch_size=16, num_train=64, max_len=40)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        val_check_interval=4,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert len(module.length_pool) == len(dm.datasets["valid"])
    assert [Path(p).name for p in module.sample_paths] == ["step_000004.png"]
    assert Path(module.sample_paths[0]).stat().st_size > 0


def test_an_optimizer_given_as_plain_arguments_is_refused_with_the_fix():
    """A config.yaml from before optimizers became Hydra partials holds only {lr, betas, ...}."""
    with pytest.raises(TypeError, match=r"model.optimizer .* `_partial_: true`"):
        factory_config({"lr": 1e-3, "weight_decay": 0.01})
