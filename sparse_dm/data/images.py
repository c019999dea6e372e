"""Image data for Latent Diffusion: folders of images from user paths, and embedded KanjiVG images.

Images are center-cropped to a square, resized to ``resolution`` and scaled to [-1, 1] (what the
VQ first stage expects). The paper trains on fixed subsets (CelebA-HQ 12,500 / 500, LSUN-Bedrooms
10,598 / 2,500); ``subset_indices`` draws them deterministically from a seed. No augmentation is
applied, so latents can be computed once with the frozen first stage and cached exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sparse_dm.data.loader import ResumableDataLoader
from sparse_dm.data.stroke3 import load_stroke3_npz, resolve_data_path, stroke3_to_strokes
from sparse_dm.eval.rasterise import render_strokes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
EncodeFn = Callable[[Tensor], Tensor]  # images [B, C, H, W] in [-1, 1] -> latents


def list_images(root: str | Path) -> list[Path]:
    """All images under ``root`` (recursive), sorted so that subsets are reproducible across machines."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (set dataset.root / dataset.val_root)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images found under {root}")
    return files


def class_labels(root: Path, files: Sequence[Path]) -> list[int]:
    """Labels from the first-level class folders (ImageNet layout ``root/<wnid>/*.JPEG``), sorted names."""
    classes = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1})
    if not classes:
        raise ValueError(f"class_folders=true but {root} has no class sub-folders")
    index = {name: i for i, name in enumerate(classes)}
    return [index[f.relative_to(root).parts[0]] for f in files]


def subset_indices(total: int, counts: Sequence[int | None], seed: int) -> list[list[int]]:
    """Disjoint, seeded random subsets of ``range(total)`` of the given sizes (None = all the rest).

    Each subset is returned sorted; the same (total, counts, seed) always gives the same subsets.
    """
    fixed = sum(c for c in counts if c is not None)
    if fixed > total:
        raise ValueError(f"requested {fixed} images but only {total} were found")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    out, start = [], 0
    for c in counts:
        stop = total if c is None else start + c
        out.append(sorted(perm[start:stop]))
        start = stop
    return out


def load_image(path: Path, resolution: int, channels: int) -> Tensor:
    """Center-crop to a square, resize (bicubic), scale to [-1, 1]: [C, resolution, resolution]."""
    with Image.open(path) as img:
        img = img.convert("RGB" if channels == 3 else "L")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.float32).reshape(resolution, resolution, channels)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


