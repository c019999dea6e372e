"""Making a trained module sample on a backend: dense (masked weights) or the sparse inference form.

For the sparse form with `auto` thresholds, the candidate forms are timed on the module's own
sampling: `module.generate` at the batch that will be sampled (its lengths drawn from the module's
pool of real data lengths, its labels as sampling makes them), a few DDIM steps per call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sparse_dm.inference.calibrate import Calibration, Workload, resolve_settings
from sparse_dm.inference.convert import (
    calibrated_thresholds,
    check_cpu,
    gru_loops,
    install_inference_form,
    weights_of,
)

BACKENDS = ("sparse", "dense")

log = logging.getLogger(__name__)


@contextmanager
def sampling_with(module: Any, form: nn.Module) -> Iterator[None]:
    """`module` samples with `form` as its denoiser inside the block (no band router: a banded form
    routes by timestep itself); its own net and router are back afterwards."""
    net, router = module.net, getattr(module, "timestep_bands", None)
    module.net = form
    module.timestep_bands = None
    try:
        yield
    finally:
        module.net = net
        module.timestep_bands = router


def sampling_workload(module: Any, batch: int, steps: int, seed: int) -> Workload:
    """A call of `module.generate(batch)` with `steps` DDIM steps and a fixed seed, on a given form."""

    def run(form: nn.Module) -> None:
        with sampling_with(module, form):
            module.generate(batch, torch.Generator().manual_seed(seed), sampler="ddim", steps=steps)

    return run


def sparse_thresholds(module: Any, weights: str, inference_cfg: dict[str, Any], batch: int) -> Calibration:
    """The `inference` config's thresholds for `module`: fixed, or (`auto`) calibrated on its
    sampling of `batch` samples."""
    settings = resolve_settings(inference_cfg)
    if (fixed := settings.fixed) is not None:
        return Calibration(fixed, {}, False)
    check_cpu(module)
    protocol = settings.protocol
    workload = sampling_workload(module, batch, protocol.ddim_steps, protocol.seed)
    router = getattr(module, "timestep_bands", None)
    with weights_of(module, weights) as net:
        return calibrated_thresholds(net, settings, workload, None if router is None else router.bands)


def prepare(
    module: Any, backend: str, weights: str, inference_cfg: dict[str, Any], batch: int | None = None
) -> dict[str, Any] | None:
    """Make `module` sample with `weights` (ema | raw) on `backend`; for the sparse form, what it runs.
    `batch`: how many samples one sampler call makes (default: the module's sampling.num_samples)."""
    if backend != "sparse":
        module.sampling_cfg["weights"] = weights
        return None
    batch = int(module.sampling_cfg["num_samples"]) if batch is None else batch
    calibration = sparse_thresholds(module, weights, inference_cfg, batch)
    thresholds = calibration.thresholds
    choices = install_inference_form(module, thresholds, weights)
    csr = sum(c.kernel == "csr" for c in choices)
    log.info("sparse form: %d of %d matrices CSR", csr, len(choices))
    return {
        "csr_matrices": csr,
        "matrices": len(choices),
        "gru": gru_loops(module.net),
        "thresholds": {"linear": thresholds.linear, "gru": thresholds.gru},
        "calibration": calibration.record or None,  # None: fixed thresholds
    }
