"""Stage 1 for data without a pretrained first stage: train a small VQ autoencoder ourselves.

Same architecture and state_dict layout as the CompVis VQ first stage (sparse_dm.models.vq_autoencoder),
trained with a plain reconstruction loss plus the VQ-VAE codebook and commitment terms. CompVis also
uses a perceptual (LPIPS) and an adversarial loss; both need pretrained networks or long, fragile
training, so this small variant leaves them out (reconstructions are blurrier, which is fine for the
small images it is meant for). ``export_first_stage`` writes the bare state_dict that
``model.first_stage.ckpt_path`` accepts.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torchvision.utils import save_image

from sparse_dm.models.vq_autoencoder import VQModel
from sparse_dm.training.modules.diffusion import OptimizerFactory, factory_config


class AutoencoderModule(L.LightningModule):
    """loss = MSE(x, x_rec) + codebook + commitment_weight * commitment."""

    def __init__(self, vq: dict, optimizer: OptimizerFactory, commitment_weight: float):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        self.hparams["optimizer"] = factory_config(optimizer)
        self.vq = VQModel(**vq)
        self.optimizer_factory = optimizer
        self.commitment_weight = commitment_weight

    def losses(self, images: Tensor) -> dict[str, Tensor]:
        rec, (codebook, commitment) = self.vq(images)
        mse = torch.nn.functional.mse_loss(rec, images)
        return {
            "rec": mse,
            "codebook": codebook,
            "commitment": commitment,
            "loss": mse + codebook + self.commitment_weight * commitment,
        }

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        parts = self.losses(batch["image"])
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, prog_bar=True)
        return parts["loss"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        parts = self.losses(batch["image"])
        self.log_dict({f"val/{k}": v for k, v in parts.items()}, prog_bar=True)
        return parts["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.vq.parameters())

    @torch.no_grad()
    def save_reconstructions(self, images: Tensor, path: Path) -> Path:
        """Originals above reconstructions (through the quantiser), one PNG."""
        self.vq.eval()
        rec = self.vq.decode(self.vq.encode(images.to(self.device))).clamp(-1, 1).cpu()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image((torch.cat([images, rec]) + 1) / 2, path, nrow=len(images))
        return path

    def export_first_stage(self, path: Path) -> Path:
        """The VQ weights alone, in CompVis layout (``encoder.*``, ``quantize.*``, ...)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.vq.state_dict().items()}, path)
        return path
