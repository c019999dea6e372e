"""The sparse inference form: trained masked networks run with CSR kernels where that is faster.

`inference_form(net, thresholds)` converts any network carrying `<param>_mask` buffers;
`install_inference_form(module, ...)` does it for a DiffusionModule's denoiser (one form per band,
routed by timestep, for models with timestep-band masks: `banded_inference_form`). Thresholds come
from the `inference` config (`resolve_settings`): fixed, or `auto`, the candidate form that runs the
model's own sampling workload fastest on this machine (`calibrated_thresholds`, cached).
"""

from sparse_dm.inference.bands import BandedForm
from sparse_dm.inference.calibrate import InferenceSettings, Thresholds, resolve_settings
from sparse_dm.inference.convert import (
    LayerChoice,
    banded_inference_form,
    calibrated_thresholds,
    gru_loops,
    inference_form,
    install_inference_form,
)

__all__ = [
    "BandedForm",
    "InferenceSettings",
    "LayerChoice",
    "Thresholds",
    "banded_inference_form",
    "calibrated_thresholds",
    "gru_loops",
    "inference_form",
    "install_inference_form",
    "resolve_settings",
]
