"""The one way sparse_dm reads a checkpoint-like file: `torch.load` that never runs code from it.

Every reader (resume, init_from, evaluate, exported `.sdm` files, first-stage autoencoders) goes through
`read_checkpoint`, so a file that would need arbitrary unpickling is refused in one place, with one message.
"""

from __future__ import annotations

import collections
import pickle
import typing
from pathlib import Path
from typing import Any

import torch


class InertPickledObject:
    """Stand-in for the known harmless non-tensor objects of official checkpoints (Lightning callback
    states, omegaconf configs, argparse namespaces): it only stores what the pickle hands it, never runs
    the original class's code, and is discarded -- only ``state_dict`` tensors are used."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: object) -> None:
        self.state = state


# Globals found in CompVis / PyTorch-Lightning 1.x checkpoints besides tensors. Each is replaced by the
# inert stand-in above (or, for typing.Any and builtin types, by the harmless type itself); anything else
# is refused by torch's weights-only unpickler.
KNOWN_HARMLESS_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.fabric.utilities.data.AttributeDict",
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode",
    "argparse.Namespace",
)
SAVE_HINT = (
    "If you trust the file, re-save its state_dict with plain torch.save and load that."
)
HARMLESS_BUILTINS = (typing.Any, dict, list, tuple, set, int, float, str, bool, collections.defaultdict)


def _unpickler_reason(err: Exception) -> str:
    """The line of torch's long weights-only error that names the refused global."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")


def read_checkpoint(path: str | Path, *, mmap: bool = False, hint: str = "") -> Any:
    """Tensors and plain containers only (`weights_only=True`), optionally memory-mapped (cheap even for
    multi-GB checkpoints). Official Lightning checkpoints that also pickle callback states or omegaconf
    objects load through the same weights-only unpickler with KNOWN_HARMLESS_GLOBALS mapped to an inert
    stand-in; any other global (e.g. ``os.system`` in a ``__reduce__`` payload) is refused, naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return _load(path, mmap)
    except pickle.UnpicklingError:
        pass
    allowlist = [(InertPickledObject, name) for name in KNOWN_HARMLESS_GLOBALS] + list(HARMLESS_BUILTINS)
    try:
        with torch.serialization.safe_globals(allowlist):
            return _load(path, mmap)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it pickles objects that are not tensors, plain containers or the "
            f"known harmless Lightning/omegaconf globals ({_unpickler_reason(err)}). Unpickling them could "
            f"run arbitrary code. {hint or SAVE_HINT}"
        ) from err


def _load(path: Path, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise
    except Exception as err:  # truncated zip, not a torch file, ...: say which file and why
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
