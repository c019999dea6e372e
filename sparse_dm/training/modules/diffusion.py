"""The LightningModule skeleton shared by every diffusion model family.

eps-prediction training with a masked MSE, a fixed-seed validation loss (same timesteps and noise
every time, so runs compare across methods and sparsities) measured with both the EMA and the raw
training weights, the optimizer and LR schedule built from config (`model.optimizer`,
`model.lr_scheduler`: Hydra partials), a masked EMA, and sample grids written as PNG with the weights
chosen by `sampling.weights` (ema | raw). The bookkeeping around each optimizer step (gradient
masks, re-masking, EMA, mask updates) is `SparseStep`'s, in its documented order. Families implement
the data representation and the denoiser call (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from sparse_dm.diffusion import NoiseSchedule, sample
from sparse_dm.diffusion.losses import per_sample_masked_mse
from sparse_dm.sparse_backend.backend import SparseBackend
from sparse_dm.sparsity.bands import BandRouter
from sparse_dm.sparsity.bands_engine import BandedSparseEngine
from sparse_dm.sparsity.ema import MaskedEMA
from sparse_dm.sparsity.engine import SparseEngine
from sparse_dm.sparsity.step import SparseStep

SAMPLING_WEIGHTS = ("ema", "raw")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def check_sampling_weights(weights: str) -> None:
    if weights not in SAMPLING_WEIGHTS:
        raise ValueError(f"model.sampling.weights={weights!r}; allowed: one of {SAMPLING_WEIGHTS}")


def factory_config(factory: Callable[..., Any] | None) -> dict[str, Any] | None:
    """A Hydra partial as the plain config it came from (`_target_`, `_partial_`, its arguments):
    hyperparameters stay loadable with torch.load(weights_only=True)."""
    if factory is None:
        return None
    if not callable(factory):
        raise TypeError(
            "model.optimizer and model.lr_scheduler must be Hydra partials (`_target_: ...` and "
            f"`_partial_: true`, see conf/model/chirodiff.yaml), got {factory!r}; a config.yaml written "
            "by an older sparse_dm lists only the optimizer's arguments: add those two keys to it"
        )
    if isinstance(factory, functools.partial):
        target = factory.func
        return {
            "_target_": f"{target.__module__}.{target.__qualname__}",
            "_partial_": True,
            **factory.keywords,
        }
    return {
        "_target_": f"{factory.__module__}.{getattr(factory, '__qualname__', type(factory).__qualname__)}"
    }


@dataclass
class DiffusionBatch:
    """One batch in the space the noise is added to."""

    x0: Tensor
    mask: Tensor | None = None
    cond: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class DiffusionModule(L.LightningModule):
    """Base class; subclasses implement prepare_batch, predict_eps, generate, save_samples and
    example_net_inputs."""

    def __init__(
        self,
        name: str,
        net: nn.Module,
        diffusion: dict,
        optimizer: OptimizerFactory,
        ema: dict,
        sampling: dict,
        validation: dict,
        lr_scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"], logger=False)
        self.hparams["optimizer"] = factory_config(optimizer)
        self.hparams["lr_scheduler"] = factory_config(lr_scheduler)
        self.model_name = name
        self.net = net
        self.schedule = NoiseSchedule(
            diffusion["schedule"], diffusion["num_timesteps"], diffusion["beta_start"], diffusion["beta_end"]
        )
        self.ema = MaskedEMA(net, **ema)
        self.sparse_step = SparseStep(net, self.ema)
        check_sampling_weights(sampling["weights"])
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.sampling_cfg = dict(sampling)
        self.validation_cfg = dict(validation)
        self.output_dir: Path | None = None
        self.sample_paths: list[str] = []
        self.last_validated_step = -1
        # Set by attach_engine for runs with method.timestep_bands: calls the net with each
        # sample's band mask (sparsity.timestep_bands.BandRouter). None: the plain net.
        self.timestep_bands: BandRouter | None = None
        self._step_loss: Tensor | None = None  # the last training_step's loss
        # backend=sparse (attach_sparse_backend): the compact net's checkpoint format and step
        # bookkeeping. None: masks over dense kernels.
        self.sparse_backend: SparseBackend | None = None

    # ----- family-specific hooks -------------------------------------------------------------
    def prepare_batch(self, batch: Any) -> DiffusionBatch:
        raise NotImplementedError

    def predict_eps(self, x_t: Tensor, t: Tensor, batch: DiffusionBatch) -> Tensor:
        raise NotImplementedError

    def generate(self, num_samples: int, generator: torch.Generator, **kwargs: Any) -> Any:
        raise NotImplementedError

    def save_samples(self, samples: Any, path: Path) -> Path:
        raise NotImplementedError

    def example_net_inputs(self, batch_size: int = 1) -> tuple:
        raise NotImplementedError

    def prepare_sample_quality(self, datamodule: Any) -> None:
        """Before fit: load and check what `sample_quality` compares with, so a run that could not
        score its samples stops before training. Families without an end-of-run metric do nothing
        (the image family's FID is `sparse_dm.evaluate` and the FidelityCallback)."""

    def sample_quality(self) -> dict[str, float]:
        """After the final validation (rank 0): sample-quality metrics for summary.json's `metrics`."""
        return {}

    # ----- shared machinery ------------------------------------------------------------------
    @property
    def denoiser(self) -> Callable[..., Tensor]:
        """What families call instead of `self.net(x_t, t, ...)`: the net itself, or the net routed
        through the timestep-band masks, or backend=sparse's call of the compact net."""
        if self.sparse_backend is not None:
            return self.sparse_backend.forward
        return self.net if self.timestep_bands is None else self.timestep_bands

    @contextmanager
    def ema_weights(self) -> Iterator[nn.Module]:
        """Run self.net with the (masked) EMA weights inside the block."""
        with self.ema.swapped_into(self.net) as net:
            yield net

    def sampling_weights(self) -> AbstractContextManager[nn.Module]:
        """The weights samples, FID and `val/loss` use: EMA or the raw training weights."""
        return self.ema_weights() if self.sampling_cfg["weights"] == "ema" else nullcontext(self.net)

    def sample_with(self, eps_fn, x_T: Tensor, generator: torch.Generator | None, **overrides: Any) -> Tensor:
        """Run the configured sampler (sampling.sampler / steps / eta / discretization: compvis | uniform,
        DDIM only), allowing per-call overrides."""
        cfg = {**self.sampling_cfg, **overrides}
        return sample(
            eps_fn,
            x_T,
            self.schedule,
            sampler=cfg["sampler"],
            num_steps=cfg["steps"],
            eta=cfg["eta"],
            generator=generator,
            progress=cfg.get("progress", False),
            discretization=cfg.get("discretization", "uniform"),
        )

    def diffusion_loss(self, batch: DiffusionBatch, t: Tensor, noise: Tensor) -> Tensor:
        return self.per_sample_loss(batch, t, noise).mean()

    def per_sample_loss(self, batch: DiffusionBatch, t: Tensor, noise: Tensor) -> Tensor:
        """The masked MSE of each sample (`masked_mse` is their mean)."""
        x_t = self.schedule.q_sample(batch.x0, t, noise)
        return per_sample_masked_mse(self.predict_eps(x_t, t, batch), noise, batch.mask)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        data = self.prepare_batch(batch)
        x0 = data.x0
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device)
        loss = self.diffusion_loss(data, t, torch.randn_like(x0))
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        self._step_loss = loss.detach()  # for the adaptive prune rate (SparseStep.after_step)
        return loss

    def attach_engine(self, engine: SparseEngine) -> None:
        """Train sparse: the engine's masks are on `self.net`; `SparseStep` drives it. A banded
        engine's router becomes the denoiser call (each sample runs with its band's mask)."""
        self.sparse_step.engine = engine
        self.timestep_bands = engine.router if isinstance(engine, BandedSparseEngine) else None

    def attach_sparse_backend(self, backend: SparseBackend) -> None:
        """backend=sparse: `backend` has converted self.net to compact layers; its EMA and its step
        bookkeeping (the masked engine's, on dense views at mask updates) replace the masked ones."""
        self.sparse_backend = backend
        self.ema = backend.ema
        self.sparse_step = backend.step

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """backend=sparse: the layers form the dense weight gradient only on steps whose growth reads it."""
        if self.sparse_backend is not None:
            self.sparse_backend.step.before_forward()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """backend=sparse: the optimizer state as a masked run's (weights, masks, EMA already are)."""
        if self.sparse_backend is not None:
            self.sparse_backend.save_format(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """backend=sparse: a masked run's optimizer state gathered by the checkpoint's masks."""
        if self.sparse_backend is not None:
            self.sparse_backend.load_format(checkpoint)

    def on_train_start(self) -> None:
        """Tell the engine the run length (updates stop at method.end_fraction, never on the last step)."""
        if self.sparse_step.engine is not None:
            self.sparse_step.engine.set_total_steps(int(self.trainer.estimated_stepping_batches))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients are final here (accumulated, AMP-unscaled) and Lightning clips right after.
        Band gradients the router captured still carry the AMP loss scale: the engine divides it out."""
        reduce = self.trainer.strategy.reduce if self.trainer.world_size > 1 else None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        captured = self.timestep_bands is not None and self.timestep_bands.capturing
        scale = float(scaler.get_scale()) if scaler is not None and captured else 1.0
        self.sparse_step.before_step(reduce, scale)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Callable[[], Any] | None = None
    ) -> None:
        """One real optimizer step, then `SparseStep.after_step` (re-mask, EMA, maybe explore) before
        any callback's on_train_batch_end, so checkpoints saved there hold this step's state. An AMP
        step the grad scaler skipped (overflow) still advances global_step; its scale drops."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        watch = scaler is not None and self.sparse_step.update_due()
        scale = float(scaler.get_scale()) if watch else None
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        skipped = scale is not None and float(scaler.get_scale()) < scale
        gather = self.trainer.strategy.all_gather if self.trainer.world_size > 1 else None
        self.sparse_step.after_step(
            getattr(optimizer, "optimizer", optimizer), skipped, gather, self._step_loss
        )

    def _fixed_noise(self, x0: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        """Timesteps and noise that depend only on (validation.seed, batch index)."""
        generator = torch.Generator().manual_seed(int(self.validation_cfg["seed"]) + batch_idx)
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return t.to(x0.device), noise.to(x0.device)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Logs `val/loss_raw` (training weights), `val/loss_ema` (EMA weights) and `val/loss`, the
        one `sampling.weights` selects; a gap between the first two shows the EMA lagging."""
        data = self.prepare_batch(batch)
        t, noise = self._fixed_noise(data.x0, batch_idx)
        per_sample = {"raw": self.per_sample_loss(data, t, noise)}
        with self.ema_weights():
            per_sample["ema"] = self.per_sample_loss(data, t, noise)
        per_sample[""] = per_sample[self.sampling_cfg["weights"]]
        boundaries = self.validation_cfg.get("band_boundaries") or []
        bands = torch.bucketize(t, torch.tensor(boundaries, device=t.device), right=True)
        for name, values in per_sample.items():
            key = f"val/loss_{name}" if name else "val/loss"
            self.log(key, values.mean(), prog_bar=not name, batch_size=values.numel(), sync_dist=True)
            for band in range(len(boundaries) + 1 if boundaries else 0):
                # t below / above each boundary, where a timestep-band model differs from one mask. Every
                # rank logs every band (a band without samples adds weight 0), so sync_dist stays in step.
                chosen = values[bands == band]
                mean = chosen.mean() if chosen.numel() else values.new_zeros(())
                self.log(f"{key}_band{band}", mean, batch_size=chosen.numel(), sync_dist=True)
        return per_sample[""].mean()

    def on_validation_epoch_end(self) -> None:
        self.last_validated_step = self.trainer.global_step
        if not self.trainer.sanity_checking and self.trainer.state.fn == "fit":
            self.write_samples()

    @torch.no_grad()
    def write_samples(self, tag: str | None = None) -> Path | None:
        """Sample with the `sampling.weights` and a fixed seed (rank 0 only) and save a PNG grid."""
        if self.output_dir is None or not self.trainer.is_global_zero:
            return None
        generator = torch.Generator().manual_seed(int(self.sampling_cfg["seed"]))
        with self.sampling_weights():
            samples = self.generate(int(self.sampling_cfg["num_samples"]), generator)
        name = tag or f"step_{self.trainer.global_step:06d}"
        path = self.save_samples(samples, Path(self.output_dir) / "samples" / f"{name}.png")
        self.sample_paths.append(str(path))
        return path

    def adjust_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook for families that change the optimizer before the LR schedule sees it."""

    def configure_optimizers(self) -> Any:
        """`model.optimizer` over the denoiser's parameters; with `model.lr_scheduler`, that schedule
        stepped once per optimizer step."""
        optimizer = self.optimizer_factory(self.net.parameters())
        self.adjust_optimizer(optimizer)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
