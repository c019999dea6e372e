"""`python -m sparse_dm.train_sketch_features [overrides]`: train the sketch metric's feature extractor.

Self-supervised (SimCLR, sparse_dm.metrics.sketch_training) on the training split of any stroke-3
dataset group (conf/sketch_features.yaml); the validation split measures held-out view retrieval.
Writes `<out>` (weights, loaded with weights_only after a sha256 check) and `<out>.json` (its sha256,
loss per epoch, retrieval, wall time and machine). To ship new KanjiVG weights, copy `<out>` to
sparse_dm/metrics/assets/sketch_features_kanjivg.pt and pin the printed sha256 as SHIPPED_SHA256.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sparse_dm.metrics.sketch_features import RenderSpec, save_weights
from sparse_dm.metrics.sketch_training import SimCLRConfig, train_extractor
from sparse_dm.sketch.augment import StrokeAugment
from sparse_dm.sketch.representation import stroke3_to_strokes

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="sketch_features")
def main(cfg: DictConfig) -> None:
    simclr = SimCLRConfig.from_mapping(cfg)
    augment = StrokeAugment(**cfg.augment)
    render = RenderSpec(**cfg.render)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    splits = instantiate(cfg.dataset).load_splits()
    train_set, heldout = ([stroke3_to_strokes(d) for d in splits[s][0]] for s in ("train", "valid"))
    encoder, record = train_extractor(train_set, heldout, simclr, augment, render)

    out = Path(cfg.out)
    sha256 = save_weights(encoder, render, str(cfg.dataset.name), out)
    record = {
        "weights": str(out),
        "sha256": sha256,
        "bytes": out.stat().st_size,
        "dataset": str(cfg.dataset.name),
        **record,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    out.with_suffix(out.suffix + ".json").write_text(json.dumps(record, indent=2) + "\n")
    log.info(
        "%d steps in %.0f s; held-out view retrieval %.3f (chance %.4f); wrote %s",
        *(record[k] for k in ("steps", "train_seconds", "heldout_view_retrieval", "heldout_chance")),
        out,
    )
    print(f"sha256 {sha256}  {out}")


if __name__ == "__main__":
    main()
