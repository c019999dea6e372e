"""Stroke-3 loading (never runs pickles), normalisation, conversions, batching, QuickDraw input."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tolerance import assert_close_computed, float_bound
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sparse_dm.data.quickdraw import QuickDrawDataModule, load_ndjson, strokes_to_stroke3
from sparse_dm.data.stroke3 import (
    Stroke3DataModule,
    UnsafePickleError,
    collate_stroke3,
    load_npz_arrays,
    load_stroke3_npz,
    preprocess_drawings,
    resolve_data_path,
)
from sparse_dm.sketch.representation import (
    deltas_to_features,
    deltas_to_strokes,
    normalise_absolute,
    stroke3_to_absolute,
    stroke3_to_deltas,
    stroke3_to_strokes,
)

SCALE = 10.0


def random_drawing(rng: np.random.Generator, n: int, dtype: type = np.float64) -> np.ndarray:
    xy = rng.integers(-40, 40, size=(n, 2)).astype(dtype)
    pen = (rng.random(n) < 0.2).astype(dtype)
    pen[-1] = 1
    return np.concatenate([xy, pen[:, None]], axis=1).astype(dtype)


def object_array(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def save_splits(path: Path, dtype: type, sizes: tuple[int, int, int] = (5, 3, 2)) -> dict[str, list]:
    rng = np.random.default_rng(0)
    splits = {
        name: [random_drawing(rng, int(rng.integers(2, 30)), dtype) for _ in range(n)]
        for name, n in zip(("train", "valid", "test"), sizes, strict=True)
    }
    np.savez(path, **{k: object_array(v) for k, v in splits.items()})
    return splits


class Payload:
    """Pickles to a call of os.system, as a malicious dataset file would."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.target}",)


# --- safe loading ---------------------------------------------------------------------------


def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    side_effect = tmp_path / "pwned"
    evil = object_array([np.zeros((3, 3), np.float32), Payload(side_effect)])
    path = tmp_path / "evil.npz"
    np.savez(path, train=evil, valid=evil, test=evil)
    with pytest.raises(UnsafePickleError, match=r"evil\.npz.*system"):
        load_stroke3_npz(path)
    assert not side_effect.exists()
    # The payload is real: an ordinary unpickler would have run it.
    pickle.loads(pickle.dumps(Payload(side_effect)))
    assert side_effect.exists()


def test_codecs_encode_is_limited_to_latin1(tmp_path: Path) -> None:
    class OtherCodec:
        def __reduce__(self) -> tuple:
            import _codecs

            return _codecs.encode, ("x", "rot13")

    path = tmp_path / "codec.npz"
    np.savez(path, train=object_array([OtherCodec()]))
    with pytest.raises(UnsafePickleError, match="rot13"):
        load_npz_arrays(path)


@pytest.mark.parametrize("dtype", [np.int16, np.float64, np.float32])
def test_int_and_float_files_load(tmp_path: Path, dtype: type) -> None:
    path = tmp_path / f"{np.dtype(dtype).name}.npz"
    splits = save_splits(path, dtype)
    loaded = load_stroke3_npz(path)
    for name, drawings in splits.items():
        assert len(loaded[name]) == len(drawings)
        for got, want in zip(loaded[name], drawings, strict=True):
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want.astype(np.float32))


def test_plain_arrays_load_without_pickle(tmp_path: Path) -> None:
    path = tmp_path / "plain.npz"
    np.savez(path, a=np.arange(6, dtype=np.int16).reshape(2, 3))
    np.testing.assert_array_equal(load_npz_arrays(path)["a"], np.arange(6).reshape(2, 3))


def test_non_stroke3_content_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    bad = object_array([np.zeros((4, 2))])
    np.savez(path, train=bad, valid=bad, test=bad)
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        load_stroke3_npz(path)


@pytest.mark.parametrize(
    ("name", "sizes", "dtype"),
    [("kanji.rdp200.npz", (10358, 600, 500), np.float64), ("short_kanji.npz", (10000, 600, 500), np.int16)],
)
def test_bundled_kanjivg_loads(name: str, sizes: tuple[int, int, int], dtype: type) -> None:
    path = resolve_data_path(f"kanjivg/{name}")
    assert (path.parent / "README.md").read_text().count("CC BY-SA 3.0") >= 1
    splits = load_stroke3_npz(path)
    assert tuple(len(splits[s]) for s in ("train", "valid", "test")) == sizes
    raw = load_npz_arrays(path)["valid"]
    assert raw[0].dtype == dtype


