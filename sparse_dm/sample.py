"""`python -m sparse_dm.sample ckpt_path=... [backend=sparse|dense]`: checkpoint in, samples out.

Loads a Lightning checkpoint (with its run folder) or an `.sdm` export, optionally converts the
denoiser to the sparse inference form (sparse_dm.inference), samples `num_samples` with the model's
sampler and a fixed seed, and writes `samples_<backend>.png` (grid), `samples_<backend>.npz` and
`samples_<backend>.json` (step, weights, timing and, for sketches, the sketch statistics).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sparse_dm.inference.prepare import BACKENDS, prepare
from sparse_dm.run.checks import check_choice
from sparse_dm.run.load import EXPORT_SUFFIXES, load_module
from sparse_dm.training.modules.diffusion import SAMPLING_WEIGHTS

log = logging.getLogger(__name__)







def save_arrays(samples: Any, path: Path) -> Path:
    """Sketches (list of (n_i, 3) deltas) as concatenated deltas + lengths; images as uint8 arrays."""
    if isinstance(samples, list):
        arrays = {
            "deltas": torch.cat(samples).numpy(),
            "lengths": np.array([len(s) for s in samples], dtype=np.int64),
        }
    else:
        arrays = {"images": samples.detach().cpu().numpy()}
    np.savez(path, **arrays)
    return path


def sample(cfg: DictConfig) -> dict[str, Any]:
    check_choice("backend", cfg.backend, BACKENDS)
    if cfg.weights is not None:
        check_choice("weights", cfg.weights, SAMPLING_WEIGHTS)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    inference_cfg = OmegaConf.to_container(cfg.inference, resolve=True)
    path = Path(cfg.ckpt_path)
    if path.suffix in EXPORT_SUFFIXES and cfg.weights is not None:
        raise ValueError(
            f"invalid config: weights={cfg.weights} with an exported {path.suffix} file; allowed: null (the "
            "file holds the weights it was exported with)"
        )
    module, step = load_module(path, cfg.run_dir)
    if path.suffix in EXPORT_SUFFIXES:
        exported = "as exported"
        weights = "raw"  # the exported weights are the module's own
        out_dir = Path(cfg.out_dir) if cfg.out_dir else path.parent
    else:
        weights = cfg.weights or module.sampling_cfg["weights"]
        exported = weights
        out_dir = Path(cfg.out_dir) if cfg.out_dir else path.resolve().parent.parent / "samples"
    form = prepare(module, cfg.backend, weights, inference_cfg, batch=int(cfg.num_samples))
    overrides = {} if cfg.steps is None else {"steps": int(cfg.steps)}
    generator = torch.Generator().manual_seed(int(cfg.seed))
    start = time.perf_counter()
    with module.sampling_weights():
        samples = module.generate(int(cfg.num_samples), generator, **overrides)
    seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = module.save_samples(samples, out_dir / f"samples_{cfg.backend}.png")
    arrays = save_arrays(samples, out_dir / f"samples_{cfg.backend}.npz")
    record = {
        "step": step,
        "weights": exported,
        "backend": cfg.backend,
        "sparse_form": form,
        "seconds": seconds,
        "sketch_stats": getattr(module, "sample_stats", None),  # ChiroDiff: measured by save_samples
    }
    (out_dir / f"samples_{cfg.backend}.json").write_text(json.dumps(record, indent=2))
    log.info(
        "%d samples (step %s, %s weights, %s) in %.2f s -> %s, %s; sketch stats %s",
        cfg.num_samples,
        step,
        exported,
        cfg.backend,
        seconds,
        grid,
        arrays,
        record["sketch_stats"],
    )
    return {**record, "grid": grid, "arrays": arrays, "samples": samples}


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
