"""Latent Diffusion: the UNet denoises latents of a frozen first stage (VQ-f4 in the paper).

The first stage lives in ``self.first_stage``, outside ``self.net``, so the sparsity engine, the
optimizer and the EMA never see it. It is never written into checkpoints: it is reloaded from
``model.first_stage.ckpt_path`` and checked against the content hash each checkpoint stores.
Class-conditional models get classifier-free guidance: labels are replaced by the UNet's null label
with probability ``conditioning.label_dropout`` in training, and sampling mixes conditional and
unconditional predictions with ``sampling.guidance_scale``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.utils import save_image

from sparse_dm.metrics.images_for_fid import ImageFidSource
from sparse_dm.models.vq_autoencoder import VQModel, load_first_stage, state_hash
from sparse_dm.training.modules.diffusion import (
    DiffusionBatch,
    DiffusionModule,
    OptimizerFactory,
    SchedulerFactory,
)

log = logging.getLogger(__name__)

FIRST_STAGE_KINDS = ("vq", "identity")
FIRST_STAGE_PREFIX = "first_stage."  # the frozen autoencoder's keys in the module's state_dict
CHECKPOINT_HASH_KEY = "first_stage_sha256"  # content hash of the first stage a checkpoint was trained with


class IdentityFirstStage(nn.Module):
    """Pixel-space diffusion (latents are the images); only for tiny CPU presets, chosen explicitly."""

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z


def build_first_stage(cfg: dict) -> nn.Module:
    """The frozen autoencoder from ``model.first_stage`` (weights are loaded later, at fit time)."""
    kind = cfg["kind"]
    if kind == "identity":
        return IdentityFirstStage()
    if kind == "vq":
        return VQModel(**cfg["params"]).freeze()
    raise ValueError(f"model.first_stage.kind must be one of {FIRST_STAGE_KINDS}, got {kind!r}")


def scaled_lr(base_lr: float, batch_size: int, devices: int, accumulate: int) -> float:
    """CompVis ``scale_lr``: the learning rate grows with the effective batch (per-device batch x
    devices x gradient accumulation)."""
    return base_lr * batch_size * devices * accumulate


def _drop_first_stage(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict hook: the frozen first stage never goes into checkpoints (it is reloaded from its path)."""
    for key in [k for k in state_dict if k.startswith(prefix + FIRST_STAGE_PREFIX)]:
        del state_dict[key]