def test_missing_file_error_names_it() -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        resolve_data_path("nope.npz")


# --- normalisation and conversions ----------------------------------------------------------

drawings = (
    st.integers(2, 40)
    .flatmap(lambda n: arrays(np.float64, (n, 3), elements=st.integers(-50, 50).map(float)))
    .map(lambda a: np.concatenate([a[:, :2], (a[:, 2:] > 20).astype(np.float64)], axis=1))
)


@settings(max_examples=60, deadline=None)
@given(drawings)
def test_normalisation_properties(stroke3: np.ndarray) -> None:
    deltas = stroke3_to_deltas(stroke3, SCALE)
    points = np.cumsum(deltas[:, :2], axis=0)
    np.testing.assert_array_equal(deltas[0, :2], 0.0)
    radius = np.linalg.norm(points, axis=1).max()
    absolute = stroke3_to_absolute(stroke3)
    if np.ptp(absolute[:, :2], axis=0).any():
        # float32: positions scaled to SCALE, differenced, summed back over the path (|deltas|
        # summed), then the norm's squares, sum and sqrt
        path = float(np.abs(deltas[:, :2]).sum())
        assert abs(radius - SCALE) <= float_bound(len(deltas) + 8, path + SCALE)
    else:
        assert radius == 0.0
    np.testing.assert_array_equal(deltas[:, 2], stroke3[:, 2])
    # Invariant to where and how large the drawing was.
    moved = stroke3.copy()
    moved[0, :2] += (7.0, -3.0)
    moved[:, :2] *= 3.0
    # integer positions stay exact in float32 (< 2**24); then the radius (2 squares, a sum, sqrt), the
    # factor SCALE / radius and the product round on positions <= SCALE, and a difference of two
    assert_close_computed(
        stroke3_to_deltas(moved, SCALE), deltas, reduction_length=8, scale=2 * SCALE, why="rescaled drawing"
    )


@settings(max_examples=60, deadline=None)
@given(drawings)
def test_stroke3_features_strokes_round_trip(stroke3: np.ndarray) -> None:
    deltas = stroke3_to_deltas(stroke3, SCALE)
    features = deltas_to_features(torch.from_numpy(deltas))
    absolute = normalise_absolute(stroke3_to_absolute(stroke3), SCALE)
    # positions summed back from float32 deltas (each a rounded difference) drift by at most the
    # rounding of a sum over the path: |deltas| summed
    n, path = len(deltas) + 2, float(np.abs(deltas[:, :2]).sum()) + SCALE
    assert_close_computed(
        features[:, :2].numpy(), absolute[:, :2], reduction_length=n, scale=path, why="cumsum"
    )
    np.testing.assert_array_equal(features[:, 2:].numpy(), deltas)
    got = deltas_to_strokes(deltas, pen_threshold=0.5)
    want = np.split(absolute[:, :2], np.flatnonzero(stroke3[:-1, 2] == 1) + 1)
    assert len(got) == len(want) == 1 + int(stroke3[:-1, 2].sum())
    for g, w in zip(got, want, strict=True):  # the same drift (a float64 cumsum of the float32 deltas)
        assert_close_computed(
            g, w.astype(np.float64), reduction_length=n, scale=path, why="cumsum", dtype=torch.float32
        )


def test_pen_threshold_controls_stroke_splits() -> None:
    deltas = np.array([[0, 0, 0.0], [1, 0, 0.7], [0, 1, 0.2], [1, 1, 1.0]], np.float32)
    assert [len(s) for s in deltas_to_strokes(deltas, 0.5)] == [2, 2]
    assert [len(s) for s in deltas_to_strokes(deltas, 0.8)] == [4]


def test_too_long_drawings_are_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(1)
    items = [random_drawing(rng, n) for n in (5, 10, 9, 3)]
    with caplog.at_level("WARNING"):
        kept, index = preprocess_drawings(items, max_len=9, scale=SCALE, source="unit")
    assert [len(k) for k in kept] == [5, 3]
    np.testing.assert_array_equal(index, [0, 3])
    assert "unit: dropped 2 of 4 drawings with >= 9 points (dataset.max_len; indices [1, 2])" in caplog.text


