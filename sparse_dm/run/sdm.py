"""The `.sdm` file: a trained sparse model as a small, self-contained plain-tensor file.

Every masked weight is stored as CSR over its mask (values + int32 row pointers + the narrowest integer column
indices that fit); every other tensor dense, with the model config needed to rebuild it. Positions inside a
mask are kept even when their value is 0 (freshly regrown weights), so masks and masked weights load back
bit-identically. Read with sparse_dm.files.read_checkpoint: nothing in the file is executed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from sparse_dm.files.checkpoint import read_checkpoint
from sparse_dm.run.bands import EXTRA_KEY as BANDS_KEY
from sparse_dm.run.bands import attach_bands, bands_extra
from sparse_dm.sparsity.bands import BAND_MASKS_SUFFIX
from sparse_dm.sparsity.masks import MASK_SUFFIX, PrunableWeight, register_masks
from sparse_dm.training.modules.diffusion import SAMPLING_WEIGHTS

FORMAT = "sparse_dm.sdm"


VERSION = 1


SUFFIX = ".sdm"

INT16_LIMIT = 2**15  # column indices below this fit int16


def encode_masked(weight: Tensor, mask: Tensor) -> dict[str, Any]:
    """A masked weight (any rank; rows = first dim) as CSR over the mask's positions."""
    rows = weight.shape[0]
    flat_mask = mask.reshape(rows, -1)
    columns = flat_mask.shape[1]
    row_index, col_index = flat_mask.nonzero(as_tuple=True)
    crow = torch.zeros(rows + 1, dtype=torch.int32)
    crow[1:] = torch.cumsum(torch.bincount(row_index, minlength=rows), 0).to(torch.int32)
    index_dtype = torch.int16 if columns < INT16_LIMIT else torch.int32
    return {
        "shape": list(weight.shape),
        "crow": crow,
        "col": col_index.to(index_dtype),
        "values": weight.detach().reshape(rows, -1)[row_index, col_index].clone(),
    }


def decode_masked(entry: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """CSR entry -> (dense weight with zeros outside the mask, bool mask)."""
    shape = [int(s) for s in entry["shape"]]
    rows = shape[0]
    columns = int(torch.Size(shape[1:]).numel())
    crow = entry["crow"].to(torch.long)
    row_index = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1])
    col_index = entry["col"].to(torch.long)
    weight = torch.zeros(rows, columns, dtype=entry["values"].dtype)
    mask = torch.zeros(rows, columns, dtype=torch.bool)
    weight[row_index, col_index] = entry["values"]
    mask[row_index, col_index] = True
    return weight.view(shape), mask.view(shape)


def masked_names(net: nn.Module) -> list[str]:
    """Parameter names that carry a `<name>_mask` buffer."""
    buffers = dict(net.named_buffers())
    return [name for name, _ in net.named_parameters() if name + MASK_SUFFIX in buffers]


def pack_net(net: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(sparse entries, dense tensors) of a denoiser's state_dict; masks live inside the sparse entries."""
    state = net.state_dict()
    names = masked_names(net)
    sparse = {name: encode_masked(state[name], state[name + MASK_SUFFIX]) for name in names}
    skip = set(names) | {name + MASK_SUFFIX for name in names}
    skip |= {name for name in state if name.endswith(BAND_MASKS_SUFFIX)}  # stored by bands_extra
    dense = {name: value.clone() for name, value in state.items() if name not in skip}
    return sparse, dense


def unpack_into(net: nn.Module, sparse: dict[str, Any], dense: dict[str, Tensor]) -> None:
    """Register the masks on a freshly built net and load every tensor (strict: names must match)."""
    decoded = {name: decode_masked(entry) for name, entry in sparse.items()}
    weights = []
    for name in decoded:
        module_name, _, attr = name.rpartition(".")
        weights.append(PrunableWeight(name, net.get_submodule(module_name), attr))
    register_masks(weights, [mask for _, mask in decoded.values()])
    state = dict(dense)
    for name, (weight, mask) in decoded.items():
        state[name] = weight
        state[name + MASK_SUFFIX] = mask
    net.load_state_dict(state, strict=True)


def export_payload(module: Any, model_cfg: dict[str, Any], weights: str, step: int | None) -> dict[str, Any]:
    """`module.net` (its EMA or raw weights) as an export payload, with the config that rebuilds the module;
    written as `.safetensors` (sparse_dm.files.safetensors_file) or as a legacy `.sdm` (write_sdm)."""
    if weights not in SAMPLING_WEIGHTS:
        raise ValueError(f"weights must be one of {SAMPLING_WEIGHTS}, got {weights!r}")
    if weights == "ema":
        with module.ema_weights():
            sparse, dense = pack_net(module.net)
    else:
        sparse, dense = pack_net(module.net)
    extra = bands_extra(module)
    length_pool = getattr(module, "length_pool", None)
    if length_pool is not None:
        extra["length_pool"] = length_pool.cpu().clone()
    return {"model": model_cfg, "weights": weights, "step": step, "sparse": sparse, "dense": dense,
            "extra": extra}  # fmt: skip


def write_sdm(payload: dict[str, Any], path: Path) -> Path:
    """The payload as a plain `torch.save` file (the format before safetensors; still read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "version": VERSION, **payload}, path)
    return path


def read_sdm(path: Path) -> dict[str, Any]:
    """The payload of an `.sdm` file, refusing anything that is not one (or needs unpickling code)."""
    payload = read_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (written by python -m sparse_dm.export)")
    if payload.get("version") != VERSION:
        raise ValueError(
            f"{path}: {FORMAT} version {payload.get('version')} is not supported (expected {VERSION})"
        )
    return payload


def net_from_sdm(payload: dict[str, Any]) -> nn.Module:
    """The denoiser alone (a plain nn.Module, masks attached), without Lightning."""
    net = instantiate(payload["model"]["net"], _convert_="all")
    unpack_into(net, payload["sparse"], payload["dense"])
    return net.eval()


def module_from_sdm(payload: dict[str, Any]) -> Any:
    """The DiffusionModule (for its samplers and renderers) around the exported denoiser."""
    module = instantiate(payload["model"], _convert_="all")
    module.net = net_from_sdm(payload)
    if BANDS_KEY in payload["extra"]:
        module.timestep_bands = attach_bands(module.net, payload["extra"][BANDS_KEY])
    module.ema = type(module.ema)(module.net, decay=0.0)  # sampling's EMA swap: the exported weights
    if "length_pool" in payload["extra"] and hasattr(module, "set_length_pool"):
        module.set_length_pool(payload["extra"]["length_pool"])
    return module.eval()
