"""Shared test setup: CPU only, no network, W&B disabled, few threads."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import torch

torch.set_num_threads(2)
