"""ChiroDiff on the shared diffusion module: padded delta sequences in, PNG sketch grids out.

Sampling draws each sample's length from a pool of real held-out drawing lengths (the validation
split of the datamodule, picked up in `setup`; kept in checkpoints), runs the configured sampler on
packed sequences, and splits strokes where the pen channel reaches `sampling.pen_threshold`.

Every sample grid also yields sketch statistics (`sparse_dm.metrics.sketch_stats`) of the samples and
of as many held-out drawings, both in the normalised delta units the model generates in; they go to
the loggers (`sketch/*`, `sketch_data/*`) and, via `sketch_stats_record`, into summary.json.

At the end of a run, `sample_quality` scores `sketch_metric.num_samples` fresh samples against the
test split in the offline sketch-feature space (`fsd_<space>`, `ksd_<space>`; not Inception FID, see
docs/sketch_metric.md); summary.json carries them under `metrics`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparse_dm.metrics.images_for_fid import digest
from sparse_dm.metrics.sketch_features import MIN_SAMPLES, load_sketch_features, sketch_fidelity
from sparse_dm.metrics.sketch_stats import sketch_stats
from sparse_dm.sketch.rasterise import render_batch, save_grid_png
from sparse_dm.sketch.representation import DATA_CHANNELS, deltas_to_strokes
from sparse_dm.training.modules.diffusion import (
    DiffusionBatch,
    DiffusionModule,
    OptimizerFactory,
    SchedulerFactory,
)

LENGTH_POOL_KEY = "chirodiff_length_pool"


def check_sketch_metric(cfg: dict) -> None:
    """`model.sketch_metric`: num_samples 0 (off) or >= the metric's minimum; weights with their hash."""
    num = cfg.get("num_samples")
    if not (isinstance(num, int) and not isinstance(num, bool) and (num == 0 or num >= MIN_SAMPLES)):
        raise ValueError(
            f"model.sketch_metric.num_samples={num!r}; allowed: 0 (off) or an integer >= "
            f"{MIN_SAMPLES} (the sketch metric's values depend on the count; runs are compared at one)"
        )
    if (cfg.get("weights") is None) != (cfg.get("sha256") is None):
        raise ValueError(
            "model.sketch_metric.weights and model.sketch_metric.sha256 go together "
            "(a weights file is checked against its content hash before it is read); set both or neither"
        )


