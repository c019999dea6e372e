"""`make sketch-metric` / `python -m benchmarks.sketch_metric`: is fsd_kanjivg / ksd_kanjivg a usable metric?

Validates the offline sketch metric (sparse_dm.metrics.sketch_features) on the bundled KanjiVG
(kanji.rdp200.npz), always against its 500 test drawings, the reference of every KanjiVG run:
1. The floor: real drawings the extractor never trained on (valid split) and disjoint 500-drawing
   subsets of the training split, each vs the test split. A model cannot be told apart from the data
   below this level (the Fréchet distance of finite samples is biased upwards).
2. Corruptions of real drawings at growing levels (point noise, stroke jitter, stroke dropout;
   sparse_dm.sketch.augment): 500 valid drawings corrupted vs the test split (level 0 = the floor),
   and the test drawings themselves corrupted vs their clean selves (level 0 = exactly 0).
3. Optionally (`--samples`): sample files of a run's checkpoints (`python -m sparse_dm.sample ...
   num_samples=500`, which writes samples_<backend>.npz and .json), scored the same way.
4. The wall time of one `sketch_fidelity` call, 500 vs 500 drawings (render, features, FSD, KID).
Writes benchmarks/sketch_metric.json and docs/sketch_metric.md (generated from the JSON; do not edit).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from sparse_dm.files.checkpoint import read_checkpoint
from sparse_dm.metrics.sketch_features import (
    KANJIVG_PATH,
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    MIN_SAMPLES,
    SHIPPED_WEIGHTS,
    SketchFeatures,
    dataset_split,
    fidelity_from_features,
    load_sketch_features,
    sketch_fidelity,
)
from sparse_dm.metrics.sketch_training import machine
from sparse_dm.sketch.augment import Drawing, point_noise, stroke_dropout, stroke_jitter
from sparse_dm.sketch.representation import stroke3_to_strokes

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = MIN_SAMPLES  # drawings per side everywhere
FLOOR_SUBSETS = 5  # disjoint training subsets of SAMPLES drawings
TIMING_REPEATS = 3
CORRUPTIONS: dict[str, tuple[Callable[..., Drawing], list[float], str]] = {
    "point noise": (point_noise, [0.005, 0.01, 0.02, 0.04, 0.08], "std of every point's offset, x extent"),
    "stroke jitter": (stroke_jitter, [0.01, 0.02, 0.04, 0.08, 0.16], "std of every stroke's shift, x extent"),
    "stroke dropout": (stroke_dropout, [0.05, 0.1, 0.2, 0.4, 0.6], "probability that a stroke is removed"),
}


def corrupt(drawings: Sequence[Drawing], kind: str, level: float, seed: int) -> list[Drawing]:
    fn = CORRUPTIONS[kind][0]
    rng = np.random.default_rng(seed)
    return [fn(d, level, rng) for d in drawings]


def scores(extractor: SketchFeatures, features: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    out = fidelity_from_features(features, reference, extractor.dataset, seed=0)
    return {"fsd": out[f"fsd_{extractor.dataset}"], "ksd": out[f"ksd_{extractor.dataset}"]}


def floor(extractor: SketchFeatures, splits: dict[str, list[Drawing]], ref: torch.Tensor, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(splits["train"]))
    subsets = [
        scores(
            extractor, extractor([splits["train"][i] for i in order[k * SAMPLES : (k + 1) * SAMPLES]]), ref
        )
        for k in range(FLOOR_SUBSETS)
    ]
    valid = scores(extractor, extractor(splits["valid"][:SAMPLES]), ref)
    return {
        "valid_vs_test": valid,
        "train_subsets_vs_test": subsets,
        "train_fsd_mean": statistics.mean(s["fsd"] for s in subsets),
        "train_fsd_sd": statistics.stdev(s["fsd"] for s in subsets),
        "train_ksd_mean": statistics.mean(s["ksd"] for s in subsets),
        "train_ksd_sd": statistics.stdev(s["ksd"] for s in subsets),
    }


def corruption_rows(
    extractor: SketchFeatures, splits: dict[str, list[Drawing]], ref: torch.Tensor, seed: int
) -> list[dict]:
    rows = []
    valid = splits["valid"][:SAMPLES]
    for kind, (_, levels, meaning) in CORRUPTIONS.items():
        clean = {
            "level": 0.0,
            "valid_vs_test": scores(extractor, extractor(valid), ref),
            "test_vs_test": scores(extractor, ref, ref),
        }
        points = [clean]
        for level in levels:
            points.append(
                {
                    "level": level,
                    "valid_vs_test": scores(extractor, extractor(corrupt(valid, kind, level, seed)), ref),
                    "test_vs_test": scores(
                        extractor, extractor(corrupt(splits["test"], kind, level, seed)), ref
                    ),
                }
            )
        monotone = {
            f"{side}_{metric}": all(a[side][metric] < b[side][metric] for a, b in itertools.pairwise(points))
            for side in ("valid_vs_test", "test_vs_test")
            for metric in ("fsd", "ksd")
        }
        rows.append({"kind": kind, "meaning": meaning, "points": points, "strictly_increasing": monotone})
    return rows


def load_samples(path: Path) -> tuple[list[np.ndarray], dict[str, Any]]:
    """`sparse_dm.sample`'s .npz (concatenated deltas + lengths) and its .json (step, weights, ...)."""
    with np.load(path, allow_pickle=False) as data:
        deltas, lengths = data["deltas"], data["lengths"]
    drawings = np.split(deltas, np.cumsum(lengths)[:-1])
    info_path = path.with_suffix(".json")
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return drawings, info