def _keep_loaded_first_stage(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook of the LDM module: keep the first-stage weights loaded from its path
    (also when an older checkpoint carries a copy), so strict loading of checkpoints without them works."""
    for key, value in module.first_stage.state_dict().items():
        state_dict[prefix + FIRST_STAGE_PREFIX + key] = value


class LatentDiffusionModule(ImageFidSource, DiffusionModule):
    """LDM on top of the shared diffusion module. ``latent_shape`` = (C, H, W) of the UNet input."""

    def __init__(
        self,
        name: str,
        net: nn.Module,
        diffusion: dict,
        optimizer: OptimizerFactory,
        ema: dict,
        sampling: dict,
        validation: dict,
        first_stage: dict,
        latent_shape: list[int],
        conditioning: dict | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        scale_lr: bool = False,
    ) -> None:
        super().__init__(name, net, diffusion, optimizer, ema, sampling, validation, lr_scheduler)
        self.scale_lr = scale_lr
        self.first_stage_cfg = dict(first_stage)
        self.first_stage = build_first_stage(self.first_stage_cfg)
        self.latent_shape = tuple(latent_shape)
        self.num_classes = getattr(net, "num_classes", None)
        self.label_dropout = float((conditioning or {}).get("label_dropout", 0.0))
        self._first_stage_loaded = False
        self._first_stage_hash: str | None = None
        self.register_state_dict_post_hook(_drop_first_stage)
        self.register_load_state_dict_pre_hook(_keep_loaded_first_stage)

    # ----- first stage ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Load the first-stage weights once (required for the VQ first stage; not needed for costs)."""
        self.load_first_stage()

    def load_first_stage(self) -> str | None:
        """Load the VQ weights from ``model.first_stage.ckpt_path`` (once); returns their content hash."""
        if self.first_stage_cfg["kind"] != "vq":
            return None
        if not self._first_stage_loaded:
            path = self.first_stage_cfg.get("ckpt_path")
            if not path:
                raise ValueError(
                    "model.first_stage.ckpt_path is not set: download the CompVis vq-f4 checkpoint "
                    "(or train one with `python -m sparse_dm.train_autoencoder`) and pass its path"
                )
            load_first_stage(self.first_stage, path)
            self._first_stage_hash = state_hash(self.first_stage)
            self._first_stage_loaded = True
        return self._first_stage_hash

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record which first stage the weights were trained with (its weights stay out of the file)."""
        super().on_save_checkpoint(checkpoint)
        if self.first_stage_cfg["kind"] == "vq":
            checkpoint[CHECKPOINT_HASH_KEY] = self.load_first_stage()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Reload the first stage from its path and refuse it unless it is the one the checkpoint used."""
        super().on_load_checkpoint(checkpoint)
        if self.first_stage_cfg["kind"] != "vq":
            return
        expected = checkpoint.get(CHECKPOINT_HASH_KEY)
        if expected is None:
            raise ValueError(
                f"checkpoint has no {CHECKPOINT_HASH_KEY}: it was not written by this LatentDiffusionModule, "
                "so the first stage it was trained with cannot be verified"
            )
        actual = self.load_first_stage()
        if actual != expected:
            raise ValueError(
                f"first stage mismatch: model.first_stage.ckpt_path={self.first_stage_cfg['ckpt_path']} has "
                f"content hash {actual}, but the checkpoint was trained with {expected}. Point "
                "model.first_stage.ckpt_path at the autoencoder this run was trained with."
            )

    def train(self, mode: bool = True) -> LatentDiffusionModule:
        """Keep the frozen first stage in eval mode whatever Lightning asks of the module."""
        super().train(mode)
        self.first_stage.eval()
        return self

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        return self.first_stage.encode(images)

    @torch.no_grad()
    def decode_latents(self, z: Tensor) -> Tensor:
        return self.first_stage.decode(z).clamp(-1.0, 1.0)

    def on_fit_start(self) -> None:
        """Switch the datamodule to cached latents when it is configured to cache them (the cache is
        keyed by the first stage's content hash, not its path)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.first_stage_cfg["kind"] == "vq" and hasattr(datamodule, "use_latents"):
            datamodule.use_latents(self.encode_images, self.load_first_stage(), self.device)

    def adjust_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """With ``model.scale_lr`` the lr is CompVis's: model.optimizer.lr x batch x devices x
        accumulation (the config is left unchanged, so a resumed run scales the same way once)."""
        if not self.scale_lr:
            return
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ValueError("model.scale_lr needs the batch size: fit with a datamodule")
        base_lr = float(optimizer.defaults["lr"])
        lr = scaled_lr(
            base_lr,
            int(datamodule.batch_size),
            int(self.trainer.world_size),
            int(self.trainer.accumulate_grad_batches),
        )
        optimizer.defaults["lr"] = lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        log.info("model.scale_lr: lr %.3g = %.3g x batch x devices x accumulation", lr, base_lr)

    # ----- DiffusionModule hooks ------------------------------------------------------------------
    def prepare_batch(self, batch: dict[str, Tensor]) -> DiffusionBatch:
        """Images -> latents (or cached latents as they are); labels with CFG dropout in training."""
        x0 = batch["latent"] if "latent" in batch else self.encode_images(batch["image"])
        cond = None
        if self.num_classes is not None:
            if "label" not in batch:
                raise ValueError("class-conditional model needs labelled data (dataset.class_folders=true)")
            cond = batch["label"]
            if self.training and self.label_dropout > 0:
                drop = torch.rand(cond.shape, device=cond.device) < self.label_dropout
                cond = torch.where(drop, torch.full_like(cond, self.net.null_label), cond)
        return DiffusionBatch(x0=x0, cond=cond)

    def predict_eps(self, x_t: Tensor, t: Tensor, batch: DiffusionBatch) -> Tensor:
        return self.denoiser(x_t, t, batch.cond) if batch.cond is not None else self.denoiser(x_t, t)

    def guided_eps_fn(self, labels: Tensor | None, guidance_scale: float):
        """eps(x_t, t) for the sampler; classifier-free guidance when scale != 1 (1 = conditional model)."""
        if labels is None:
            return lambda x, t: self.denoiser(x, t)
        if guidance_scale == 1.0:
            return lambda x, t: self.denoiser(x, t, labels)
        null = torch.full_like(labels, self.net.null_label)

        def eps_fn(x: Tensor, t: Tensor) -> Tensor:
            eps_c, eps_u = self.denoiser(
                torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])
            ).chunk(2)
            return eps_u + guidance_scale * (eps_c - eps_u)

        return eps_fn

    @torch.no_grad()
    def generate(self, num_samples: int, generator: torch.Generator, **kwargs: Any) -> Tensor:
        """Sample latents with the configured sampler and decode them: images in [-1, 1].

        kwargs: ``labels`` (LongTensor[num_samples], conditional models; default: drawn from the
        generator), ``guidance_scale`` (default sampling.guidance_scale), and sampler overrides.
        """
        labels = kwargs.pop("labels", None)
        scale = float(kwargs.pop("guidance_scale", self.sampling_cfg.get("guidance_scale", 1.0)))
        if self.num_classes is not None and labels is None:
            labels = torch.randint(0, self.num_classes, (num_samples,), generator=generator)
        x_T = torch.randn((num_samples, *self.latent_shape), generator=generator).to(self.device)
        labels = None if labels is None else labels.to(self.device)
        z = self.sample_with(self.guided_eps_fn(labels, scale), x_T, generator, **kwargs)
        return self.decode_latents(z)

    def save_samples(self, samples: Tensor, path: Path) -> Path:
        """A square-ish PNG grid of images in [-1, 1]."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image((samples.float().cpu() + 1.0) / 2.0, path, nrow=math.ceil(math.sqrt(samples.shape[0])))
        return path

    def example_net_inputs(self, batch_size: int = 1) -> tuple:
        """(x, t[, y]) at the latent shape on self.net's device (works on ``meta``)."""
        device = next(self.net.parameters()).device
        x = torch.zeros((batch_size, *self.latent_shape), device=device)
        t = torch.zeros((batch_size,), dtype=torch.long, device=device)
        if self.num_classes is None:
            return x, t
        return x, t, torch.zeros((batch_size,), dtype=torch.long, device=device)
