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
routes each sample by its timestep (sparse_dm.inference.bands). `candidate_forms` lists every distinct
form the thresholds could give a model, which `calibrated_thresholds` times on the sampling workload.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from sparse_dm.inference.bands import BandedForm, band_net
from sparse_dm.inference.calibrate import (
    Calibration,
    Candidate,
    InferenceSettings,
    Thresholds,
    Workload,
    calibrate,
)
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


def gru_density(gru: nn.GRU) -> float:
    """What `threshold_gru` is compared with: the largest density of the GRU's recurrent matrices."""
    return max(
        density(masked_weight(gru, f"weight_hh_l{layer}{suffix}"))
        for layer in range(gru.num_layers)
        for suffix in ("", "_reverse")
    )


def converts_gru(net: nn.Module) -> bool:
    """Whether `net` can become a SparseChiroDiffNet (a float32 ChiroDiffNet)."""
    return isinstance(net, ChiroDiffNet) and all(p.dtype == torch.float32 for p in net.parameters())


def chirodiff_choices(net: ChiroDiffNet, thresholds: Thresholds) -> list[LayerChoice] | None:
    """Per-matrix kernels for SparseChiroDiffNet, or None when the GRU should stay nn.GRU."""
    gru = net.gru
    if gru_density(gru) > thresholds.gru:
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
    choices = chirodiff_choices(net, thresholds) if converts_gru(net) else None
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


def _banded_form(
    net: nn.Module, bands: TimestepBands, thresholds: Thresholds, quiet: bool = False
) -> tuple[BandedForm, list[LayerChoice]]:
    forms, choices = [], []
    for band, (start, end) in enumerate(bands.ranges()):
        form, band_choices = _single_form(band_net(net, band, bands.num_bands), thresholds)
        named = [replace(c, name=f"band{band}.{c.name}") for c in band_choices]
        if not quiet:
            log.info("inference form: band %d (t in [%d, %d)): %s", band, start, end, type(form).__name__)
            _log_choices(named)
        forms.append(form)
        choices.extend(named)
    return BandedForm(forms, bands).eval(), choices


def banded_inference_form(
    net: nn.Module, bands: TimestepBands, thresholds: Thresholds
) -> tuple[BandedForm, list[LayerChoice]]:
    """The inference form of a net with timestep-band masks: band k's form holds W * m_k, each
    matrix CSR or dense by its own density. Choices are named `band<k>.<matrix>`."""
    return _banded_form(net, bands, thresholds)


def _form(
    net: nn.Module, bands: TimestepBands | None, thresholds: Thresholds
) -> tuple[nn.Module, list[LayerChoice]]:
    """The form without logging its choices (calibration builds many)."""
    if bands is None:
        return _single_form(net, thresholds)
    return _banded_form(net, bands, thresholds, quiet=True)


def _spread(values: list[float], count: int) -> list[float]:
    """`count` of the sorted `values`, evenly spaced through them, always with the largest."""
    if len(values) <= count:
        return values
    last = len(values) - 1
    if count == 1:
        return [values[last]]
    return sorted({values[round(i * last / (count - 1))] for i in range(count)})