def run_of(samples: Path) -> Path | None:
    """The training run folder a samples file lies in (the first parent holding .hydra/overrides.yaml)."""
    return next((p for p in samples.resolve().parents if (p / ".hydra" / "overrides.yaml").is_file()), None)


def checkpoint_val_loss(run: Path | None, step: int | None) -> float | None:
    """The `val/loss` for which ModelCheckpoint saved `<run>/checkpoints/step_<step>.ckpt` (its
    `current_score`), or None when there is no such checkpoint."""
    ckpt = None if run is None or step is None else run / "checkpoints" / f"step_{step:06d}.ckpt"
    if ckpt is None or not ckpt.is_file():
        return None
    callbacks = read_checkpoint(ckpt, mmap=True)["callbacks"]
    scores = [
        float(state["current_score"])
        for name, state in callbacks.items()
        if name.startswith("ModelCheckpoint") and state.get("monitor") == "val/loss"
    ]
    return scores[0] if scores else None


def checkpoint_rows(paths: Sequence[Path], reference: list[np.ndarray], pen_threshold: float) -> list[dict]:
    rows = []
    for path in paths:
        drawings, info = load_samples(path)
        out = sketch_fidelity(drawings, reference, pen_threshold=pen_threshold)
        run = run_of(path)
        rows.append(
            {
                "samples": str(path),
                "run": None if run is None else str(run),
                "run_overrides": None
                if run is None
                else list(OmegaConf.load(run / ".hydra" / "overrides.yaml")),
                "step": info.get("step"),
                "sampling_weights": info.get("weights"),
                "val_loss": checkpoint_val_loss(run, info.get("step")),
                "fsd": out["fsd_kanjivg"],
                "ksd": out["ksd_kanjivg"],
                "ksd_std": out["ksd_kanjivg_std"],
                "n": len(drawings),
            }
        )
    return sorted(rows, key=lambda r: (r["step"] is None, r["step"]))


def timing(reference: list[np.ndarray], generated: list[np.ndarray]) -> dict[str, float]:
    """Median wall time of sketch_fidelity (extractor already loaded, as in a run after its first call),
    with the 1-minute load average before and after: the CPU may be shared."""
    sketch_fidelity(generated, reference)
    load_before = os.getloadavg()[0]
    times = []
    for _ in range(TIMING_REPEATS):
        start = time.perf_counter()
        sketch_fidelity(generated, reference)
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": TIMING_REPEATS,
        "load_average_1min": [load_before, os.getloadavg()[0]],
    }


def run(samples: Sequence[Path], pen_threshold: float, seed: int) -> dict[str, Any]:
    extractor = load_sketch_features()
    raw = {s: dataset_split(KANJIVG_PATH, s) for s in ("train", "valid", "test")}
    splits = {s: [stroke3_to_strokes(d) for d in v] for s, v in raw.items()}
    ref = extractor(splits["test"])
    return {
        "machine": machine(),
        "dataset": KANJIVG_PATH,
        "split_sizes": {s: len(v) for s, v in raw.items()},
        "weights": {"file": SHIPPED_WEIGHTS.name, "sha256": extractor.sha256},
        "render": {
            "canvas_size": extractor.render.canvas_size,
            "line_width": extractor.render.line_width,
            "margin": extractor.render.margin,
            "input_size": extractor.input_size,
            "extent_pixels": (extractor.render.canvas_size - 2 * extractor.render.margin)
            * extractor.input_size
            / extractor.render.canvas_size,
        },
        "samples_per_side": SAMPLES,
        "kid": {"subsets": KID_SUBSETS, "subset_size": KID_SUBSET_SIZE},
        "floor": floor(extractor, splits, ref, seed),
        "corruptions": corruption_rows(extractor, splits, ref, seed),
        "checkpoints": checkpoint_rows(samples, raw["test"], pen_threshold),
        "timing_500_vs_500": timing(raw["test"], raw["valid"][:SAMPLES]),
    }


