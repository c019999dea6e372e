"""Trained (masked) network -> its inference form, choosing CSR or dense per matrix by density.

`inference_form(net, thresholds)` works on any network carrying `<param>_mask` buffers (what the
SparseEngine registers, and what every checkpoint and `.sdm` export holds):
- a float32 ChiroDiffNet whose GRU is sparse enough (`thresholds.gru`): `SparseChiroDiffNet`,
  feature-major end to end, each matrix CSR when its density <= `thresholds.linear`, the GRU steps
  in the compiled loop when `thresholds.recurrence` is set;
- anything else: a copy with masked `nn.Linear` layers below `thresholds.linear` replaced by
  `SparseLinear` and every other masked weight multiplied out (convolutions stay dense: unstructured
  CSR convolutions were never faster on CPU, see docs/benchmarks.md).
The form is inference only (no autograd) and equals the masked dense network up to float rounding.
A model trained with timestep-band masks gets one such form per band, behind a `BandedForm` that
routes each sample by its timestep (sparse_dm.inference.bands).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from sparse_dm.inference.bands import BandedForm, band_net
from sparse_dm.inference.calibrate import Thresholds
from sparse_dm.inference.chirodiff import SparseChiroDiffNet
from sparse_dm.inference.kernels import density, masked_weight
from sparse_dm.inference.sparse_gru import paired_weight
from sparse_dm.inference.sparse_linear import SparseLinear
from sparse_dm.models.chirodiff import ChiroDiffNet
from sparse_dm.sparsity.bands import BandRouter, TimestepBands
from sparse_dm.sparsity.masks import MASK_SUFFIX
from sparse_dm.training.modules.diffusion import SAMPLING_WEIGHTS

log = logging.getLogger(__name__)

CSR, DENSE = "csr", "dense"


@dataclass(frozen=True)
class LayerChoice:
    """One matrix of the inference form: its density and the kernel chosen for it."""

    name: str
    density: float
    kernel: str


def _choice(name: str, matrix: torch.Tensor, threshold: float) -> LayerChoice:
    d = density(matrix)
    return LayerChoice(name, d, CSR if d <= threshold else DENSE)


def chirodiff_choices(net: ChiroDiffNet, thresholds: Thresholds) -> list[LayerChoice] | None:
    """Per-matrix kernels for SparseChiroDiffNet, or None when the GRU should stay nn.GRU."""
    gru = net.gru
    recurrent = [
        density(masked_weight(gru, f"weight_hh_l{layer}{suffix}"))
        for layer in range(gru.num_layers)
        for suffix in ("", "_reverse")
    ]
    if max(recurrent) > thresholds.gru:
        return None
    choices = []
    for layer in range(gru.num_layers):
        fwd, rev = (
            masked_weight(gru, f"weight_ih_l{layer}"),
            masked_weight(gru, f"weight_ih_l{layer}_reverse"),
        )
        width = gru.input_size if layer == 0 else 2 * gru.hidden_size
        paired = paired_weight(fwd, rev, torch.zeros(2 * fwd.shape[0]), width, from_bigru=layer > 0)
        # the compiled loop reads both GRU matrices as CSR (it does its own input projection)
        input_threshold = 1.0 if thresholds.recurrence is not None else thresholds.linear
        choices.append(_choice(f"gru.input.{layer}", paired, input_threshold))
        hh = density(torch.cat([masked_weight(gru, f"weight_hh_l{layer}{s}") for s in ("", "_reverse")]))
        choices.append(LayerChoice(f"gru.recurrent.{layer}", hh, CSR))
    choices.append(_choice("proj", masked_weight(net.proj, "weight"), thresholds.linear))
    choices.append(_choice("out", masked_weight(net.out, "weight"), thresholds.linear))
    return choices


@torch.no_grad()
def generic_form(net: nn.Module, thresholds: Thresholds) -> tuple[nn.Module, list[LayerChoice]]:
    form = copy.deepcopy(net)
    choices = []
    for name, module in list(form.named_modules()):
        masks = [b for b, _ in module.named_buffers(recurse=False) if b.endswith(MASK_SUFFIX)]
        for buffer in masks:
            attr = buffer[: -len(MASK_SUFFIX)]
            getattr(module, attr).copy_(masked_weight(module, attr))
        if isinstance(module, nn.Linear) and "weight" + MASK_SUFFIX in masks:
            choice = _choice(name, module.weight, thresholds.linear)
            choices.append(choice)
            if choice.kernel == CSR:
                parent_name, _, child = name.rpartition(".")
                setattr(form.get_submodule(parent_name), child, SparseLinear(module))
        elif masks:
            choices.extend(
                LayerChoice(
                    f"{name}.{b[: -len(MASK_SUFFIX)]}",
                    density(getattr(module, b[: -len(MASK_SUFFIX)])),
                    DENSE,
                )
                for b in masks
            )
    form.requires_grad_(False)
    return form, choices


def _single_form(net: nn.Module, thresholds: Thresholds) -> tuple[nn.Module, list[LayerChoice]]:
    float32 = all(p.dtype == torch.float32 for p in net.parameters())
    choices = chirodiff_choices(net, thresholds) if isinstance(net, ChiroDiffNet) and float32 else None
    if choices is not None:
        form: nn.Module = SparseChiroDiffNet(
            net, {c.name: c.kernel == CSR for c in choices}, thresholds.recurrence
        )
    else:
        form, choices = generic_form(net, thresholds)
    return form.eval(), choices


def gru_loops(form: nn.Module) -> str | None:
    """Which GRU a form runs: 'compiled (<threading>)' or 'torch ops' (the CSR GRU's loop), 'nn.GRU'
    (kept dense), several joined for band forms, None without a GRU."""
    loops = set()
    for module in form.modules():
        if isinstance(module, SparseChiroDiffNet):
            recurrence = module.gru.recurrence
            loops.add("torch ops" if recurrence is None else f"compiled ({recurrence.threading})")
        elif isinstance(module, nn.GRU):
            loops.add("nn.GRU")
    return ", ".join(sorted(loops)) or None


def _log_choices(choices: list[LayerChoice]) -> None:
    for choice in choices:
        log.info("inference form: %-22s density %.3f -> %s", choice.name, choice.density, choice.kernel)


def inference_form(net: nn.Module, thresholds: Thresholds) -> tuple[nn.Module, list[LayerChoice]]:
    """The inference form of `net` (a new module; `net` is not changed) and the per-matrix choices."""
    form, choices = _single_form(net, thresholds)
    _log_choices(choices)
    if loops := gru_loops(form):
        log.info("inference form: GRU runs as %s", loops)
    return form, choices


def banded_inference_form(
    net: nn.Module, bands: TimestepBands, thresholds: Thresholds
) -> tuple[BandedForm, list[LayerChoice]]:
    """The inference form of a net with timestep-band masks: band k's form holds W * m_k, each
    matrix CSR or dense by its own density. Choices are named `band<k>.<matrix>`."""
    forms, choices = [], []
    for band, (start, end) in enumerate(bands.ranges()):
        form, band_choices = _single_form(band_net(net, band, bands.num_bands), thresholds)
        log.info("inference form: band %d (t in [%d, %d)): %s", band, start, end, type(form).__name__)
        named = [replace(c, name=f"band{band}.{c.name}") for c in band_choices]
        _log_choices(named)
        forms.append(form)
        choices.extend(named)
    return BandedForm(forms, bands).eval(), choices


def install_inference_form(
    module: nn.Module, thresholds: Thresholds, weights: str = "ema"
) -> list[LayerChoice]:
    """Replace `module.net` (a DiffusionModule's denoiser) by the inference form of its `weights`
    ('ema': the masked EMA average; 'raw': the training weights). The form holds those values, so
    the module then samples with its own net (`sampling.weights` becomes 'raw'). A model with
    timestep-band masks gets a `BandedForm` (one form per band) and its band router is dropped:
    the form routes by timestep itself."""
    if weights not in SAMPLING_WEIGHTS:
        raise ValueError(f"weights must be one of {SAMPLING_WEIGHTS}, got {weights!r}")
    device = next(module.net.parameters()).device
    if device.type != "cpu":
        raise ValueError(
            f"the sparse inference form runs on the CPU (MKL CSR kernels); the model is on {device}: "
            "use backend=dense there"
        )
    router: BandRouter | None = getattr(module, "timestep_bands", None)

    def convert() -> tuple[nn.Module, list[LayerChoice]]:
        if router is None:
            return inference_form(module.net, thresholds)
        return banded_inference_form(module.net, router.bands, thresholds)

    if weights == "ema":
        with module.ema_weights():
            form, choices = convert()
    else:
        form, choices = convert()
    module.net = form
    if router is not None:
        module.timestep_bands = None
    module.sampling_cfg["weights"] = "raw"
    return choices
