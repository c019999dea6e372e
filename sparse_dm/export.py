"""`python -m sparse_dm.export ckpt_path=RUN/checkpoints/last.ckpt [out=...] [weights=ema|raw]`:
a trained sparse model as a small, standard file, with a model card beside it.

`out` ending in `.safetensors` (the default: `<run>/export/model.safetensors`) writes safetensors: every
masked weight as CSR over its mask (values + int32 row pointers + the narrowest integer column indices),
every other tensor dense, the model config and per-layer counts in the JSON header
(sparse_dm.files.safetensors_file), and `README.md` beside it (sparse_dm.run.model_card). `out` ending in
`.sdm` writes the earlier plain-torch format (sparse_dm.run.sdm), which sample and evaluate still read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sparse_dm.files.safetensors_file import SUFFIX as SAFETENSORS_SUFFIX
from sparse_dm.files.safetensors_file import write_safetensors
from sparse_dm.run.folder import load_run_config, run_dir_of
from sparse_dm.run.load import module_from_lightning
from sparse_dm.run.model_card import model_card, write_model_card
from sparse_dm.run.sdm import SUFFIX as SDM_SUFFIX
from sparse_dm.run.sdm import export_payload, write_sdm
from sparse_dm.training.modules.diffusion import SAMPLING_WEIGHTS

log = logging.getLogger(__name__)

SUFFIXES = (SAFETENSORS_SUFFIX, SDM_SUFFIX)
CARD = "README.md"


def export(cfg: DictConfig) -> Path:
    ckpt_path = Path(cfg.ckpt_path)
    if cfg.weights not in SAMPLING_WEIGHTS:
        raise ValueError(f"invalid config: weights={cfg.weights!r}; allowed: one of {SAMPLING_WEIGHTS}")
    run_dir = run_dir_of(ckpt_path, cfg.run_dir)
    out = Path(cfg.out) if cfg.out else run_dir / "export" / f"model{SAFETENSORS_SUFFIX}"
    if out.suffix not in SUFFIXES:
        raise ValueError(f"invalid config: out={str(out)!r} must end in one of {SUFFIXES}")
    module, model_cfg, step = module_from_lightning(ckpt_path, cfg.run_dir)
    payload = export_payload(module, model_cfg, cfg.weights, step)
    if out.suffix == SDM_SUFFIX:
        path = write_sdm(payload, out)
    else:
        card = model_card(payload, load_run_config(run_dir), run_dir, out.name)
        log.info("model card: %s", write_model_card(card, out.with_name(CARD)))  # refuses before writing
        path = write_safetensors(payload, out)
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
