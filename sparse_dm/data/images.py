"""Image data for Latent Diffusion: folders of images from user paths, and embedded KanjiVG images.

Splits follow each dataset's layout: where a dataset ships its own train/val folders (Imagenette,
ImageNet) they are used (``train_dir`` / ``val_dir`` under ``root``); where the paper trains on a subset
of one folder (CelebA-HQ 12,500 / 500, LSUN-Bedrooms 10,598 / 2,500) ``subset_indices`` draws disjoint
subsets from a seed. Training augmentation follows CompVis per dataset (``flip_p``: horizontal flips,
``crop``: center | random) and is drawn from (seed, epoch, index) only, so it is reproducible and a
resumed run sees the same flips. Validation and FID reference images are never augmented. Every
selected file is checked at setup; an unreadable one is refused naming its split, index and path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sparse_dm.data.latent_cache import EncodeFn, cached_latents
from sparse_dm.data.loader import ResumableDataLoader
from sparse_dm.data.stroke3 import load_stroke3_npz, resolve_data_path
from sparse_dm.sketch.rasterise import render_strokes
from sparse_dm.sketch.representation import stroke3_to_strokes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CROPS = ("center", "random")
IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError)


def list_images(root: str | Path, split: str = "train") -> list[Path]:
    """All images under ``root`` (recursive), sorted so that subsets are reproducible across machines."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{split} image folder not found: {root} (check dataset.root / {split}_dir)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(
            f"{split} split is empty: no {'/'.join(IMAGE_EXTENSIONS)} images under {root}"
        )
    return files


def class_names(root: Path, files: Sequence[Path], split: str) -> list[str]:
    """First-level class folders (ImageNet layout ``root/<wnid>/*.JPEG``), sorted."""
    classes = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1})
    if not classes:
        raise ValueError(f"dataset.class_folders=true but the {split} folder {root} has no class sub-folders")
    return classes


def class_labels(root: Path, files: Sequence[Path], classes: Sequence[str], split: str) -> list[int]:
    """Labels by position in ``classes`` (the *training* folder's sorted classes, also for val)."""
    index = {name: i for i, name in enumerate(classes)}
    labels = []
    for f in files:
        name = f.relative_to(root).parts[0]
        if name not in index:
            raise ValueError(f"{split} image {f} is in class folder {name!r}, which the train folder lacks")
        labels.append(index[name])
    return labels


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


class EpochAugment:
    """Training flips / crops drawn from (seed, epoch, index) only: reproducible on any number of
    workers, independent of the global RNG, and identical after a resume. The epoch is read from the
    training loader's sampler (bound by the datamodule), which Lightning sets at every epoch start."""

    def __init__(self, flip_p: float, random_crop: bool, seed: int) -> None:
        self.flip_p, self.random_crop, self.seed = flip_p, random_crop, seed
        self.epoch_source: Any = None

    def draw(self, index: int) -> tuple[bool, float, float]:
        """(flip, crop_x, crop_y) for item ``index`` in the current epoch; crop offsets in [0, 1)."""
        epoch = 0 if self.epoch_source is None else int(self.epoch_source.epoch)
        rng = np.random.default_rng([self.seed, epoch, index])
        flip, x, y = rng.random(3)
        return bool(flip < self.flip_p), float(x), float(y)


def load_image(
    path: Path, resolution: int, channels: int, crop: tuple[float, float] | None = None, flip: bool = False
) -> Tensor:
    """[C, resolution, resolution] in [-1, 1].

    crop None (CompVis's LSUN / CelebA-HQ path): center square crop, then bicubic resize. crop (x, y)
    (CompVis's ImageNet ``random_crop``): bicubic resize of the shorter side to ``resolution``, then
    the square at fractional offsets (x, y) of the free range. ``flip`` mirrors horizontally.
    """
    with Image.open(path) as img:
        img = img.convert("RGB" if channels == 3 else "L")
        if crop is None:
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side))
            img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
        else:
            scale = resolution / min(img.size)
            size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
            img = img.resize(size, Image.Resampling.BICUBIC)
            left = int(crop[0] * (img.width - resolution + 1))
            top = int(crop[1] * (img.height - resolution + 1))
            img = img.crop((left, top, left + resolution, top + resolution))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(img, dtype=np.float32).reshape(resolution, resolution, channels)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def verify_images(files: Sequence[Path], split: str) -> None:
    """Open every file's header (cheap; no decode) so a broken dataset fails at setup, not hours in."""
    for index, path in enumerate(files):
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018 - parsing the header is the check
        except IMAGE_ERRORS as err:
            raise ValueError(f"{split} image {index} is unreadable: {path} ({err})") from err