class ChiroDiffModule(DiffusionModule):
    """`render`: {canvas_size, line_width, margin} of the PNG grid (see sparse_dm.sketch.rasterise).
    `cost_seq_len`: the sequence length FLOPs are counted at (`example_net_inputs`); the presets'
    values are calibrated to the paper's Dense FLOPs (see conf/model/chirodiff.yaml), not measured."""

    def __init__(
        self,
        name: str,
        net: nn.Module,
        diffusion: dict,
        optimizer: OptimizerFactory,
        ema: dict,
        sampling: dict,
        validation: dict,
        render: dict,
        cost_seq_len: int,
        lr_scheduler: SchedulerFactory | None = None,
        sketch_metric: dict | None = None,
    ) -> None:
        super().__init__(name, net, diffusion, optimizer, ema, sampling, validation, lr_scheduler)
        self.sketch_metric_cfg = dict(sketch_metric or {"num_samples": 0})
        check_sketch_metric(self.sketch_metric_cfg)
        self.quality_reference: list[Tensor] | None = None
        self.render_cfg = dict(render)
        self.cost_seq_len = cost_seq_len
        class_embed = getattr(net, "class_embed", None)
        self.num_classes = None if class_embed is None else class_embed.num_embeddings
        self.register_buffer("length_pool", torch.zeros(0, dtype=torch.long), persistent=False)
        self.sample_stats: dict[str, float] | None = None
        self.data_stats: dict[str, float] | None = None

    # ----- length pool ----------------------------------------------------------------------
    def set_length_pool(self, lengths: Tensor) -> None:
        """Sequence lengths that `generate` draws from (real held-out drawings)."""
        self.length_pool = torch.as_tensor(lengths, dtype=torch.long, device=self.length_pool.device)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if len(self.length_pool) == 0 and hasattr(datamodule, "length_pool"):
            self.set_length_pool(datamodule.length_pool())
        if self.data_stats is None and hasattr(datamodule, "heldout_drawings"):
            drawings = datamodule.heldout_drawings(int(self.sampling_cfg["num_samples"]))
            self.data_stats = sketch_stats(drawings, self.pen_threshold)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[LENGTH_POOL_KEY] = self.length_pool.cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if LENGTH_POOL_KEY in checkpoint:
            self.set_length_pool(checkpoint[LENGTH_POOL_KEY])

    # ----- DiffusionModule hooks ------------------------------------------------------------
    def prepare_batch(self, batch: dict[str, Tensor]) -> DiffusionBatch:
        """Collated stroke-3 batch -> deltas, a (B, L, 1) padding mask and lengths for packing."""
        cond = None
        if self.num_classes is not None:
            if "label" not in batch:
                raise ValueError("class-conditional ChiroDiff needs labelled data (dataset.conditional=true)")
            cond = batch["label"]
        return DiffusionBatch(
            x0=batch["x"], mask=batch["mask"][..., None], cond=cond, extra={"lengths": batch["lengths"]}
        )

    def predict_eps(self, x_t: Tensor, t: Tensor, batch: DiffusionBatch) -> Tensor:
        return self.denoiser(x_t, t, batch.extra["lengths"], batch.cond)

    def draw_lengths(self, num_samples: int, generator: torch.Generator) -> Tensor:
        if len(self.length_pool) == 0:
            raise RuntimeError(
                "no length pool: fit with a stroke-3 datamodule, load a checkpoint, call "
                "set_length_pool(...), or pass lengths= to generate()"
            )
        index = torch.randint(0, len(self.length_pool), (num_samples,), generator=generator)
        return self.length_pool.cpu()[index]

    @torch.no_grad()
    def generate(
        self,
        num_samples: int,
        generator: torch.Generator,
        lengths: Tensor | None = None,
        labels: Tensor | None = None,
        **overrides: Any,
    ) -> list[Tensor]:
        """Sample drawings as (n_i, 3) delta tensors on the CPU.

        `lengths` (default: drawn from the length pool), `labels` (class-conditional nets; default:
        classes in turn, 0, 1, ..., so a grid with one column per class reads by class), and
        sampler overrides (sampler, steps, eta). Noise comes from the CPU `generator`.
        """
        if lengths is None:
            lengths = self.draw_lengths(num_samples, generator)
        lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
        if len(lengths) != num_samples:
            raise ValueError(f"got {len(lengths)} lengths for {num_samples} samples")
        if self.num_classes is not None and labels is None:
            labels = torch.arange(num_samples) % self.num_classes
        cond = None if labels is None else torch.as_tensor(labels, dtype=torch.long).to(self.device)
        x_T = torch.randn((num_samples, int(lengths.max()), DATA_CHANNELS), generator=generator)

        def eps_fn(x: Tensor, t: Tensor) -> Tensor:
            return self.denoiser(x, t, lengths, cond)

        x0 = self.sample_with(eps_fn, x_T.to(self.device), generator, **overrides).cpu()
        return [x0[i, :n] for i, n in enumerate(lengths.tolist())]

    @property
    def pen_threshold(self) -> float:
        return float(self.sampling_cfg["pen_threshold"])

    def save_samples(self, samples: list[Tensor], path: Path) -> Path:
        """Render a PNG grid (one column per class for conditional nets, else square-ish) and keep
        the sketch statistics of what was rendered in `sample_stats`."""
        self.sample_stats = sketch_stats(samples, self.pen_threshold)
        drawings = [deltas_to_strokes(s, self.pen_threshold) for s in samples]
        ncols = self.num_classes or math.ceil(math.sqrt(len(drawings)))
        return save_grid_png(drawings, path, ncols, **self.render_cfg)

    @torch.no_grad()
    def samples_to_images(self, samples: list[Tensor] | list[np.ndarray]) -> Tensor:
        """Delta sequences -> strokes (the sampling pen threshold) -> the documented renderer, uint8 RGB."""
        return render_batch([deltas_to_strokes(d, self.pen_threshold) for d in samples], **self.render_cfg)

    def reference_identity(self, datamodule: Any, limit: int | None) -> str:
        """(dataset, split, rendering, count, content hash) of the training drawings FID compares with."""
        name = getattr(datamodule, "name", type(datamodule).__name__)
        datamodule.setup("fit")
        drawings = datamodule.datasets["train"].drawings[:limit]
        content = hashlib.sha256(b"".join(np.ascontiguousarray(d).tobytes() for d in drawings)).hexdigest()
        render = sorted(self.render_cfg.items()), self.pen_threshold
        return f"{name}|train|render={digest(render)}|n={len(drawings)}|{content[:16]}"

    def reference_batches(self, datamodule: Any, limit: int | None, batch_size: int) -> Iterator[Tensor]:
        """The first `limit` training drawings (None: all), rendered exactly like samples."""
        datamodule.setup("fit")
        drawings = datamodule.datasets["train"].drawings[:limit]
        for start in range(0, len(drawings), batch_size):
            yield self.samples_to_images(drawings[start : start + batch_size])

    def write_samples(self, tag: str | None = None) -> Path | None:
        """The base class's sample grid, plus its sketch statistics (and the data's) sent to the
        loggers at the current step."""
        path = super().write_samples(tag)
        if path is not None:
            metrics = {f"sketch/{k}": v for k, v in (self.sample_stats or {}).items()}
            metrics.update({f"sketch_data/{k}": v for k, v in (self.data_stats or {}).items()})
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=self.trainer.global_step)
        return path

    def prepare_sample_quality(self, datamodule: Any) -> None:
        """Keep the test split as the sketch metric's reference (refused, naming the key, when it holds
        fewer drawings than the metric needs) and check the extractor's weights load."""
        if not self.sketch_metric_cfg["num_samples"]:
            return
        test = getattr(datamodule, "datasets", {}).get("test")
        drawings = [] if test is None else test.drawings
        if len(drawings) < MIN_SAMPLES:
            raise ValueError(
                f"model.sketch_metric: the dataset's test split has {len(drawings)} drawings (after "
                f"dataset.max_len), the sketch metric needs >= {MIN_SAMPLES}; set "
                "model.sketch_metric.num_samples=0 to train without it"
            )
        load_sketch_features(self.sketch_metric_cfg.get("weights"), self.sketch_metric_cfg.get("sha256"))
        self.quality_reference = list(drawings)

    @torch.no_grad()
    def sample_quality(self) -> dict[str, float]:
        """fsd/ksd of `sketch_metric.num_samples` fresh samples (the sampling weights and sampler, their
        own seed, in batches of `sampling.num_samples`) against the test split."""
        cfg = self.sketch_metric_cfg
        if not cfg["num_samples"] or self.quality_reference is None:
            return {}
        generator = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
        samples: list[Tensor] = []
        batch = int(self.sampling_cfg["num_samples"])
        with self.sampling_weights():
            while len(samples) < cfg["num_samples"]:
                samples += self.generate(min(batch, cfg["num_samples"] - len(samples)), generator)
        return sketch_fidelity(
            samples,
            self.quality_reference,
            self.pen_threshold,
            cfg.get("weights"),
            cfg.get("sha256"),
            seed=int(cfg.get("seed", 0)),
        )

    @property
    def sketch_stats_record(self) -> dict[str, Any] | None:
        """summary.json's `sketch_stats`: the last sample grid's statistics beside the data's."""
        if self.sample_stats is None:
            return None
        return {
            "samples": self.sample_stats,
            "data": self.data_stats,
            "num_drawings": int(self.sampling_cfg["num_samples"]),
            "pen_threshold": self.pen_threshold,
        }

    def example_net_inputs(self, batch_size: int = 1) -> tuple:
        """(x_t, t[, lengths=None, labels]) of length `cost_seq_len` on self.net's device (meta ok).

        lengths=None means every sequence fills the whole length, so no packing (and no host copy)
        is needed.
        """
        device = next(self.net.parameters()).device
        x = torch.zeros((batch_size, self.cost_seq_len, DATA_CHANNELS), device=device)
        t = torch.zeros((batch_size,), dtype=torch.long, device=device)
        if self.num_classes is None:
            return x, t
        return x, t, None, torch.zeros((batch_size,), dtype=torch.long, device=device)
