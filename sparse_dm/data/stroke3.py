"""Stroke-3 sketches (sketch-rnn `.npz`): safe loading, ChiroDiff normalisation, batching.

The representations (stroke-3, absolute, deltas, features, strokes) and their conversions live in
`sparse_dm.sketch.representation`, below both data and models.

Loading never executes pickled code: `.npz` members are parsed here and object arrays are rebuilt
by an unpickler that only resolves the few NumPy callables needed to rebuild plain arrays.
"""

from __future__ import annotations

import codecs
import io
import logging
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sparse_dm.data.loader import ResumableDataLoader
from sparse_dm.sketch.representation import DATA_CHANNELS, stroke3_to_deltas

try:  # NumPy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).parent / "assets"
SPLITS = ("train", "valid", "test")
_LATIN1_NAMES = {"latin1", "latin-1", "iso-8859-1", "iso8859-1"}
TOO_LONG_POLICIES = ("drop", "refuse")  # what happens to drawings with >= max_len points
_LOGGED_INDICES = 10  # how many dropped indices a warning lists


class UnsafePickleError(ValueError):
    """A `.npz` object array asked for something other than plain NumPy array reconstruction."""


def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as Python-2 era NumPy pickles use it (array bytes stored as latin1 text)."""
    if encoding.lower() not in _LATIN1_NAMES:
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(obj, "latin1")


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals needed to rebuild ndarrays; anything else is refused unexecuted."""

    def __init__(self, file: io.BytesIO, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> object:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise UnsafePickleError(
                f"{self.source}: refusing to unpickle global '{module}.{name}'; only NumPy array "
                "reconstruction is allowed (the file may be malicious or not a sketch dataset)"
            )
        return allowed

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError(f"{self.source}: persistent ids are not allowed in sketch files")


def _read_npy_member(data: bytes, source: str) -> np.ndarray:
    """One `.npy` member: plain arrays via NumPy (no pickle), object arrays via the safe unpickler."""
    fp = io.BytesIO(data)
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise ValueError(f"{source}: unsupported .npy format version {version}")
    if not dtype.hasobject:
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    array = _NumpyOnlyUnpickler(fp, source).load()
    if not isinstance(array, np.ndarray) or array.shape != tuple(shape):
        raise ValueError(f"{source}: object array payload does not match its header shape {shape}")
    return array


def load_npz_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an `.npz` file by key, never executing pickled code."""
    path = Path(path)
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                key = member.removesuffix(".npy")
                arrays[key] = _read_npy_member(archive.read(member), f"{path} [{key}]")
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not a valid .npz (zip) file: {err}") from err
    return arrays


def check_drawing(item: object, source: str) -> np.ndarray:
    """One stroke-3 drawing as float32 (n, 3), or a ValueError naming `source` (file, split, index):
    at least one point, exactly 3 numeric columns, finite values, pen bits exactly 0 or 1."""
    if not isinstance(item, np.ndarray) or item.ndim != 2 or item.shape[1] != DATA_CHANNELS:
        raise ValueError(
            f"{source}: expected an (n, 3) stroke-3 array (dx, dy, pen), got {type(item).__name__} "
            f"{getattr(item, 'shape', '')}"
        )
    if not (np.issubdtype(item.dtype, np.integer) or np.issubdtype(item.dtype, np.floating)):
        raise ValueError(f"{source}: stroke-3 arrays must be numeric, got dtype {item.dtype}")
    if len(item) == 0:
        raise ValueError(f"{source}: the drawing has no points")
    drawing = item.astype(np.float32)
    bad_rows = np.flatnonzero(~np.isfinite(drawing).all(axis=1))
    if len(bad_rows):
        raise ValueError(
            f"{source}: non-finite values (NaN/inf) in {len(bad_rows)} row(s), first at row {bad_rows[0]}: "
            f"{drawing[bad_rows[0]].tolist()}"
        )
    bad_pens = np.flatnonzero((drawing[:, 2] != 0) & (drawing[:, 2] != 1))
    if len(bad_pens):
        raise ValueError(
            f"{source}: pen bits must be 0 or 1, got {drawing[bad_pens[0], 2]} at row {bad_pens[0]} "
            f"({len(bad_pens)} such rows)"
        )
    return drawing


def load_stroke3_npz(path: str | Path, splits: Sequence[str] = SPLITS) -> dict[str, list[np.ndarray]]:
    """The named splits of a sketch-rnn `.npz` as lists of float32 (n, 3) stroke-3 arrays, each
    checked by `check_drawing` (errors name the file, split and index)."""
    arrays = load_npz_arrays(path)
    missing = [s for s in splits if s not in arrays]
    if missing:
        raise KeyError(f"{path}: missing split(s) {missing}; found {sorted(arrays)}")
    return {
        s: [check_drawing(d, f"{path} [split {s}, drawing {i}]") for i, d in enumerate(arrays[s])]
        for s in splits
    }


def resolve_data_path(path: str | Path) -> Path:
    """An existing file: `path` as given (absolute or relative to the working directory), else
    relative to the bundled assets (`sparse_dm/data/assets/`), so `kanjivg/kanji.rdp200.npz` works
    from any directory."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate
    bundled = ASSETS_DIR / candidate
    if not candidate.is_absolute() and bundled.is_file():
        return bundled
    raise FileNotFoundError(f"dataset file {path!r} not found (also looked in {ASSETS_DIR})")


# --- datasets and batching ------------------------------------------------------------------


def preprocess_drawings(
    drawings: Sequence[np.ndarray], max_len: int, scale: float, source: str = "", too_long: str = "drop"
) -> tuple[list[np.ndarray], np.ndarray]:
    """Normalise drawings to deltas; drawings with >= max_len points are dropped (`too_long="drop"`,
    logged as a warning with the count and the first indices) or refused (`"refuse"`).

    Returns the kept drawings and the indices they came from (to keep labels aligned).
    """
    if too_long not in TOO_LONG_POLICIES:
        raise ValueError(f"too_long={too_long!r}; allowed: {TOO_LONG_POLICIES}")
    long_index = [i for i, d in enumerate(drawings) if len(d) >= max_len]
    if long_index and too_long == "refuse":
        first = long_index[0]
        raise ValueError(
            f"{source}: drawing {first} has {len(drawings[first])} points, limit dataset.max_len={max_len} "
            f"({len(long_index)} drawings too long); raise max_len or set dataset.too_long=drop"
        )
    if long_index:
        log.warning(
            "%s: dropped %d of %d drawings with >= %d points (dataset.max_len; indices %s%s)",
            source,
            len(long_index),
            len(drawings),
            max_len,
            long_index[:_LOGGED_INDICES],
            " ..." if len(long_index) > _LOGGED_INDICES else "",
        )
    keep = np.setdiff1d(np.arange(len(drawings)), long_index).astype(np.int64)
    return [stroke3_to_deltas(drawings[i], scale) for i in keep], keep


class Stroke3Dataset(Dataset):
    """Normalised delta sequences, optionally with integer class labels."""

    def __init__(self, drawings: list[np.ndarray], labels: Sequence[int] | None = None) -> None:
        if labels is not None and len(labels) != len(drawings):
            raise ValueError("labels must align with drawings")
        self.drawings = [torch.from_numpy(d) for d in drawings]
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.drawings)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = {"x": self.drawings[index]}
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item

    def lengths(self) -> Tensor:
        return torch.tensor([len(d) for d in self.drawings], dtype=torch.long)