class ImageFolderDataset(Dataset):
    """Images from a file list; items are ``{"image": [C, H, W]}`` plus ``"label"`` when labelled."""

    def __init__(self, files: Sequence[Path], resolution: int, channels: int, labels: Sequence[int] | None):
        self.files, self.labels = list(files), None if labels is None else list(labels)
        self.resolution, self.channels = resolution, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {"image": load_image(self.files[i], self.resolution, self.channels)}
        if self.labels is not None:
            item["label"] = torch.tensor(self.labels[i])
        return item

    def fingerprint(self) -> str:
        """Identifies the exact images (paths, order, size) for naming latent caches."""
        text = "\n".join([f"{self.resolution}x{self.channels}", *map(str, self.files)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class TensorImageDataset(Dataset):
    """In-memory images (or latents) under ``key``, optional labels."""

    def __init__(self, data: Tensor, labels: Tensor | None = None, key: str = "image"):
        self.data, self.labels, self.key = data, labels, key

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {self.key: self.data[i]}
        if self.labels is not None:
            item["label"] = self.labels[i]
        return item

    def fingerprint(self) -> str:
        return hashlib.sha256(self.data.numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def encode_dataset(
    dataset: Dataset, encode: EncodeFn, batch_size: int, device: torch.device
) -> TensorImageDataset:
    """Run the frozen first stage over ``dataset`` once; latents are kept on the CPU."""
    latents, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        latents.append(encode(batch["image"].to(device)).float().cpu())
        if "label" in batch:
            labels.append(batch["label"])
    return TensorImageDataset(torch.cat(latents), torch.cat(labels) if labels else None, key="latent")


def cached_latents(
    dataset: Dataset, encode: EncodeFn, cache_file: Path, batch_size: int, device: torch.device
) -> TensorImageDataset:
    """Load latents from ``cache_file`` (plain tensors, weights_only) or encode and save them."""
    if cache_file.is_file():
        blob = torch.load(cache_file, map_location="cpu", weights_only=True)
        return TensorImageDataset(blob["latents"], blob.get("labels"), key="latent")
    encoded = encode_dataset(dataset, encode, batch_size, device)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    blob = {"latents": encoded.data}
    if encoded.labels is not None:
        blob["labels"] = encoded.labels
    torch.save(blob, cache_file)
    return encoded


class ImageDataModule(L.LightningDataModule):
    """Train/val image folders with the paper's seeded subsets and optional latent caching.

    With ``val_root`` unset, the validation subset is drawn from ``root`` disjointly from the
    training subset. ``class_folders`` gives ImageNet-style labels for the conditional preset.
    """

    def __init__(
        self,
        root: str | None,
        resolution: int,
        batch_size: int,
        num_workers: int = 0,
        num_train: int | None = None,
        num_val: int | None = None,
        val_root: str | None = None,
        subset_seed: int = 0,
        channels: int = 3,
        class_folders: bool = False,
        latent_cache_dir: str | None = None,
        name: str = "images",
        seed: int = 0,
    ):
        super().__init__()
        self.name = name
        self.seed = seed
        self.root, self.val_root = root, val_root
        self.resolution, self.channels = resolution, channels
        self.batch_size, self.num_workers = batch_size, num_workers
        self.num_train, self.num_val, self.subset_seed = num_train, num_val, subset_seed
        self.class_folders = class_folders
        self.latent_cache_dir = None if latent_cache_dir is None else Path(latent_cache_dir).expanduser()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self.build_datasets()

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        if self.root is None:
            raise ValueError("dataset.root is not set: point it to your image folder")
        root = Path(self.root).expanduser()
        files = list_images(root)
        labels = class_labels(root, files) if self.class_folders else None
        if self.val_root is None:
            train_idx, val_idx = subset_indices(len(files), [self.num_train, self.num_val], self.subset_seed)
            return self._subset(files, labels, train_idx), self._subset(files, labels, val_idx)
        (train_idx,) = subset_indices(len(files), [self.num_train], self.subset_seed)
        val_root = Path(self.val_root).expanduser()
        val_files = list_images(val_root)
        val_labels = class_labels(val_root, val_files) if self.class_folders else None
        (val_idx,) = subset_indices(len(val_files), [self.num_val], self.subset_seed)
        return self._subset(files, labels, train_idx), self._subset(val_files, val_labels, val_idx)

    def _subset(self, files: Sequence[Path], labels: Sequence[int] | None, idx: Sequence[int]) -> Dataset:
        subset_labels = None if labels is None else [labels[i] for i in idx]
        return ImageFolderDataset([files[i] for i in idx], self.resolution, self.channels, subset_labels)

    def use_latents(self, encode: EncodeFn, encoder_tag: str, device: torch.device) -> None:
        """Swap both splits for cached latents (no-op unless ``latent_cache_dir`` is set).

        ``encoder_tag`` identifies the first stage (e.g. its checkpoint path) so caches from a different
        autoencoder are never reused.
        """
        if self.latent_cache_dir is None:
            return
        self.setup()
        tag = hashlib.sha256(encoder_tag.encode()).hexdigest()[:8]
        self.train_set, self.val_set = (
            cached_latents(
                ds,
                encode,
                self.latent_cache_dir / f"{name}-{ds.fingerprint()}-{tag}.pt",
                self.batch_size,
                device,
            )
            for name, ds in (("train", self.train_set), ("val", self.val_set))
        )

    def num_train_samples(self) -> int:
        """Training-set size (the cost report asks when ``num_train`` is null)."""
        self.setup()
        return len(self.train_set)

    def train_dataloader(self) -> DataLoader:
        """Order from (seed, epoch) only and checkpointed by Lightning: exact mid-epoch resume."""
        return ResumableDataLoader(
            self.train_set, batch_size=self.batch_size, seed=self.seed, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


def rasterise_drawings(
    drawings: Sequence[np.ndarray], resolution: int, render_size: int, line_width: int, margin: int
) -> Tensor:
    """Stroke-3 drawings -> [N, 1, resolution, resolution] in [-1, 1].

    Drawn with the project's renderer at ``render_size`` and box-downsampled, which anti-aliases the
    (deliberately aliased) renderer output so small images keep thin strokes visible.
    """
    images = []
    for drawing in drawings:
        canvas = Image.fromarray(render_strokes(stroke3_to_strokes(drawing), render_size, line_width, margin))
        images.append(np.asarray(canvas.resize((resolution, resolution), Image.Resampling.BOX), np.float32))
    return torch.from_numpy(np.stack(images))[:, None] / 127.5 - 1.0


class KanjiVGImageDataModule(ImageDataModule):
    """The bundled KanjiVG sketches as small grayscale images: an embedded dataset for CPU runs.

    Train images come from the file's train split, validation images from its valid split, each a
    seeded subset of ``num_train`` / ``num_val`` drawings (null = all).
    """

    def __init__(
        self,
        path: str,
        resolution: int,
        batch_size: int,
        render_size: int,
        line_width: int,
        margin: int,
        num_workers: int = 0,
        num_train: int | None = None,
        num_val: int | None = None,
        subset_seed: int = 0,
        name: str = "kanjivg_images",
        seed: int = 0,
    ):
        super().__init__(
            root=None,
            resolution=resolution,
            batch_size=batch_size,
            num_workers=num_workers,
            num_train=num_train,
            num_val=num_val,
            subset_seed=subset_seed,
            channels=1,
            name=name,
            seed=seed,
        )
        self.path = path
        self.render_size, self.line_width, self.margin = render_size, line_width, margin

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        splits = load_stroke3_npz(resolve_data_path(self.path), ("train", "valid"))
        out = []
        for split, count in (("train", self.num_train), ("valid", self.num_val)):
            (idx,) = subset_indices(len(splits[split]), [count], self.subset_seed)
            drawings = [splits[split][i] for i in idx]
            out.append(
                TensorImageDataset(
                    rasterise_drawings(
                        drawings, self.resolution, self.render_size, self.line_width, self.margin
                    )
                )
            )
        return out[0], out[1]
