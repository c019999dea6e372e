"""Load a trained DiffusionModule from either a Lightning checkpoint (with its run folder) or an
`.sdm` export (self-contained). Both are read with `torch.load(weights_only=True)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sparse_dm.files.checkpoint import read_checkpoint
from sparse_dm.files.safetensors_file import SUFFIX as SAFETENSORS_SUFFIX
from sparse_dm.files.safetensors_file import read_safetensors
from sparse_dm.run.build import build_run
from sparse_dm.run.folder import load_run_config, run_dir_of
from sparse_dm.run.sdm import SUFFIX as SDM_SUFFIX
from sparse_dm.run.sdm import module_from_sdm, read_sdm
from sparse_dm.training.modules.diffusion import DiffusionModule

EXPORT_SUFFIXES = (SAFETENSORS_SUFFIX, SDM_SUFFIX)


def module_from_lightning(
    ckpt_path: Path, run_dir: str | None = None
) -> tuple[DiffusionModule, dict[str, Any], int | None]:
    """(module with the checkpoint's weights and masks, the run's resolved `model` config, step)."""
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt_path}")
    run_cfg = load_run_config(run_dir_of(ckpt_path, run_dir))
    module, _, _ = build_run(run_cfg)
    checkpoint = read_checkpoint(ckpt_path)
    module.load_state_dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    model_cfg = OmegaConf.to_container(run_cfg.model, resolve=True)
    return module.eval(), model_cfg, checkpoint.get("global_step")


def load_module(path: Path, run_dir: str | None = None) -> tuple[DiffusionModule, int | None]:
    """A module ready to sample, from a `.ckpt` (Lightning, needs its run folder) or an export
    (`.safetensors`, or the earlier `.sdm`), which is self-contained."""
    if path.suffix in EXPORT_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"no exported model at {path}")
        payload = read_safetensors(path) if path.suffix == SAFETENSORS_SUFFIX else read_sdm(path)
        return module_from_sdm(payload), payload["step"]
    module, _, step = module_from_lightning(path, run_dir)
    return module, step
