"""Making a trained module sample on a backend: dense (masked weights) or the sparse inference form."""

from __future__ import annotations

import logging
from typing import Any

from sparse_dm.inference import gru_loops, install_inference_form, resolve_thresholds

BACKENDS = ("sparse", "dense")

log = logging.getLogger(__name__)


def prepare(module: Any, backend: str, weights: str, inference_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Make `module` sample with `weights` (ema | raw) on `backend`; for the sparse form, what it runs."""
    if backend != "sparse":
        module.sampling_cfg["weights"] = weights
        return None
    choices = install_inference_form(module, resolve_thresholds(inference_cfg), weights)
    csr = sum(c.kernel == "csr" for c in choices)
    log.info("sparse form: %d of %d matrices CSR", csr, len(choices))
    return {"csr_matrices": csr, "matrices": len(choices), "gru": gru_loops(module.net)}
