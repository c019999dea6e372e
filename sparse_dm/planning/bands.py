"""Cost figures of a run with timestep-dependent masks (method.timestep_bands).

Each band has its own active counts, so its own forward FLOPs. Training draws t uniformly, so the
training cost is the band costs weighted by the bands' shares of [0, T). Sampling visits the
sampler's actual timesteps (DDIM: `sampling.steps` of them, DDPM: all T), each with its band's
mask: sampling FLOPs = sum over visited timesteps of that band's forward FLOPs. The single-mask
sparsity with the same average sampling FLOPs is what a fair single-mask baseline uses.

What memory and a checkpoint hold is another axis: the union of the band masks (`params_stored`). Before
training it is the expected union of independently drawn band masks; a run measures it from its masks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from sparse_dm.diffusion.samplers import ddim_timesteps
from sparse_dm.sparsity.bands import TimestepBands
from sparse_dm.sparsity.factory import timestep_bands_from
from sparse_dm.sparsity.flops import WeightUse, forward_flops

log = logging.getLogger(__name__)

BISECTION_STEPS = 60  # halvings of [0, 1): far below one weight of any layer
LABEL_TOLERANCE = 0.005  # |sparsity - equal-FLOPs sparsity| above this gets a warning


def timestep_bands(cfg: DictConfig) -> TimestepBands | None:
    """The configured timestep bands (None: one mask for all timesteps)."""
    bands = OmegaConf.select(cfg, "method.timestep_bands")
    if bands is None:
        return None
    return timestep_bands_from(bands, int(cfg.model.diffusion.num_timesteps))


def sampler_timesteps(cfg: DictConfig) -> list[int]:
    """The timesteps the configured sampler visits (descending)."""
    sampling, num_timesteps = cfg.model.sampling, int(cfg.model.diffusion.num_timesteps)
    if sampling.sampler == "ddpm":
        return list(range(num_timesteps - 1, -1, -1))
    return ddim_timesteps(num_timesteps, int(sampling.steps), sampling.get("discretization", "uniform"))


def matching_sparsity(measure: Callable[[float], float], target: float) -> float:
    """The single-mask sparsity S with measure(S) == target, by bisection (measure falls as S grows)."""
    low, high = 0.0, 1.0
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if measure(middle) > target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def equal_flops_sparsity(
    counts_at: Callable[[float], dict[str, int]], uses: Sequence[WeightUse], target_flops: float
) -> float:
    """The single-mask sparsity S whose forward FLOPs (layer counts `counts_at(S)`) equal `target_flops`."""
    return matching_sparsity(lambda s: forward_flops(list(uses), counts_at(s)), target_flops)


def equal_stored_sparsity(counts_at: Callable[[float], dict[str, int]], stored: int) -> float:
    """The single-mask sparsity S that stores as many weights as the union of the band masks."""
    return matching_sparsity(lambda s: sum(counts_at(s).values()), stored)


def expected_union(numel: int, band_counts: Sequence[int]) -> int:
    """Expected active count of the union of band masks drawn independently (uniform positions given each
    band's count, as `random_band_masks` draws them): numel * (1 - prod_k (1 - n_k / numel))."""
    missed = 1.0
    for count in band_counts:
        missed *= 1 - count / numel
    return round(numel * (1 - missed))


def banded_cost(
    cfg: DictConfig,
    bands: TimestepBands,
    per_band: Sequence[dict],
    uses: Sequence[WeightUse],
    counts_at: Callable[[float], dict[str, int]],
) -> dict:
    """Combine the per-band `cost_summary` dicts into the run's cost (see the module docstring)."""
    shares = bands.train_shares()
    timesteps = sampler_timesteps(cfg)
    visits = bands.steps_per_band(timesteps)
    f_dense = per_band[0]["flops_forward_dense"]
    test = sum(n * c["flops_forward"] for n, c in zip(visits, per_band, strict=True))
    average_forward = test / len(timesteps)
    equal = equal_flops_sparsity(counts_at, uses, average_forward)
    if abs(float(cfg.sparsity) - equal) > LABEL_TOLERANCE:
        log.warning(
            "sparsity=%s labels this timestep-band run, but the single mask with the same average "
            "sampling FLOPs has sparsity %.4f: set sparsity=%.4f so reports compare like with like",
            cfg.sparsity,
            equal,
            equal,
        )
    train_known = all(c["flops_train"] is not None for c in per_band)
    numels = {use.name: use.numel for use in uses}
    layers = []  # per layer: the densest band's count (what one sampling step needs at most)
    for i, layer in enumerate(per_band[0]["layers"]):
        band_nnz = [c["layers"][i]["nnz"] for c in per_band]
        densest = max(band_nnz)
        numel = numels[layer["name"]]
        layers.append(
            {**layer, "nnz": densest, "density": densest / numel, "band_nnz": band_nnz,
             "stored_nnz": expected_union(numel, band_nnz)}
        )
    return {
        **per_band[0],
        "params_active": max(c["params_active"] for c in per_band),
        "params_active_bands": [c["params_active"] for c in per_band],
        "params_stored": sum(layer["stored_nnz"] for layer in layers),
        "params_stored_basis": "expected at initialisation (band masks drawn independently)",
        "flops_forward": sum(s * c["flops_forward"] for s, c in zip(shares, per_band, strict=True)),
        "flops_train": sum(s * c["flops_train"] for s, c in zip(shares, per_band, strict=True))
        if train_known
        else None,
        "flops_train_ratio": sum(s * c["flops_train_ratio"] for s, c in zip(shares, per_band, strict=True)),
        "flops_test_per_sample": test,
        "flops_test_per_sample_dense": f_dense * len(timesteps),
        "flops_test_ratio": average_forward / f_dense,
        "sampling_steps": len(timesteps),
        "layers": layers,
        "timestep_bands": {
            "boundaries": list(bands.boundaries),
            "sparsities": list(bands.sparsities),
            "bands": [
                {
                    "t_range": [start, end],
                    "sparsity": s,
                    "params_active": c["params_active"],
                    "flops_forward": c["flops_forward"],
                    "flops_forward_ratio": c["flops_forward"] / f_dense,
                    "train_share": share,
                    "sampling_steps": n,
                }
                for (start, end), s, c, share, n in zip(
                    bands.ranges(), bands.sparsities, per_band, shares, visits, strict=True
                )
            ],
            "equal_sampling_flops_sparsity": equal,
            "equal_stored_params_sparsity": equal_stored_sparsity(
                counts_at, sum(layer["stored_nnz"] for layer in layers)
            ),
        },
    }
