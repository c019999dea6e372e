"""Shared test setup: CPU only, no network, W&B disabled, few threads, a private cache folder."""

import os
import tempfile

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
# Caches (calibration, compiled kernels) go to a fresh folder, not the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="sparse_dm_test_cache_")
os.environ.setdefault("WANDB_SILENT", "true")

import torch

torch.set_num_threads(2)



@pytest.fixture
def single_thread():
    """One intra-op thread for tests of tiny GRUs and nets: on a busy 2-core box a second thread spends
    its time in OpenMP barriers. Use with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