def test_too_long_drawings_can_be_refused() -> None:
    rng = np.random.default_rng(1)
    items = [random_drawing(rng, n) for n in (5, 10, 9, 3)]
    with pytest.raises(
        ValueError, match=r"unit: drawing 1 has 10 points, limit dataset\.max_len=9 \(2 drawings"
    ):
        preprocess_drawings(items, max_len=9, scale=SCALE, source="unit", too_long="refuse")


def test_collate_pads_with_masks() -> None:
    items = [{"x": torch.ones(n, 3), "label": torch.tensor(i)} for i, n in enumerate((2, 5, 3))]
    batch = collate_stroke3(items)
    assert batch["x"].shape == (3, 5, 3)
    assert batch["lengths"].tolist() == [2, 5, 3]
    assert batch["mask"].sum(1).tolist() == [2, 5, 3]
    assert (batch["x"][~batch["mask"]] == 0).all() and (batch["x"][batch["mask"]] == 1).all()
    assert batch["label"].tolist() == [0, 1, 2]


def test_datamodule_on_bundled_kanjivg() -> None:
    dm = Stroke3DataModule("kanjivg/short_kanji.npz", batch_size=8, max_len=60, num_train=40)
    dm.setup("fit")
    assert dm.num_train_samples() <= 40
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape[0] == 8 and batch["x"].shape[1] == int(batch["lengths"].max())
    pool = dm.length_pool()
    assert len(pool) == len(dm.datasets["valid"]) and int(pool.max()) < 60
    first = next(iter(dm.val_dataloader()))["x"]
    torch.testing.assert_close(first, next(iter(dm.val_dataloader()))["x"], rtol=0, atol=0)  # fixed order


# --- QuickDraw --------------------------------------------------------------------------------


def quickdraw_strokes(rng: np.random.Generator) -> list[list[list[int]]]:
    return [
        [rng.integers(0, 255, k).tolist(), rng.integers(0, 255, k).tolist()]
        for k in rng.integers(1, 6, int(rng.integers(1, 4)))
    ]


def test_quickdraw_strokes_round_trip() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        strokes = quickdraw_strokes(rng)
        back = stroke3_to_strokes(strokes_to_stroke3(strokes))
        assert len(back) == len(strokes)
        for got, (xs, ys) in zip(back, strokes, strict=True):
            np.testing.assert_array_equal(got, np.stack([xs, ys], axis=1))  # integers: exact in float64


