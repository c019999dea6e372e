"""The multi-node SLURM configs compose into a Lightning Trainer and a submitit job that agree."""

from __future__ import annotations

import pytest
from helpers.run_config import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment

NODES, GPUS = 3, 2


@pytest.fixture
def slurm_job_env(monkeypatch):
    """What srun sets for task 0 of a 3-node x 2-task job."""
    env = {
        "SLURM_JOB_ID": "900",
        "SLURM_JOB_NAME": "sparse_dm",
        "SLURM_NTASKS": str(NODES * GPUS),
        "SLURM_NTASKS_PER_NODE": str(GPUS),
        "SLURM_NNODES": str(NODES),
        "SLURM_NODELIST": "gpu[01-03]",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_slurm_ddp_launcher_and_trainer_agree(tmp_path, slurm_job_env):
    overrides = [
        f"paths.output_dir={tmp_path}",
        "trainer=slurm_ddp",
        "hydra/launcher=slurm_ddp",
        f"trainer.num_nodes={NODES}",
        f"trainer.devices={GPUS}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (NODES, GPUS, GPUS)
    assert launcher.signal_delay_s > 0 and "SIGUSR2" in cfg.callbacks.last.signals  # submitit's warning
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu"
    # Lightning accepts it as a SLURM job of N x G processes (CPU here: no GPU on the test machine).
    trainer_cfg = {**cfg.trainer, "accelerator": "cpu"}
    trainer = instantiate(trainer_cfg, logger=False, enable_checkpointing=False)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.num_nodes, trainer.world_size) == (NODES, NODES * GPUS)
