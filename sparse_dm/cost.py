"""`python -m sparse_dm.cost <train overrides>`: parameters, FLOPs and resources of a run without training.

The model is built on the meta device (no memory, no weights), one batch-1 forward with hooks
measures how often each weight is used, and the method's exact per-layer counts give the sparse
figures. The resources section gives one checkpoint's size, the steps, the disk the checkpoint
policy needs (sparse_dm.planning.disk, the same estimate train.py checks before fitting) and the GPU
memory of a training step at the configured batch size (sparse_dm.planning.memory). Writes cost.json
in the run's output dir and prints a table. All presets at once:
`python -m sparse_dm.cost -m experiment=ldm_celebahq,ldm_lsun_bedrooms,ldm_imagenette,ldm_imagenet_cond`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from sparse_dm.planning.cost import (
    compute_cost,
    compute_resources,
    format_resources,
    format_table,
)
from sparse_dm.run import checks as config

log = logging.getLogger(__name__)
















@hydra.main(version_base="1.3", config_path="conf", config_name="cost")
def main(cfg: DictConfig) -> None:
    config.validate(cfg)
    with torch.device("meta"):
        module = instantiate(cfg.model, _convert_="all")
    cost = compute_cost(cfg, module)
    cost["resources"] = compute_resources(cfg, module)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(cost, indent=2))
    print(format_table(cost))
    print(format_resources(cost["resources"]))
    print(f"\nwrote {out / 'cost.json'}")


if __name__ == "__main__":
    main()