def write_ndjson(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    lines = [json.dumps({"word": path.stem, "drawing": quickdraw_strokes(rng)}) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")


def test_ndjson_splits_are_fixed_and_disjoint(tmp_path: Path) -> None:
    path = tmp_path / "cat.ndjson"
    write_ndjson(path, 30, seed=3)
    a, b = load_ndjson(path, (20, 5, 5), seed=0), load_ndjson(path, (20, 5, 5), seed=0)
    assert [len(a[s]) for s in ("train", "valid", "test")] == [20, 5, 5]
    for split in a:
        for x, y in zip(a[split], b[split], strict=True):
            np.testing.assert_array_equal(x, y)
    keys = {s: {d.tobytes() for d in a[s]} for s in a}
    assert not keys["train"] & keys["valid"] and not keys["valid"] & keys["test"]


def test_quickdraw_conditional_labels(tmp_path: Path) -> None:
    write_ndjson(tmp_path / "cat.ndjson", 12, seed=4)
    write_ndjson(tmp_path / "crab.ndjson", 12, seed=5)
    dm = QuickDrawDataModule(
        str(tmp_path),
        ["cat", "crab"],
        file_pattern="{category}.ndjson",
        conditional=True,
        ndjson_split=(6, 3, 3),
        batch_size=4,
        num_train=5,
    )
    dm.setup()
    assert dm.datasets["train"].labels.tolist() == [0] * 5 + [1] * 5
    assert dm.datasets["valid"].labels.tolist() == [0] * 3 + [1] * 3
    assert "label" in next(iter(dm.train_dataloader()))


def test_quickdraw_npz_unconditional(tmp_path: Path) -> None:
    save_splits(tmp_path / "crab.npz", np.int16, sizes=(6, 3, 3))
    dm = QuickDrawDataModule(str(tmp_path), ["crab"], num_train=4, batch_size=4)
    dm.setup()
    assert len(dm.datasets["train"]) == 4 and dm.datasets["train"].labels is None
    assert "label" not in next(iter(dm.train_dataloader()))


def test_a_corrupt_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"not a zip archive at all")
    with pytest.raises(ValueError, match=r"corrupt\.npz is not a valid \.npz"):
        load_npz_arrays(path)


# --- data checks at load: bad files are refused naming file, split and index -----------------


def with_bad_drawing(drawing: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Valid splits, except that valid drawing 1 is replaced by `drawing`."""
    rng = np.random.default_rng(7)
    splits = {name: [random_drawing(rng, 6) for _ in range(3)] for name in ("train", "valid", "test")}
    splits["valid"][1] = drawing
    return splits


def save_npz(path: Path, splits: dict[str, list[np.ndarray]]) -> Path:
    np.savez(path, **{k: object_array(v) for k, v in splits.items()})
    return path


GOOD = np.array([[1.0, 2.0, 0.0], [3.0, -1.0, 0.0], [0.0, 4.0, 1.0]])


def replaced(row: int, col: int, value: float) -> np.ndarray:
    out = GOOD.copy()
    out[row, col] = value
    return out


@pytest.mark.parametrize(
    ("drawing", "reason"),
    [
        (replaced(1, 0, np.nan), r"non-finite values \(NaN/inf\) in 1 row\(s\), first at row 1"),
        (replaced(2, 1, -np.inf), r"non-finite values \(NaN/inf\) in 1 row\(s\), first at row 2"),
        (GOOD[:, :2], r"expected an \(n, 3\) stroke-3 array .* \(3, 2\)"),
        (np.zeros((2, 3, 1)), r"expected an \(n, 3\) stroke-3 array"),
        (replaced(0, 2, 2.0), r"pen bits must be 0 or 1, got 2.0 at row 0"),
        (replaced(1, 2, 0.5), r"pen bits must be 0 or 1, got 0.5 at row 1"),
        (np.zeros((0, 3)), "the drawing has no points"),
    ],
)
def test_bad_drawings_are_refused_naming_file_split_and_index(
    tmp_path: Path, drawing: np.ndarray, reason: str
) -> None:
    path = save_npz(tmp_path / "sketches.npz", with_bad_drawing(drawing))
    with pytest.raises(ValueError, match=rf"sketches\.npz \[split valid, drawing 1\]: {reason}"):
        load_stroke3_npz(path)
    with pytest.raises(ValueError, match=r"split valid, drawing 1"):
        Stroke3DataModule(str(path)).setup()


def test_good_drawing_passes_the_checks(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "sketches.npz", with_bad_drawing(GOOD))
    np.testing.assert_array_equal(load_stroke3_npz(path)["valid"][1], GOOD.astype(np.float32))


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_an_empty_split_is_refused(tmp_path: Path, split: str) -> None:
    splits = with_bad_drawing(GOOD)
    splits[split] = []
    path = save_npz(tmp_path / "sketches.npz", splits)
    dm = Stroke3DataModule(str(path))
    with pytest.raises(ValueError, match=rf"sketches\.npz \[split {split}\]: no drawings to use \(0 loaded"):
        dm.setup()


def test_a_split_emptied_by_max_len_is_refused(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "sketches.npz", with_bad_drawing(GOOD))
    with pytest.raises(
        ValueError,
        match=r"\[split train\]: no drawings to use \(3 loaded, 3 dropped with >= dataset\.max_len=3",
    ):
        Stroke3DataModule(str(path), max_len=3).setup()


def test_ndjson_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "cat.ndjson"
    write_ndjson(path, 9, seed=6)
    lines = path.read_text().splitlines()
    lines[4] = json.dumps({"drawing": [[[1, float("nan")], [2, 3]]]})  # Python's json writes NaN
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"cat\.ndjson \[split \w+, drawing \d+, line 5\]: non-finite"):
        load_ndjson(path, (3, 3, 3), seed=0)
