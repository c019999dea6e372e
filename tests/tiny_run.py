"""A tiny sparse ChiroDiff trained for a few steps (seconds), for export/sampling tests."""

from __future__ import annotations

from pathlib import Path

from sparse_dm.train import run
from run_config import TINY_CHIRODIFF, compose_config

TINY_SPARSE_CHIRODIFF = [
    *TINY_CHIRODIFF,
    "model.net.num_layers=2",  # a second layer reads the first one's bidirectional output
    "method=rigl",
    "sparsity=0.9",
    "validate_before_fit=false",
]


def train_tiny_run(output_dir: Path) -> Path:
    """Train it and return its last checkpoint."""
    run(compose_config(output_dir, TINY_SPARSE_CHIRODIFF))
    return output_dir / "checkpoints" / "last.ckpt"
