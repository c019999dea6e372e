"""`python -m sparse_dm.train_autoencoder [overrides]`: stage 1, a small VQ first stage for new data.

Writes <output_dir>/first_stage.pt (a bare CompVis-layout state_dict) and a reconstruction grid; point an
LDM run at it with `model.first_stage.ckpt_path=<output_dir>/first_stage.pt` and the same
`model.first_stage.params` as `model.vq` here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="autoencoder")
def main(cfg: DictConfig) -> float:
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(int(cfg.seed), workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    datamodule = instantiate(cfg.dataset)
    module = instantiate(cfg.model, _convert_="all")
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        logger=instantiate(cfg.logger.csv),
        default_root_dir=str(out),
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=datamodule)
    path = module.export_first_stage(out / "first_stage.pt")
    images = next(iter(datamodule.val_dataloader()))["image"][: int(cfg.num_reconstructions)]
    module.save_reconstructions(images, out / "reconstructions.png")
    val = float(trainer.callback_metrics.get("val/rec", float("nan")))
    log.info("val/rec %.5f; first stage: %s", val, path)
    return val


if __name__ == "__main__":
    main()
