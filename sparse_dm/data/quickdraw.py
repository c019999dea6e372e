"""QuickDraw categories as stroke-3: sketch-rnn `.npz` files or raw `.ndjson` drawings.

`.npz` files go through the safe loader of `stroke3.py` and keep their own splits. `.ndjson` files
(Google's simplified format: one JSON object per line whose "drawing" is a list of strokes
[[x0, x1, ...], [y0, y1, ...](, [t0, ...])]) are converted here and split with a fixed seed.
Several categories are merged; with `conditional=True` each drawing carries its category index.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sparse_dm.data.stroke3 import (
    SPLITS,
    Stroke3DataModule,
    check_drawing,
    load_stroke3_npz,
    resolve_data_path,
)


def strokes_to_stroke3(strokes: Sequence[Sequence[Sequence[float]]]) -> np.ndarray:
    """[[xs], [ys], ...] per stroke -> (n, 3) stroke-3, pen = 1 on each stroke's last point.

    Row 0 is the first point's offset from the origin, as in sketch-rnn.
    """
    points, pens = [], []
    for stroke in strokes:
        xy = np.stack([np.asarray(stroke[0], np.float32), np.asarray(stroke[1], np.float32)], axis=1)
        if len(xy) == 0:
            continue
        pen = np.zeros(len(xy), np.float32)
        pen[-1] = 1.0
        points.append(xy)
        pens.append(pen)
    if not points:
        return np.zeros((0, 3), np.float32)
    absolute = np.concatenate(points)
    deltas = np.diff(absolute, axis=0, prepend=np.zeros((1, 2), np.float32))
    return np.concatenate([deltas, np.concatenate(pens)[:, None]], axis=1)


def load_ndjson(path: str | Path, sizes: Sequence[int], seed: int) -> dict[str, list[np.ndarray]]:
    """Fixed train/valid/test splits of an `.ndjson` file: shuffle line order with `seed`, then take
    `sizes` drawings per split (fewer if the file is short; the held-out splits are filled first).
    Each drawing is checked (`check_drawing`); errors name the file, split, index and line."""
    lines = Path(path).read_text().splitlines()
    order = np.random.default_rng(seed).permutation(len(lines))
    n_train, n_valid, n_test = sizes
    valid, test = order[:n_valid], order[n_valid : n_valid + n_test]
    train = order[n_valid + n_test : n_valid + n_test + n_train]
    return {
        split: [
            check_drawing(
                strokes_to_stroke3(json.loads(lines[i])["drawing"]),
                f"{path} [split {split}, drawing {j}, line {i + 1}]",
            )
            for j, i in enumerate(index)
        ]
        for split, index in zip(SPLITS, (train, valid, test), strict=True)
    }


class QuickDrawDataModule(Stroke3DataModule):
    """One or more QuickDraw categories from `root / file_pattern.format(category=...)`."""

    def __init__(
        self,
        root: str,
        categories: Sequence[str],
        file_pattern: str = "{category}.npz",
        conditional: bool = False,
        ndjson_split: Sequence[int] = (70000, 2500, 2500),
        split_seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        max_len: int = 300,
        scale: float = 10.0,
        num_train: int | None = None,
        val_batch_size: int | None = None,
        name: str = "quickdraw",
        seed: int = 0,
        too_long: str = "drop",
    ) -> None:
        super().__init__(
            root, batch_size, num_workers, max_len, scale, num_train, val_batch_size, name, seed, too_long
        )
        if not categories:
            raise ValueError("dataset.categories must name at least one QuickDraw category")
        self.root = root
        self.categories = list(categories)
        self.file_pattern = file_pattern
        self.conditional = conditional
        self.ndjson_split = tuple(ndjson_split)
        self.split_seed = split_seed

    def describe_source(self) -> str:
        return f"{self.root} (categories {self.categories})"

    def category_file(self, category: str) -> Path:
        return resolve_data_path(Path(self.root) / self.file_pattern.format(category=category))

    def _load_category(self, category: str) -> dict[str, list[np.ndarray]]:
        path = self.category_file(category)
        if path.suffix == ".ndjson":
            return load_ndjson(path, self.ndjson_split, self.split_seed)
        return load_stroke3_npz(path)

    def load_splits(self) -> dict[str, tuple[list[np.ndarray], list[int] | None]]:
        """Merged splits; num_train applies per category; labels = category index if conditional."""
        merged: dict[str, tuple[list[np.ndarray], list[int]]] = {s: ([], []) for s in SPLITS}
        for label, category in enumerate(self.categories):
            splits = self._load_category(category)
            splits["train"] = splits["train"][: self.num_train]
            for split in SPLITS:
                merged[split][0].extend(splits[split])
                merged[split][1].extend([label] * len(splits[split]))
        return {s: (d, labels if self.conditional else None) for s, (d, labels) in merged.items()}
