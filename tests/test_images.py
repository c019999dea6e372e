"""Image data: seeded subsets, folder scanning and errors, latent caching, embedded KanjiVG images."""

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_dm.data.images import ImageDataModule, KanjiVGImageDataModule, list_images, subset_indices


def write_images(root, names, size=(20, 12)):
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size[1], size[0], 3), 10 * i, np.uint8)).save(path)


def test_subset_indices_deterministic_and_disjoint():
    a = subset_indices(100, [30, 10], seed=1)
    assert a == subset_indices(100, [30, 10], seed=1)
    assert a != subset_indices(100, [30, 10], seed=2)
    train, val = a
    assert len(train) == 30 and len(val) == 10 and not set(train) & set(val)
    assert train == sorted(train)
    (rest,) = subset_indices(5, [None], seed=0)
    assert rest == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="only 5"):
        subset_indices(5, [4, 2], seed=0)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no .* images"):
        list_images(tmp_path / "empty")
    dm = ImageDataModule(root=None, resolution=8, batch_size=2)
    with pytest.raises(ValueError, match=r"dataset\.root"):
        dm.setup()


def test_folder_datamodule_subsets_and_pixels(tmp_path):
    write_images(tmp_path, [f"a/{i}.png" for i in range(6)] + [f"b/c/{i}.JPG" for i in range(4)] + ["x.webp"])
    assert len(list_images(tmp_path)) == 11
    kw = dict(resolution=8, batch_size=4, num_train=7, num_val=3, subset_seed=3)
    dm = ImageDataModule(root=str(tmp_path), **kw)
    dm.setup()
    assert len(dm.train_set) == 7 and len(dm.val_set) == 3
    assert not set(dm.train_set.files) & set(dm.val_set.files)
    again = ImageDataModule(root=str(tmp_path), **kw)
    again.setup()
    assert again.train_set.files == dm.train_set.files
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"image"} and batch["image"].shape == (3, 3, 8, 8)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert dm.num_train_samples() == 7


def test_class_folders_and_separate_val_root(tmp_path):
    write_images(tmp_path / "train", ["n02/a.png", "n02/b.png", "n01/c.png"])
    write_images(tmp_path / "val", ["n01/d.png", "n02/e.png"])
    dm = ImageDataModule(
        root=str(tmp_path / "train"),
        val_root=str(tmp_path / "val"),
        resolution=4,
        batch_size=8,
        class_folders=True,
    )
    dm.setup()
    labels = {f.name: y for f, y in zip(dm.train_set.files, dm.train_set.labels, strict=True)}
    assert labels == {"c.png": 0, "a.png": 1, "b.png": 1}
    assert next(iter(dm.val_dataloader()))["label"].tolist() == [0, 1]


def test_latent_cache_encodes_once(tmp_path):
    write_images(tmp_path / "img", [f"{i}.png" for i in range(5)])
    calls = []

    def encode(x):
        calls.append(len(x))
        return torch.nn.functional.avg_pool2d(x, 2)

    def make():
        return ImageDataModule(
            root=str(tmp_path / "img"),
            resolution=8,
            batch_size=2,
            num_train=3,
            num_val=2,
            latent_cache_dir=str(tmp_path / "cache"),
        )

    dm = make()
    dm.use_latents(encode, "vq-a", torch.device("cpu"))
    assert sum(calls) == 5 and len(list((tmp_path / "cache").glob("*.pt"))) == 2
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"latent"} and batch["latent"].shape == (2, 3, 4, 4)
    cached = make()
    cached.use_latents(encode, "vq-a", torch.device("cpu"))
    assert sum(calls) == 5
    torch.testing.assert_close(cached.train_set.data, dm.train_set.data)
    make().use_latents(encode, "vq-b", torch.device("cpu"))  # another first stage never reuses a cache
    assert sum(calls) == 10


def test_kanjivg_images_embedded():
    dm = KanjiVGImageDataModule(
        path="kanjivg/kanji.rdp200.npz",
        resolution=16,
        batch_size=4,
        render_size=32,
        line_width=2,
        margin=2,
        num_train=6,
        num_val=4,
        subset_seed=0,
    )
    dm.setup()
    assert len(dm.train_set) == 6 and len(dm.val_set) == 4
    images = next(iter(dm.val_dataloader()))["image"]
    assert images.shape == (4, 1, 16, 16)
    assert images.min() < 0 < images.max() <= 1  # ink (dark) on a white background