class ImageFolderDataset(Dataset):
    """Images from a file list; items are ``{"image": [C, H, W]}`` plus ``"label"`` when labelled."""

    def __init__(
        self,
        files: Sequence[Path],
        resolution: int,
        channels: int,
        labels: Sequence[int] | None,
        split: str,
        augment: EpochAugment | None = None,
    ):
        self.files, self.labels = list(files), None if labels is None else list(labels)
        self.resolution, self.channels, self.split, self.augment = resolution, channels, split, augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        flip, crop = False, None
        if self.augment is not None:
            flip, x, y = self.augment.draw(i)
            crop = (x, y) if self.augment.random_crop else None
        try:
            image = load_image(self.files[i], self.resolution, self.channels, crop, flip)
        except IMAGE_ERRORS as err:
            raise ValueError(f"{self.split} image {i} is unreadable: {self.files[i]} ({err})") from err
        item = {"image": image}
        if self.labels is not None:
            item["label"] = torch.tensor(self.labels[i])
        return item

    def unaugmented(self) -> ImageFolderDataset:
        """The same images without flips / random crops (latent caching, FID references)."""
        return ImageFolderDataset(self.files, self.resolution, self.channels, self.labels, self.split)

    def fingerprint(self) -> str:
        """The exact images and preprocessing: paths, order, sizes and modification times, resolution."""
        digest = hashlib.sha256(f"{self.resolution}x{self.channels}".encode())
        for path in self.files:
            stat = path.stat()
            digest.update(f"\n{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return digest.hexdigest()


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
        """The exact tensor content (names in-memory reference sets for FID statistics caches)."""
        return hashlib.sha256(self.data.contiguous().numpy().tobytes()).hexdigest()[:16]


class ImageDataModule(L.LightningDataModule):
    """Train/val image folders with the paper's splits, CompVis augmentation and optional latent caching.

    ``train_dir`` / ``val_dir`` are sub-folders of ``root`` (null: ``root`` itself). Without ``val_dir``
    the validation subset is drawn from the training folder, disjoint from the training subset.
    ``class_folders`` gives ImageNet-style labels (val labels use the train folder's class order).
    """

    def __init__(
        self,
        root: str | None,
        resolution: int,
        batch_size: int,
        num_workers: int = 0,
        num_train: int | None = None,
        num_val: int | None = None,
        train_dir: str | None = None,
        val_dir: str | None = None,
        subset_seed: int = 0,
        channels: int = 3,
        class_folders: bool = False,
        flip_p: float = 0.0,
        crop: str = "center",
        verify_files: bool = True,
        latent_cache_dir: str | None = None,
        name: str = "images",
        seed: int = 0,
    ):
        super().__init__()
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"dataset.flip_p must be in [0, 1], got {flip_p}")
        if crop not in CROPS:
            raise ValueError(f"dataset.crop must be one of {CROPS}, got {crop!r}")
        if crop == "random" and latent_cache_dir is not None:
            raise ValueError(
                "dataset.crop=random cannot be combined with dataset.latent_cache_dir: every epoch sees new "
                "crops, so latents cannot be computed once. Set dataset.latent_cache_dir=null (encode on the "
                "fly) or dataset.crop=center."
            )
        self.name = name
        self.seed = seed
        self.root, self.train_dir, self.val_dir = root, train_dir, val_dir
        self.resolution, self.channels = resolution, channels
        self.batch_size, self.num_workers = batch_size, num_workers
        self.num_train, self.num_val, self.subset_seed = num_train, num_val, subset_seed
        self.class_folders, self.verify_files = class_folders, verify_files
        self.augment = (
            EpochAugment(flip_p, crop == "random", seed) if flip_p > 0 or crop == "random" else None
        )
        self.latent_cache_dir = None if latent_cache_dir is None else Path(latent_cache_dir).expanduser()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.reference_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self.build_datasets()
            self.reference_set = getattr(self.train_set, "unaugmented", lambda: self.train_set)()

    def _folder(self, sub: str | None) -> Path:
        return Path(self.root).expanduser() / sub if sub else Path(self.root).expanduser()

    def _check_count(self, key: str, count: int | None, available: int, folder: Path, split: str) -> None:
        if count is not None and not 1 <= count <= available:
            raise ValueError(
                f"dataset.{key}={count} but the {split} folder {folder} has {available} images: allowed "
                f"1..{available}, or null for all of them"
            )

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        if self.root is None:
            raise ValueError("dataset.root is not set: point it to your image folder")
        train_folder = self._folder(self.train_dir)
        files = list_images(train_folder, "train")
        classes = class_names(train_folder, files, "train") if self.class_folders else []
        labels = class_labels(train_folder, files, classes, "train") if self.class_folders else None
        if self.val_dir is None:
            self._check_count("num_train", self.num_train, len(files), train_folder, "train")
            self._check_count("num_val", self.num_val, len(files), train_folder, "train")
            requested = (self.num_train or 0) + (self.num_val or 0)
            if requested > len(files) or (None in (self.num_train, self.num_val) and requested >= len(files)):
                raise ValueError(
                    f"dataset.num_train={self.num_train} + dataset.num_val={self.num_val} do not fit in the "
                    f"{len(files)} images of {train_folder}: both splits are drawn from it, disjointly (set "
                    "smaller counts, or dataset.val_dir when the dataset has its own validation folder)"
                )
            train_idx, val_idx = subset_indices(len(files), [self.num_train, self.num_val], self.subset_seed)
            val_files, val_labels, val_folder = files, labels, train_folder
        else:
            val_folder = self._folder(self.val_dir)
            if (
                val_folder.resolve() == train_folder.resolve()
                or train_folder.resolve() in val_folder.resolve().parents
                or val_folder.resolve() in train_folder.resolve().parents
            ):
                raise ValueError(
                    f"train folder {train_folder} and val folder {val_folder} overlap: point dataset.root at "
                    "the dataset folder and set dataset.train_dir / dataset.val_dir to disjoint sub-folders"
                )
            self._check_count("num_train", self.num_train, len(files), train_folder, "train")
            val_files = list_images(val_folder, "val")
            self._check_count("num_val", self.num_val, len(val_files), val_folder, "val")
            val_labels = class_labels(val_folder, val_files, classes, "val") if self.class_folders else None
            (train_idx,) = subset_indices(len(files), [self.num_train], self.subset_seed)
            (val_idx,) = subset_indices(len(val_files), [self.num_val], self.subset_seed)
        for split, idx, folder in (("train", train_idx, train_folder), ("val", val_idx, val_folder)):
            if not idx:
                raise ValueError(f"the {split} split is empty (folder {folder}): check dataset.num_{split}")
        train = self._subset(files, labels, train_idx, "train", self.augment)
        val = self._subset(val_files, val_labels, val_idx, "val", None)
        if self.verify_files:
            verify_images(train.files, "train")
            verify_images(val.files, "val")
        return train, val

    def _subset(
        self,
        files: Sequence[Path],
        labels: Sequence[int] | None,
        idx: Sequence[int],
        split: str,
        augment: EpochAugment | None,
    ) -> ImageFolderDataset:
        subset_labels = None if labels is None else [labels[i] for i in idx]
        return ImageFolderDataset(
            [files[i] for i in idx], self.resolution, self.channels, subset_labels, split, augment
        )

    def use_latents(self, encode: EncodeFn, first_stage_hash: str, device: torch.device) -> None:
        """Swap both splits for cached latents (no-op unless ``latent_cache_dir`` is set).

        The cache is keyed by ``first_stage_hash`` (the first stage's weights) and the images'
        fingerprint (files, sizes, mtimes, resolution). With flips, both orientations are encoded
        and each item picks its orientation like the image path would (same draws).
        """
        if self.latent_cache_dir is None:
            return
        self.setup()
        flips = self.augment is not None and self.augment.flip_p > 0
        self.train_set = cached_latents(
            self.train_set.unaugmented(),
            encode,
            self.latent_cache_dir,
            first_stage_hash,
            self.batch_size,
            device,
            self.augment if flips else None,
        )
        self.val_set = cached_latents(
            self.val_set, encode, self.latent_cache_dir, first_stage_hash, self.batch_size, device, None
        )

    def num_train_samples(self) -> int:
        """Training-set size (the cost report asks when ``num_train`` is null)."""
        self.setup()
        return len(self.train_set)

    def train_dataloader(self) -> DataLoader:
        """Order from (seed, epoch) only and checkpointed by Lightning: exact mid-epoch resume.
        Augmentation reads the epoch from this loader's sampler."""
        loader = ResumableDataLoader(
            self.train_set, batch_size=self.batch_size, seed=self.seed, num_workers=self.num_workers
        )
        if self.augment is not None:
            self.augment.epoch_source = loader.order_sampler
        return loader

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
