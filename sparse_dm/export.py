"""`python -m sparse_dm.export ckpt_path=RUN/checkpoints/last.ckpt [out=model.sdm] [weights=ema|raw]`:
a trained sparse model as a small, self-contained file.

Every masked weight is stored as CSR over its mask (values + int32 row pointers + the narrowest
integer column indices that fit), so the file grows with the number of active connections; every
other tensor of the denoiser is stored dense, with the model config needed to rebuild it. Positions
inside a mask are kept even when their value is 0 (freshly regrown weights), so masks and masked
weights load back bit-identically. The file is a plain `torch.save` of tensors and containers:
`torch.load(weights_only=True)` reads it without Lightning and without executing anything.
Runs with timestep-band masks also store which bands use each active position (sparse_dm.run.bands);
the loaded module samples with the same per-timestep masks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sparse_dm.run.load import module_from_lightning
from sparse_dm.run.sdm import (
    SUFFIX,
    write_sdm,
)
from sparse_dm.training.modules.diffusion import SAMPLING_WEIGHTS

log = logging.getLogger(__name__)





















def export(cfg: DictConfig) -> Path:
    ckpt_path = Path(cfg.ckpt_path)
    if cfg.weights not in SAMPLING_WEIGHTS:
        raise ValueError(f"invalid config: weights={cfg.weights!r}; allowed: one of {SAMPLING_WEIGHTS}")
    out = Path(cfg.out) if cfg.out else ckpt_path.with_suffix(SUFFIX)
    module, model_cfg, step = module_from_lightning(ckpt_path, cfg.run_dir)
    path = write_sdm(module, model_cfg, cfg.weights, step, out)
    log.info(
        "%s -> %s (%.1f kB; checkpoint %.1f kB)",
        ckpt_path,
        path,
        path.stat().st_size / 1e3,
        ckpt_path.stat().st_size / 1e3,
    )
    return path


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
