"""The sparse inference form: trained masked networks run with CSR kernels where that is faster.

`inference_form(net, thresholds)` converts any network carrying `<param>_mask` buffers;
`install_inference_form(module, ...)` does it for a DiffusionModule's denoiser (one form per band,
routed by timestep, for models with timestep-band masks: `banded_inference_form`); thresholds come from
`resolve_thresholds(cfg.inference)` (measured on this machine and cached, or fixed in config).
"""

from sparse_dm.inference.bands import BandedForm
from sparse_dm.inference.calibrate import Thresholds, resolve_thresholds
from sparse_dm.inference.convert import (
    LayerChoice,
    banded_inference_form,
    gru_loops,
    inference_form,
    install_inference_form,
)

__all__ = [
    "BandedForm",
    "LayerChoice",
    "Thresholds",
    "banded_inference_form",
    "gru_loops",
    "inference_form",
    "install_inference_form",
    "resolve_thresholds",
]
