"""FID/KID of a trained run: `python -m sparse_dm.evaluate ckpt_path=RUN/checkpoints/last.ckpt
num_samples=10000 sampling_steps=100`.

Rebuilds the run from the config it saved, loads the checkpoint, samples with the EMA weights
(sketches rendered by sparse_dm.sketch.rasterise, LDM images decoded from [-1, 1]) and compares them with
the training set. Results are merged into the run's summary.json only after everything succeeded:
`fid_by_steps[steps]` always, and the top-level `fid`, `kid_mean`, `kid_std`, `num_samples`,
`sampling_steps` when `steps` is the run's configured sampling steps (the paper's setting) or the run
has no FID yet, so Table 8 sweeps over steps never replace the main result (Table 8 sweep:
multirun_sweeps/table8_ddim_steps.yaml). Options: conf/evaluate.yaml. Quote paths that contain ','
or '=': ckpt_path="'...'".
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from sparse_dm.files.checkpoint import read_checkpoint
from sparse_dm.inference.prepare import BACKENDS, prepare
from sparse_dm.metrics.fidelity import (
    FidelityConfig,
    extract_stats,
    fidelity_from_stats,
    reference_stats,
    resolve_weights,
)
from sparse_dm.metrics.images_for_fid import generated_batches, reference_batches, reference_identity
from sparse_dm.run.build import build_run
from sparse_dm.run.checks import check_choice
from sparse_dm.run.folder import SUMMARY, load_run_config, run_dir_of
from sparse_dm.run.summary import merge_results
from sparse_dm.training.modules.diffusion import DiffusionModule

log = logging.getLogger(__name__)







def generate_images(
    module: DiffusionModule, cfg: DictConfig, steps: int, run_dir: Path
) -> Iterator[torch.Tensor]:
    """num_samples samples with the EMA weights, as uint8 RGB batches (streamed); a PNG grid is kept."""
    generator = torch.Generator().manual_seed(int(cfg.seed))
    grid_path = run_dir / "samples" / f"eval_steps{steps}.png"
    return generated_batches(
        module, cfg.num_samples, cfg.batch_size, generator, steps, grid_path, progress=True
    )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate one checkpoint; returns the FID/KID record also merged into the run's summary.json."""
    fidelity = FidelityConfig.from_mapping(OmegaConf.to_container(cfg.fidelity, resolve=True))
    check_choice("backend", cfg.backend, BACKENDS)
    resolve_weights(fidelity)  # fail before building or sampling anything
    ckpt_path = Path(cfg.ckpt_path)
    run_dir = run_dir_of(ckpt_path, cfg.run_dir)
    summary_path = run_dir / SUMMARY
    if not summary_path.is_file():
        raise FileNotFoundError(f"no {SUMMARY} in {run_dir}: evaluate runs that finished training")
    run_cfg = load_run_config(run_dir)
    module, datamodule, _ = build_run(run_cfg)
    checkpoint = read_checkpoint(ckpt_path)
    module.load_state_dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module.to(device).eval()
    weights = module.sampling_cfg["weights"]
    inference_cfg = OmegaConf.to_container(cfg.inference, resolve=True)
    form = prepare(module, cfg.backend, weights, inference_cfg, batch=int(cfg.batch_size))
    default_steps = int(run_cfg.model.sampling.steps)
    steps = int(cfg.sampling_steps or default_steps)
    identity = reference_identity(
        module, datamodule, cfg.num_reference
    )  # data errors surface before sampling
    batches = lambda: reference_batches(module, datamodule, cfg.num_reference, cfg.batch_size)  # noqa: E731
    reference = reference_stats(identity, batches, fidelity)
    generated = extract_stats(generate_images(module, cfg, steps, run_dir), fidelity)
    result = {
        **fidelity_from_stats(generated, reference, fidelity),
        "num_samples": generated.count,
        "sampling_steps": steps,
        "num_reference": reference.count,
        "feature_extractor": fidelity.feature_extractor,
        "eval_ckpt_path": str(ckpt_path),
        "backend": cfg.backend,
        "sparse_form": form,  # what backend=sparse ran: CSR matrices and the GRU loop
        "weights": weights,
        "eval_ckpt_step": int(checkpoint["global_step"]),  # the training step the scored weights hold
    }
    merge_results(summary_path, result, steps, default_steps)
    log.info(
        "%s (step %d): FID %.3f KID %.5f +- %.5f (%d samples, %d steps)",
        run_dir,
        result["eval_ckpt_step"],
        result["fid"],
        result["kid_mean"],
        result["kid_std"],
        result["num_samples"],
        steps,
    )
    return result


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["fid"]


if __name__ == "__main__":
    main()
