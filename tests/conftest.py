"""Shared test setup: CPU only, no network, W&B disabled, few threads, a private cache folder."""

import os
import tempfile

os.environ.setdefault("WANDB_MODE", "disabled")
# Caches (calibration, compiled kernels) go to a fresh folder, not the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="sparse_dm_test_cache_")
os.environ.setdefault("WANDB_SILENT", "true")

import torch

torch.set_num_threads(2)
