"""SimCLR training of the sketch metric's extractor (sparse_dm.metrics.sketch_features.SketchEncoder).

Every drawing in a batch is augmented twice at the stroke level (sparse_dm.sketch.augment.StrokeAugment:
mild affine jitter, point jitter, stroke dropout), both views are rendered by the project's renderer,
and the NT-Xent loss pulls the two views of a drawing together and pushes the other drawings of the
batch away. Afterwards the embedding's per-coordinate mean and std over the unaugmented training
drawings are stored in the encoder, so the metric's features are standardised. The command is
`python -m sparse_dm.train_sketch_features`.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from sparse_dm.metrics.sketch_features import INPUT_SIZE, RenderSpec, SketchEncoder, images_to_input
from sparse_dm.sketch.augment import Drawing, StrokeAugment
from sparse_dm.sketch.rasterise import render_batch

EVAL_BATCH = 512  # drawings per forward pass when no gradient is needed
MIN_STD_RATIO = 1e-6  # an embedding coordinate this much less spread than the widest is dead


def machine() -> str:
    """CPU model, thread count and torch build, for every timing reported with the metric."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        model = names[0] if names else model
    return f"{model}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


@dataclass(frozen=True)
class SimCLRConfig:
    """The optimisation keys of conf/sketch_features.yaml; invalid values are refused by name."""

    epochs: int = 4
    batch_size: int = 256
    lr: float = 2e-3
    warmup_steps: int = 10
    weight_decay: float = 1e-4
    temperature: float = 0.2
    head_dim: int = 128
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        rules = {
            "epochs": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
            "batch_size": (lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
            "lr": (lambda v: v > 0, "> 0"),
            "warmup_steps": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
            "weight_decay": (lambda v: v >= 0, ">= 0"),
            "temperature": (lambda v: v > 0, "> 0"),
            "head_dim": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
            "seed": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
        }
        for key, (ok, allowed) in rules.items():
            if not ok(getattr(self, key)):
                raise ValueError(f"invalid config: {key}={getattr(self, key)!r}; allowed: {allowed}")

    @classmethod
    def from_mapping(cls, cfg: Any) -> SimCLRConfig:
        """The dataclass's keys picked from a (Hydra) mapping."""
        return cls(**{f.name: cfg[f.name] for f in fields(cls)})


def check_render(render: RenderSpec) -> None:
    if render.canvas_size < INPUT_SIZE or render.canvas_size % INPUT_SIZE:
        raise ValueError(
            f"invalid config: render.canvas_size={render.canvas_size}; allowed: a multiple of {INPUT_SIZE}"
        )


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """SimCLR's loss over 2B views (each view's positive is its twin, the other 2B - 2 are negatives),
    and the fraction of views whose most similar other view is their twin."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target), (sim.argmax(1) == target).float().mean()


def render_input(drawings: Sequence[Drawing], render: RenderSpec) -> Tensor:
    images = render_batch(drawings, render.canvas_size, render.line_width, render.margin)
    return images_to_input(images, render, INPUT_SIZE)


def views(
    drawings: Sequence[Drawing], augment: StrokeAugment, render: RenderSpec, rng: np.random.Generator
) -> Tensor:
    """One augmented view of each drawing as the encoder's input."""
    return render_input([augment(d, rng) for d in drawings], render)


@torch.no_grad()
def embed_all(encoder: SketchEncoder, drawings: Sequence[Drawing], render: RenderSpec) -> Tensor:
    """Raw embeddings of unaugmented drawings, EVAL_BATCH at a time."""
    return torch.cat(
        [
            encoder.embed(render_input(drawings[i : i + EVAL_BATCH], render))
            for i in range(0, len(drawings), EVAL_BATCH)
        ]
    )


@torch.no_grad()
def view_retrieval(
    encoder: SketchEncoder,
    head: nn.Module,
    drawings: Sequence[Drawing],
    augment: StrokeAugment,
    render: RenderSpec,
    rng: np.random.Generator,
    temperature: float,
) -> float:
    """Held-out check of what was learned: among all 2N views of N unseen drawings, how often a view's
    nearest neighbour is the other view of the same drawing (chance: 1 / (2N - 1))."""
    z1 = head(encoder.embed(views(drawings, augment, render, rng)))
    z2 = head(encoder.embed(views(drawings, augment, render, rng)))
    return float(nt_xent(z1, z2, temperature)[1])


def train_extractor(
    train_set: Sequence[Drawing],
    heldout: Sequence[Drawing],
    cfg: SimCLRConfig,
    augment: StrokeAugment,
    render: RenderSpec,
) -> tuple[SketchEncoder, dict[str, Any]]:
    """Train an encoder on `train_set`, standardise it on the same drawings, and measure its held-out
    view retrieval on `heldout`; returns it (eval mode) and a record of the run."""
    check_render(render)
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"invalid config: batch_size={cfg.batch_size}; allowed: <= the {len(train_set)} training drawings"
        )
    total = steps_per_epoch * cfg.epochs
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    encoder = SketchEncoder()
    head = nn.Sequential(
        nn.Linear(encoder.project.out_features, cfg.head_dim),
        nn.ReLU(),
        nn.Linear(cfg.head_dim, cfg.head_dim),
    )
    optimizer = torch.optim.AdamW(
        [*encoder.parameters(), *head.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay
    )

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 0 at the last step
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start = time.perf_counter()
    epoch_loss: list[float] = []
    epoch_accuracy: list[float] = []
    bar = tqdm(total=total, desc="sketch features (SimCLR)", disable=not cfg.progress)
    for _ in range(cfg.epochs):
        order = rng.permutation(len(train_set))
        losses, accuracies = [], []
        for b in range(steps_per_epoch):
            batch = [train_set[i] for i in order[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
            x = torch.cat([views(batch, augment, render, rng), views(batch, augment, render, rng)])
            z = head(encoder.embed(x))
            loss, accuracy = nt_xent(z[: len(batch)], z[len(batch) :], cfg.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            accuracies.append(accuracy.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accuracies[-1]:.2f}")
        epoch_loss.append(float(np.mean(losses)))
        epoch_accuracy.append(float(np.mean(accuracies)))
    bar.close()
    train_seconds = time.perf_counter() - start

    encoder.eval()
    head.eval()
    retrieval = view_retrieval(encoder, head, heldout, augment, render, rng, cfg.temperature)
    embeddings = embed_all(encoder, train_set, render)
    std = embeddings.std(0)
    dead = torch.nonzero(std < MIN_STD_RATIO * std.max()).flatten().tolist()
    if dead:
        raise RuntimeError(
            f"embedding coordinates {dead} are constant over the training set; train longer or reseed"
        )
    encoder.feature_mean.copy_(embeddings.mean(0))
    encoder.feature_std.copy_(std)
    record = {
        "train_drawings": len(train_set),
        "steps": total,
        "epoch_loss": epoch_loss,
        "epoch_train_view_accuracy": epoch_accuracy,
        "heldout_view_retrieval": retrieval,
        "heldout_chance": 1 / (2 * len(heldout) - 1),
        "heldout_drawings": len(heldout),
        "train_seconds": train_seconds,
        "machine": machine(),
    }
    return encoder, record
