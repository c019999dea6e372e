"""Model-agnostic diffusion pieces: noise schedules, losses and samplers."""

from sparse_dm.diffusion.losses import masked_mse
from sparse_dm.diffusion.samplers import EpsFn, ddim_sample, ddpm_sample, sample
from sparse_dm.diffusion.schedule import NoiseSchedule

__all__ = ["EpsFn", "NoiseSchedule", "ddim_sample", "ddpm_sample", "masked_mse", "sample"]