def candidate_forms(
    net: nn.Module, bands: TimestepBands | None, settings: InferenceSettings
) -> tuple[Candidate, list[Candidate]]:
    """The all-dense reference form and every distinct form the thresholds could give `net` (fixed
    thresholds stay fixed). `threshold_gru` matters only at each convertible GRU's `gru_density`;
    for each of those, `threshold_linear` matters only at the densities of the matrices whose kernel
    it flips (between 0 and 1), at most `linear_candidates` values including 0."""
    nets = [net] if bands is None else [band_net(net, b, bands.num_bands) for b in range(bands.num_bands)]
    built: dict[tuple[float, float], tuple[nn.Module, list[LayerChoice]]] = {}

    def form(linear: float, gru: float) -> tuple[nn.Module, list[LayerChoice]]:
        if (linear, gru) not in built:
            built[linear, gru] = _form(net, bands, Thresholds(linear, gru, settings.recurrence))
        return built[linear, gru]

    def candidate(linear: float, gru: float) -> Candidate:
        module, choices = form(linear, gru)
        loops = gru_loops(module)
        csr = sum(c.kernel == CSR for c in choices)
        label = (f"threshold_linear={linear:g}, threshold_gru={gru:g}: GRU {loops or 'none'}, "
                 f"{csr}/{len(choices)} matrices CSR")  # fmt: skip
        signature = json.dumps([loops, [(c.name, round(c.density, 6), c.kernel) for c in choices]])
        return Candidate(Thresholds(linear, gru, settings.recurrence), module, label, signature)

    if settings.gru is not None:
        gru_values = [settings.gru]
    else:
        gru_values = sorted({0.0} | {gru_density(n.gru) for n in nets if converts_gru(n)})
    candidates: dict[str, Candidate] = {}
    for gru in gru_values:
        if settings.linear is not None:
            linear_values = [settings.linear]
        else:
            flips = sorted({
                high.density
                for high, low in zip(form(1.0, gru)[1], form(0.0, gru)[1], strict=True)
                if high.kernel != low.kernel
            })  # fmt: skip
            linear_values = [0.0, *_spread(flips, settings.protocol.linear_candidates - 1)]
        for linear in linear_values:
            found = candidate(linear, gru)
            candidates.setdefault(found.signature, found)
    return candidate(0.0, 0.0), list(candidates.values())


def model_key(net: nn.Module, bands: TimestepBands | None) -> str:
    """The model's part of a calibration key: class, parameter shapes and dtypes, and the bands."""
    parts = [type(net).__name__, [(n, list(p.shape), str(p.dtype)) for n, p in net.named_parameters()]]
    parts.append(None if bands is None else list(bands.ranges()))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def calibrated_thresholds(
    net: nn.Module, settings: InferenceSettings, workload: Workload, bands: TimestepBands | None = None
) -> Calibration:
    """The candidate form that runs `workload` fastest (sparse_dm.inference.calibrate); call it only
    when something is `auto` (`settings.fixed` is None)."""
    if settings.fixed is not None:
        raise ValueError("nothing to calibrate: every threshold is fixed (settings.fixed)")
    reference, candidates = candidate_forms(net, bands, settings)
    return calibrate(reference, candidates, workload, model_key(net, bands), settings)


@contextmanager
def weights_of(module: nn.Module, weights: str) -> Iterator[nn.Module]:
    """`module.net` holding its `weights` ('ema': the masked EMA average; 'raw': the training ones)."""
    if weights not in SAMPLING_WEIGHTS:
        raise ValueError(f"weights must be one of {SAMPLING_WEIGHTS}, got {weights!r}")
    if weights == "ema":
        with module.ema_weights() as net:
            yield net
    else:
        yield module.net


def check_cpu(module: nn.Module) -> None:
    device = next(module.net.parameters()).device
    if device.type != "cpu":
        raise ValueError(
            f"the sparse inference form runs on the CPU (MKL CSR kernels); the model is on {device}: "
            "use backend=dense there"
        )


def install_inference_form(
    module: nn.Module, thresholds: Thresholds, weights: str = "ema"
) -> list[LayerChoice]:
    """Replace `module.net` (a DiffusionModule's denoiser) by the inference form of its `weights`
    ('ema': the masked EMA average; 'raw': the training weights). The form holds those values, so
    the module then samples with its own net (`sampling.weights` becomes 'raw'). A model with
    timestep-band masks gets a `BandedForm` (one form per band) and its band router is dropped:
    the form routes by timestep itself."""
    check_cpu(module)
    router: BandRouter | None = getattr(module, "timestep_bands", None)
    with weights_of(module, weights) as net:
        if router is None:
            form, choices = inference_form(net, thresholds)
        else:
            form, choices = banded_inference_form(net, router.bands, thresholds)
    module.net = form
    if router is not None:
        module.timestep_bands = None
    module.sampling_cfg["weights"] = "raw"
    return choices
