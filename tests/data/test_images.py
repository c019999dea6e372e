"""Image data: dataset layouts and splits, checks at setup, CompVis augmentation, latent caching."""

import os

import numpy as np
import pytest
import torch
from helpers.tolerance import assert_close_computed
from PIL import Image

from sparse_dm.data.images import ImageDataModule, KanjiVGImageDataModule, list_images, subset_indices


def write_images(root, names, size=(20, 12)):
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)


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
    with pytest.raises(FileNotFoundError, match="train image folder not found"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"val split is empty: no .* images"):
        list_images(tmp_path / "empty", "val")
    dm = ImageDataModule(root=None, resolution=8, batch_size=2)
    with pytest.raises(ValueError, match=r"dataset\.root"):
        dm.setup()


def test_one_folder_seeded_disjoint_subsets_and_pixels(tmp_path):
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
    with pytest.raises(ValueError, match=r"dataset\.num_train=9 \+ dataset\.num_val=3 do not fit in the 11"):
        ImageDataModule(root=str(tmp_path), **{**kw, "num_train": 9}).setup()


def test_dataset_with_its_own_train_and_val_folders(tmp_path):
    write_images(tmp_path / "train", ["n02/a.png", "n02/b.png", "n01/c.png"])
    write_images(tmp_path / "val", ["n01/d.png", "n02/e.png"])
    kw = dict(root=str(tmp_path), train_dir="train", val_dir="val", resolution=4, batch_size=8)
    dm = ImageDataModule(**kw, class_folders=True)
    dm.setup()
    labels = {f.name: y for f, y in zip(dm.train_set.files, dm.train_set.labels, strict=True)}
    assert labels == {"c.png": 0, "a.png": 1, "b.png": 1}
    assert next(iter(dm.val_dataloader()))["label"].tolist() == [0, 1]
    assert {f.parent.parent.name for f in dm.val_set.files} == {"val"}  # val never drawn from train/
    with pytest.raises(ValueError, match=r"dataset\.num_train=4 but the train folder .* has 3 images"):
        ImageDataModule(**kw, num_train=4).setup()
    with pytest.raises(ValueError, match="overlap"):
        ImageDataModule(**{**kw, "train_dir": None}).setup()
    write_images(tmp_path / "val", ["n03/f.png"])
    with pytest.raises(ValueError, match=r"val image .*f\.png is in class folder 'n03'"):
        ImageDataModule(**kw, class_folders=True).setup()


def test_unreadable_files_are_named_at_setup_and_at_load(tmp_path):
    write_images(tmp_path / "train", [f"{i}.png" for i in range(3)])
    write_images(tmp_path / "val", ["v.png"])
    (tmp_path / "train" / "1.png").write_bytes(b"not an image")
    kw = dict(root=str(tmp_path), train_dir="train", val_dir="val", resolution=4, batch_size=2)
    with pytest.raises(ValueError, match=r"train image 1 is unreadable: .*train/1\.png"):
        ImageDataModule(**kw).setup()
    lazy = ImageDataModule(**kw, verify_files=False)
    lazy.setup()
    with pytest.raises(ValueError, match=r"train image 1 is unreadable: .*train/1\.png"):
        lazy.train_set[1]


def test_flips_follow_seed_epoch_and_index_only(tmp_path):
    write_images(tmp_path, [f"{i}.png" for i in range(40)], size=(9, 9))
    kw = dict(root=str(tmp_path), resolution=8, batch_size=40, num_train=36, num_val=4, flip_p=0.5, seed=3)
    dm, plain = ImageDataModule(**kw), ImageDataModule(**{**kw, "flip_p": 0.0})
    dm.setup(), plain.setup()
    loader = dm.train_dataloader()
    loader.set_epoch(2)
    flipped = [dm.train_set[i]["image"] for i in range(36)]
    reference = [plain.train_set[i]["image"] for i in range(36)]
    mirrored = [
        torch.equal(a, b.flip(-1)) and not torch.equal(a, b) for a, b in zip(flipped, reference, strict=True)
    ]
    same = [torch.equal(a, b) for a, b in zip(flipped, reference, strict=True)]
    assert all(m or s for m, s in zip(mirrored, same, strict=True)) and 8 < sum(mirrored) < 28
    loader.set_epoch(3)
    assert [torch.equal(dm.train_set[i]["image"], flipped[i]) for i in range(36)] != [True] * 36
    loader.set_epoch(2)
    again = ImageDataModule(**kw)
    again.setup()
    again.train_dataloader().set_epoch(2)
    assert all(torch.equal(again.train_set[i]["image"], flipped[i]) for i in range(36))
    for i in range(4):  # validation is never augmented
        assert torch.equal(dm.val_set[i]["image"], plain.val_set[i]["image"])