def within_floor_noise(row: dict[str, Any], floor_: dict[str, Any]) -> list[float]:
    """Corruption levels whose valid -> test fsd is within two floor sds of the uncorrupted value."""
    base = row["points"][0]["valid_vs_test"]["fsd"]
    return [
        p["level"]
        for p in row["points"][1:]
        if abs(p["valid_vs_test"]["fsd"] - base) < 2 * floor_["train_fsd_sd"]
    ]


def write_markdown(results: dict[str, Any], path: Path) -> Path:
    f, w, r = results["floor"], results["weights"], results["render"]
    pixel = 1 / r["extent_pixels"]
    sizes = ", ".join(f"{k} {v}" for k, v in results["split_sizes"].items())
    lines = [
        "# The offline sketch metric: fsd_kanjivg and ksd_kanjivg",
        "",
        "(Generated by `make sketch-metric` from benchmarks/sketch_metric.json; do not edit.)",
        "",
        "**What it is.** FID and KID by torch-fidelity's own formulas, computed in the 64-d feature space",
        "of a small CNN (about 0.19M weights) trained self-supervised (SimCLR, stroke-level augmentations)",
        "on the KanjiVG training drawings (`python -m sparse_dm.train_sketch_features`; weights",
        f"`sparse_dm/metrics/assets/{w['file']}`, sha256 `{w['sha256']}`). It is **not** Inception FID",
        "and cannot be compared with any published FID: `fsd_kanjivg` is the Fréchet distance and",
        "`ksd_kanjivg` the kernel (KID) distance in this space; lower is better. Drawings are rendered",
        f"by sparse_dm.sketch.rasterise ({r['canvas_size']} px, line width {r['line_width']}, margin",
        f"{r['margin']}) and read at {r['input_size']} px, where a drawing's extent spans",
        f"{r['extent_pixels']:g} pixels (one pixel = {pixel:.3f} of the extent).",
        "",
        f"Reference: the test split of `{results['dataset']}` ({sizes}). {results['samples_per_side']}",
        f"drawings per side everywhere; KID over {results['kid']['subsets']} subsets of",
        f"{results['kid']['subset_size']}. Machine: {results['machine']}.",
        "",
        "**Where it is reported.** Every ChiroDiff training run ends by scoring 500 fresh samples (the",
        "sampling weights and sampler, seed `model.sketch_metric.seed`) against its dataset's test split:",
        "`fsd_kanjivg`, `ksd_kanjivg`, `ksd_kanjivg_std` in summary.json's `metrics` and the loggers",
        "(`model.sketch_metric.num_samples=0` turns it off; a test split under 500 drawings is refused",
        "before training). The study reports show them per arm. Another stroke-3 dataset gets its own",
        "space with `python -m sparse_dm.train_sketch_features` (then `model.sketch_metric.weights` and",
        "`.sha256`); scored in the KanjiVG space, its numbers are distances in a space not trained on it.",
        "",
        "## 1. The floor: real drawings vs the test split",
        "",
        "| real drawings (500) | fsd_kanjivg | ksd_kanjivg |",
        "|---|---|---|",
        f"| valid split (unseen by the extractor) | {f['valid_vs_test']['fsd']:.3f} | "
        f"{f['valid_vs_test']['ksd']:.4f} |",
        f"| train split, {len(f['train_subsets_vs_test'])} disjoint subsets: mean ± sd | "
        f"{f['train_fsd_mean']:.3f} ± {f['train_fsd_sd']:.3f} | "
        f"{f['train_ksd_mean']:.4f} ± {f['train_ksd_sd']:.4f} |",
        "",
        "Samples that score at the floor cannot be told apart from real KanjiVG drawings with 500",
        "drawings per side, and two runs whose scores differ by less than about two floor sds are not",
        "distinguished by the metric at this sample count.",
        "",
        "## 2. Corrupted real drawings",
        "",
        "Each corruption acts on the strokes (sparse_dm.sketch.augment), at levels in units of the",
        "drawing's extent. *valid → test*: the first 500 valid drawings corrupted, scored against the",
        "clean test split (level 0 is the floor). *test → test*: the test drawings corrupted, scored",
        "against themselves clean; at level 0 the Fréchet distance is 0, while KID is",
        "−(2/n)(k̄_diag − k̄_off) < 0, not 0: its two subsets are drawn from the same 500 points, so its",
        "cross term sometimes meets a point with itself (tests/metrics/test_sketch_features.py checks this",
        "expectation). The extractor's training augmentations were point jitter 0.01 and stroke dropout",
        "0.1 (plus ±10° rotation, ±15% scale, ±0.1 shear), so it was taught to ignore changes that small.",
        "",
    ]
    for row in results["corruptions"]:
        lines += [
            f"### {row['kind']} ({row['meaning']})",
            "",
            "| level | fsd valid → test | ksd valid → test | fsd test → test | ksd test → test |",
            "|---|---|---|---|---|",
        ]
        for p in row["points"]:
            v, t = p["valid_vs_test"], p["test_vs_test"]
            lines.append(
                f"| {p['level']:g} | {v['fsd']:.3f} | {v['ksd']:.4f} | {t['fsd']:.3f} | {t['ksd']:.4f} |"
            )
        verdicts = ", ".join(
            f"{k.replace('_vs_test', '').replace('_', ' ')}: {'yes' if v else '**no**'}"
            for k, v in row["strictly_increasing"].items()
        )
        quiet = within_floor_noise(row, f)
        lines += [
            "",
            f"Strictly increasing over the {len(row['points'])} levels (valid / test side, fsd / ksd): "
            f"{verdicts}.",
            "Levels within two floor sds of the floor on the valid side: "
            + (", ".join(f"{q:g}" for q in quiet) if quiet else "none")
            + ".",
            "",
        ]
    lines += ["## 3. Along a training run's checkpoints", ""]
    if results["checkpoints"]:
        runs = sorted({" ".join(c["run_overrides"] or []) for c in results["checkpoints"]})
        lines += [
            "Samples of each checkpoint of `python -m sparse_dm.train " + "`, `".join(runs) + "`, drawn by",
            "`python -m sparse_dm.sample ckpt_path=<checkpoint> num_samples=500 backend=dense` (seed 0,",
            "the run's sampler), scored against the test split; val loss: the one each checkpoint was",
            "saved with (EMA weights, as sampled).",
            "",
            "| step | weights | val loss | fsd_kanjivg | ksd_kanjivg (± std over subsets) | samples |",
            "|---|---|---|---|---|---|",
        ]
        for c in results["checkpoints"]:
            val = "" if c["val_loss"] is None else f"{c['val_loss']:.4f}"
            lines.append(
                f"| {c['step']} | {c['sampling_weights']} | {val} | {c['fsd']:.3f} | "
                f"{c['ksd']:.4f} ± {c['ksd_std']:.4f} | {c['n']} |"
            )
        fsd = [c["fsd"] for c in results["checkpoints"]]
        falling = all(a > b for a, b in itertools.pairwise(fsd))
        lines += [
            "",
            f"fsd_kanjivg strictly falling along the checkpoints: {'yes' if falling else '**no**'}.",
            "",
        ]
    else:
        lines += ["Not measured in this run of the script (no `--samples` given).", ""]
    t = results["timing_500_vs_500"]
    load = " / ".join(f"{x:.1f}" for x in t["load_average_1min"])
    lines += [
        "## 4. Cost",
        "",
        "One `sketch_fidelity(generated, reference)` call, 500 vs 500 drawings (render both sides, extract",
        f"features, Fréchet distance, KID over {results['kid']['subsets']} subsets), extractor loaded:",
        f"median {t['median_s']:.2f} s of {t['repeats']} (min {t['min_s']:.2f} s) on {results['machine']};",
        f"1-minute load average before / after: {load} (2 cores, shared).",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, nargs="*", default=[], help="sparse_dm.sample .npz files")
    parser.add_argument(
        "--pen-threshold", type=float, default=0.5, help="the samples' sampling.pen_threshold"
    )
    parser.add_argument("--seed", type=int, default=0, help="training subsets and corruption noise")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("sketch_metric.json"))
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "sketch_metric.md")
    args = parser.parse_args()
    results = run(args.samples, args.pen_threshold, args.seed)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(write_markdown(results, args.markdown).read_text())


if __name__ == "__main__":
    main()
