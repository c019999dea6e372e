"""An exported model as a `.safetensors` file: the standard, code-free tensor format.

The exported payload (model config, per-layer CSR entries, dense tensors, extras such as timestep bands) is a
tree of containers with tensors at its leaves. Here every tensor leaf becomes one safetensors tensor, named by
its path in the tree (`sparse/gru.weight_ih_l0/values`), and the tree itself, with each tensor replaced by its
name, goes into the JSON header (`__metadata__["sparse_dm"]`). So the file round-trips bit-exactly, and a
reader with only `torch` + `safetensors` finds every masked weight as `sparse/<param>/{crow,col,values}` plus
`__metadata__["layers"]` (shape, active count, density per layer): see docs/exported_files.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMAT = "sparse_dm.safetensors"
VERSION = 1
SUFFIX = ".safetensors"
TENSOR_REF = "__tensor__"  # a leaf of the header tree that names a tensor of the file
SEPARATOR = "/"  # parameter names contain dots, so paths use slashes


def _flatten(node: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """The JSON skeleton of `node`; its tensors collected into `tensors` under their paths."""
    if isinstance(node, Tensor):
        tensors[path] = node.detach().cpu().contiguous()
        return {TENSOR_REF: path}
    if isinstance(node, dict):
        if not all(isinstance(key, str) and SEPARATOR not in key for key in node):
            raise ValueError(f"{path or 'payload'}: keys must be strings without {SEPARATOR!r}")
        prefix = f"{path}{SEPARATOR}" if path else ""
        return {key: _flatten(value, prefix + key, tensors) for key, value in node.items()}
    if isinstance(node, list | tuple):
        return [_flatten(value, f"{path}{SEPARATOR}{i}", tensors) for i, value in enumerate(node)]
    if node is None or isinstance(node, bool | int | float | str):
        return node
    raise TypeError(f"{path}: cannot store a {type(node).__name__} in a safetensors header")


def _unflatten(node: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(node, dict):
        if set(node) == {TENSOR_REF}:
            return tensors[node[TENSOR_REF]]
        return {key: _unflatten(value, tensors) for key, value in node.items()}
    if isinstance(node, list):
        return [_unflatten(value, tensors) for value in node]
    return node


def layer_records(sparse: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per masked weight: shape, active count and density (the header's `layers`)."""
    records = {}
    for name, entry in sparse.items():
        size = 1
        for dim in entry["shape"]:
            size *= int(dim)
        active = int(entry["values"].numel())
        shape = [int(d) for d in entry["shape"]]
        records[name] = {"shape": shape, "active": active, "density": active / size}
    return records


def write_safetensors(payload: dict[str, Any], path: Path) -> Path:
    """Write an export payload ({"model", "weights", "step", "sparse", "dense", "extra"})."""
    tensors: dict[str, Tensor] = {}
    tree = _flatten(payload, "", tensors)
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "sparse_dm": json.dumps(tree),
        "config": json.dumps(payload["model"]),
        "layers": json.dumps(layer_records(payload["sparse"])),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    temporary.chmod(0o666 & ~umask)  # safetensors creates its file private; an export is meant to be shared
    temporary.replace(path)  # a reader never sees half a file
    return path


def read_safetensors(path: Path) -> dict[str, Any]:
    """The payload of a sparse_dm `.safetensors` export, refusing any other file."""
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{path} is not a {FORMAT} file (written by python -m sparse_dm.export)")
            if metadata.get("version") != str(VERSION):
                raise ValueError(
                    f"{path}: {FORMAT} version {metadata.get('version')} is not supported "
                    f"(expected {VERSION})"
                )
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as err:  # truncated file, bad header or offsets
        raise ValueError(f"cannot read {path}: {err}") from err
    return _unflatten(json.loads(metadata["sparse_dm"]), tensors)