def test_random_crops_take_squares_of_the_resized_image(tmp_path):
    write_images(tmp_path / "train", [f"{i}.png" for i in range(8)], size=(32, 8))
    write_images(tmp_path / "val", ["v.png"], size=(32, 8))
    kw = dict(root=str(tmp_path), train_dir="train", val_dir="val", resolution=8, batch_size=8)
    dm = ImageDataModule(**kw, crop="random")
    dm.setup()
    center = ImageDataModule(**kw)
    center.setup()
    crops = [dm.train_set[i]["image"] for i in range(8)]
    assert all(c.shape == (3, 8, 8) for c in crops)
    assert sum(not torch.equal(c, center.train_set[i]["image"]) for i, c in enumerate(crops)) >= 6
    with pytest.raises(ValueError, match=r"crop=random cannot be combined with dataset\.latent_cache_dir"):
        ImageDataModule(**kw, crop="random", latent_cache_dir=str(tmp_path / "cache"))


def asymmetric_encoder(calls):
    weight = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2) / 10

    def encode(x):
        calls.append(len(x))
        return torch.nn.functional.conv2d(x, weight, stride=2)  # not mirror-equivariant

    return encode


def test_latent_cache_is_keyed_by_first_stage_content_and_images(tmp_path):
    write_images(tmp_path / "img", [f"{i}.png" for i in range(5)])
    calls = []
    encode = asymmetric_encoder(calls)

    def make():
        kw = dict(
            resolution=8, batch_size=2, num_train=3, num_val=2, latent_cache_dir=str(tmp_path / "cache")
        )
        return ImageDataModule(root=str(tmp_path / "img"), **kw)

    dm = make()
    dm.use_latents(encode, "hash-a", torch.device("cpu"))
    assert sum(calls) == 5
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"latent"} and batch["latent"].shape == (2, 2, 4, 4)
    cached = make()
    cached.use_latents(encode, "hash-a", torch.device("cpu"))
    assert sum(calls) == 5
    assert torch.equal(cached.train_set[2]["latent"], dm.train_set[2]["latent"])
    make().use_latents(encode, "hash-b", torch.device("cpu"))  # another first stage never reuses a cache
    assert sum(calls) == 10
    probe = make()
    probe.setup()
    changed = probe.train_set.files[0]
    write_images(tmp_path / "img", [changed.name], size=(21, 12))  # same path, new content
    os.utime(changed, ns=(1, 1))
    make().use_latents(encode, "hash-a", torch.device("cpu"))
    assert sum(calls) == 13  # the train split (3 images) is encoded again, val (unchanged) is reused


def test_latent_cache_under_flips_stores_both_views(tmp_path):
    write_images(tmp_path, [f"{i}.png" for i in range(24)], size=(8, 8))
    kw = dict(root=str(tmp_path), resolution=8, batch_size=4, num_train=20, num_val=4, flip_p=0.5, seed=1)
    images = ImageDataModule(**kw)
    images.setup()
    images.train_dataloader().set_epoch(5)
    calls = []
    encode = asymmetric_encoder(calls)
    latents = ImageDataModule(**kw, latent_cache_dir=str(tmp_path / "cache"))
    latents.use_latents(encode, "hash", torch.device("cpu"))
    assert sum(calls) == 2 * 20 + 4  # both orientations of the train images, one of val
    latents.train_dataloader().set_epoch(5)
    for i in range(20):
        image = images.train_set[i]["image"][None]
        expected = encode(image)[0]
        # encoded in batches of 4 there, alone here (other conv blockings): 12 products and no bias;
        # the weights are >= 0, so encoding |image| sums the |terms|
        terms = float(encode(image.abs()).max())
        assert_close_computed(
            latents.train_set[i]["latent"], expected, reduction_length=12, scale=terms, why="batch vs alone"
        )


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
