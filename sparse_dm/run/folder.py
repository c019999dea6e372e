"""A training run's folder: where it is, its resolved config and its summary file."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

RUN_CONFIG = "config.yaml"  # resolved config written by sparse_dm.train into the run dir


HYDRA_RUN_CONFIG = Path(".hydra") / "config.yaml"


SUMMARY = "summary.json"


def run_dir_of(ckpt_path: Path, run_dir: str | None) -> Path:
    """The training run's folder: given, or the parent of the checkpoint's `checkpoints/` folder."""
    return Path(run_dir) if run_dir else ckpt_path.resolve().parent.parent


def load_run_config(run_dir: Path) -> DictConfig:
    """The run's config (resolved copy if present), pointed at the run dir for outputs."""
    for name in (RUN_CONFIG, HYDRA_RUN_CONFIG):
        if (run_dir / name).is_file():
            cfg = OmegaConf.load(run_dir / name)
            cfg.paths.output_dir = str(run_dir)
            return cfg
    raise FileNotFoundError(
        f"no {RUN_CONFIG} or {HYDRA_RUN_CONFIG} in {run_dir}: is this a training run folder?"
    )