def pad_sequences(seqs: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Zero-pad (n_i, C) tensors to (B, max n, C); also lengths (B,) and a bool mask (B, max n)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    padded = torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True)
    mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    return padded, lengths, mask


def collate_stroke3(items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Batch dict: x (B, L, 3), lengths (B,), mask (B, L) True on real points, label (B,) if any."""
    x, lengths, mask = pad_sequences([it["x"] for it in items])
    batch = {"x": x, "lengths": lengths, "mask": mask}
    if "label" in items[0]:
        batch["label"] = torch.stack([it["label"] for it in items])
    return batch


class Stroke3DataModule(L.LightningDataModule):
    """Any sketch-rnn style `.npz` with train/valid/test splits (the file's own, fixed splits).

    `num_train` keeps the first n training drawings (null = all). Every drawing is checked at load
    (`check_drawing`); drawings with >= `max_len` points are dropped or refused (`too_long`); a split
    left empty is refused. `length_pool()` exposes the validation lengths, which ChiroDiff sampling
    draws its sequence lengths from.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 128,
        num_workers: int = 0,
        max_len: int = 300,
        scale: float = 10.0,
        num_train: int | None = None,
        val_batch_size: int | None = None,
        name: str = "stroke3",
        seed: int = 0,
        too_long: str = "drop",
    ) -> None:
        super().__init__()
        self.name = name
        self.seed = seed
        self.path = path
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_len = max_len
        self.too_long = too_long
        self.scale = scale
        self.num_train = num_train
        self.val_batch_size = val_batch_size or batch_size
        self.datasets: dict[str, Stroke3Dataset] = {}

    def load_splits(self) -> dict[str, tuple[list[np.ndarray], list[int] | None]]:
        """Raw stroke-3 drawings (and labels, None here) per split, training set cut to num_train;
        subclasses read other sources."""
        splits = load_stroke3_npz(resolve_data_path(self.path))
        splits["train"] = splits["train"][: self.num_train]
        return {s: (d, None) for s, d in splits.items()}

    def describe_source(self) -> str:
        """Where the drawings come from, for error messages and logs."""
        return str(self.path)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for split, (drawings, labels) in self.load_splits().items():
            source = f"{self.describe_source()} [split {split}]"
            kept, index = preprocess_drawings(drawings, self.max_len, self.scale, source, self.too_long)
            if not kept:
                raise ValueError(
                    f"{source}: no drawings to use ({len(drawings)} loaded, {len(drawings) - len(kept)} "
                    f"dropped with >= dataset.max_len={self.max_len} points); every split must be non-empty"
                )
            kept_labels = None if labels is None else [labels[i] for i in index]
            self.datasets[split] = Stroke3Dataset(kept, kept_labels)

    def num_train_samples(self) -> int:
        """Training drawings after filtering (the cost report's N)."""
        self.setup()
        return len(self.datasets["train"])

    def length_pool(self) -> Tensor:
        """Lengths of the held-out (validation) drawings."""
        self.setup()
        return self.datasets["valid"].lengths()

    def heldout_drawings(self, num: int) -> list[Tensor]:
        """`num` validation drawings, evenly spaced over the split (so merged categories are all
        represented), as normalised deltas: the data side of sketch statistics."""
        self.setup()
        drawings = self.datasets["valid"].drawings
        index = torch.linspace(0, len(drawings) - 1, min(num, len(drawings))).round().long()
        return [drawings[i] for i in index.tolist()]

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        self.setup()
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_stroke3,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        """Order from (seed, epoch) only and checkpointed by Lightning: exact mid-epoch resume."""
        self.setup()
        return ResumableDataLoader(
            self.datasets["train"],
            batch_size=self.batch_size,
            seed=self.seed,
            num_workers=self.num_workers,
            collate_fn=collate_stroke3,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.val_batch_size)
