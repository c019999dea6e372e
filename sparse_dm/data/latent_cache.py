"""Latents of the frozen first stage, computed once and kept on disk as memory-mapped ``.npy``.

A cache is keyed by the first stage's *content* hash and the images' fingerprint (files, sizes,
modification times, resolution), never by a checkpoint path, so another autoencoder or changed
images can never reuse stale latents. Under horizontal flips both orientations are encoded (a
flipped latent is not the latent of the flipped image: the encoder is not mirror-equivariant) and
each item picks its orientation with the same per-(seed, epoch, index) draw as the image path.
Memory stays independent of the dataset size: latents are written and read batch by batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

EncodeFn = Callable[[Tensor], Tensor]  # images [B, C, H, W] in [-1, 1] -> latents
CACHE_FORMAT = 1  # bump when the on-disk layout changes
META = "meta.json"
LATENTS = "latents.npy"
LABELS = "labels.npy"


def cache_key(fingerprint: str, first_stage_hash: str, orientations: int) -> str:
    text = f"format={CACHE_FORMAT}|first_stage={first_stage_hash}|images={fingerprint}|views={orientations}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class LatentCacheDataset(Dataset):
    """Items ``{"latent": [C, h, w]}`` (+ ``"label"``) read lazily from a finished cache folder.

    The memory map is opened per process on first access (workers never pickle the array).
    """

    def __init__(self, folder: Path, augment: Any = None) -> None:
        self.folder, self.augment = Path(folder), augment
        self.meta = json.loads((self.folder / META).read_text())
        self._latents: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.meta["count"])

    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._latents is None:
            self._latents = np.load(self.folder / LATENTS, mmap_mode="r", allow_pickle=False)
            if self.meta["labelled"]:
                self._labels = np.load(self.folder / LABELS, allow_pickle=False)
        return self._latents, self._labels

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        latents, labels = self._arrays()
        view = int(self.augment.draw(i)[0]) if self.augment is not None else 0
        item = {"latent": torch.from_numpy(np.array(latents[i, view]))}
        if labels is not None:
            item["label"] = torch.tensor(int(labels[i]))
        return item

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_latents": None, "_labels": None}


@torch.no_grad()
def write_cache(
    dataset: Dataset, encode: EncodeFn, folder: Path, batch_size: int, device: torch.device, orientations: int
) -> None:
    """Encode ``dataset`` batch by batch into ``folder`` (written to a temp folder, then renamed, so an
    interrupted run never leaves a cache that looks complete)."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    latents, labels, start = None, [], 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images = batch["image"].to(device)
        views = [encode(images)] + ([encode(images.flip(-1))] if orientations == 2 else [])
        z = torch.stack(views, dim=1).float().cpu().numpy()
        if latents is None:
            latents = open_memmap(
                tmp / LATENTS, mode="w+", dtype=np.float32, shape=(len(dataset), *z.shape[1:])
            )
        latents[start : start + len(z)] = z
        start += len(z)
        if "label" in batch:
            labels.append(batch["label"].numpy())
    latents.flush()
    del latents
    if labels:
        np.save(tmp / LABELS, np.concatenate(labels), allow_pickle=False)
    (tmp / META).write_text(
        json.dumps({"count": start, "orientations": orientations, "labelled": bool(labels)})
    )
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same cache first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def cached_latents(
    dataset: Any,
    encode: EncodeFn,
    cache_dir: Path,
    first_stage_hash: str,
    batch_size: int,
    device: torch.device,
    augment: Any = None,
) -> LatentCacheDataset:
    """The latents of ``dataset`` (unaugmented images with ``fingerprint()`` and ``split``), encoding
    them on first use; ``augment`` given = flips on, so both orientations are cached."""
    orientations = 2 if augment is not None else 1
    key = cache_key(dataset.fingerprint(), first_stage_hash, orientations)
    folder = Path(cache_dir) / f"{dataset.split}-{key}"
    if not (folder / META).is_file():
        write_cache(dataset, encode, folder, batch_size, device, orientations)
    return LatentCacheDataset(folder, augment)
