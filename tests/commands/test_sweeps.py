"""Sweep configs in multirun_sweeps/: each composes with Hydra and expands to the paper's grid."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from sparse_dm.reporting.protocol import load_spec
from sparse_dm.run import checks as config

REPO = Path(__file__).resolve().parents[2]
SWEEPS = REPO / "multirun_sweeps"
# --config-dir multirun_sweeps on the command line == this search-path entry for compose()
SEARCH = f"hydra.searchpath=[file://{REPO / 'sparse_dm' / 'conf'}]"
S_GRID = {0.1, 0.25, 0.5, 0.75, 0.9}
SEEDS = {0, 1, 2}
EXPECTED = {  # file -> (jobs, methods, sparsities, prune rates, seeds, Te of the default experiment)
    "fig2_latent_diffusion": (45, {"static", "rigl", "magran"}, S_GRID, {0.5}, SEEDS, 1100),
    "fig3_chirodiff": (45, {"static", "rigl", "magran"}, S_GRID, {0.5}, SEEDS, 800),
    "fig9_latent_diffusion_p005": (30, {"rigl", "magran"}, S_GRID, {0.05}, SEEDS, 1100),
    "fig10_chirodiff_p005": (30, {"rigl", "magran"}, S_GRID, {0.05}, SEEDS, 800),
    "dense_latent_diffusion": (3, {"dense"}, {0.0}, None, SEEDS, 1100),
    "dense_chirodiff": (3, {"dense"}, {0.0}, None, SEEDS, 800),
    "appendix_h_prune_rate": (15, {"rigl"}, {0.25}, {0.05, 0.1, 0.2, 0.3, 0.5}, SEEDS, 1100),
    "demo_cpu_kanjivg": (12, {"static", "rigl", "magran"}, {0.5, 0.9}, {0.5}, {0, 1}, 10),
}


@pytest.fixture(scope="module")
def hydra_ctx():
    with initialize_config_dir(version_base="1.3", config_dir=str(SWEEPS)):
        yield


def expand(name: str, extra: list[str] | None = None) -> tuple[DictConfig, list[list[str]]]:
    """The sweep's hydra node and the job override lists Hydra's basic sweeper would launch."""
    cfg = compose(name, overrides=[SEARCH], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()] + (extra or [])
    return cfg.hydra, BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)[0]


def values(jobs: list[list[str]], key: str) -> set[str]:
    return {o.split("=", 1)[1] for j in jobs for o in j if o.split("=", 1)[0] == key}


EVAL_SWEEPS = {"table8_ddim_steps"}  # sweeps of sparse_dm.evaluate, not of training
STUDY = "study_kanjivg_cpu"  # arms are study_arm/ files, not method x S grids (issue 13)
STUDY_GPU = "study_kanjivg_gpu"  # the same arms, longer, on a GPU
STUDY_SWEEPS = {  # arms (study_arm/) x 3 seeds
    STUDY: 27,
    STUDY_GPU: 27,
    "study_tsteps_kanjivg_cpu": 15,
    "study_tsteps_kanjivg_gpu": 6,
}
STUDY_ARMS = {  # study_arm -> (method, S, p)
    "dense": ("dense", 0.0, 0.5),
    "static_s50": ("static", 0.5, 0.5),
    "static_s90": ("static", 0.9, 0.5),
    "rigl_s50": ("rigl", 0.5, 0.5),
    "rigl_s90": ("rigl", 0.9, 0.5),
    "rigl_s90_p005": ("rigl", 0.9, 0.05),
    "magran_s50": ("magran", 0.5, 0.5),
    "magran_s90": ("magran", 0.9, 0.5),
    "magran_s90_p005": ("magran", 0.9, 0.05),
}
PAPER_TE, PAPER_STEPS = 800, 48_600  # ChiroDiff KanjiVG: 600 epochs x ceil(10,358 / 128) steps
STUDY_STEPS, STUDY_TE = 1000, 16  # Te = round(800 x 1000 / 48,600): the paper's Te scaled to the run


def test_study_sweep_runs_every_arm_with_every_seed(hydra_ctx):
    hydra_cfg, jobs = expand(STUDY)
    assert len(jobs) == len(STUDY_ARMS) * len(SEEDS) and values(jobs, "study_arm") == set(STUDY_ARMS)
    assert {int(v) for v in values(jobs, "seed")} == SEEDS
    assert f"multirun/{STUDY}/" in hydra_cfg.sweep.dir
    for arm, (method, sparsity, prune_rate) in STUDY_ARMS.items():
        cfg = compose(STUDY, overrides=[SEARCH, f"study_arm={arm}"])
        config.validate(cfg)
        assert (cfg.method.name, cfg.sparsity, cfg.prune_rate) == (method, sparsity, prune_rate)
        assert (cfg.trainer.max_steps, cfg.update_interval) == (STUDY_STEPS, STUDY_TE)
        assert cfg.model.sampling.weights == "raw" and cfg.method.end_fraction is None


def test_gpu_study_is_the_cpu_study_longer_with_te_scaled_the_same_way(hydra_ctx):
    _, jobs = expand(STUDY_GPU)
    assert values(jobs, "study_arm") == set(STUDY_ARMS) and len(jobs) == len(STUDY_ARMS) * len(SEEDS)
    for arm in ("rigl_s90_p005", "dense"):
        cpu = compose(STUDY, overrides=[SEARCH, f"study_arm={arm}"])
        gpu = compose(STUDY_GPU, overrides=[SEARCH, f"study_arm={arm}"])
        config.validate(gpu)
        steps = gpu.trainer.max_steps
        assert gpu.update_interval == round(PAPER_TE * steps / PAPER_STEPS)  # the paper's update count
        assert gpu.trainer.accelerator == "gpu" and gpu.trainer.check_val_every_n_epoch is None
        assert gpu.model == cpu.model and gpu.method.name == cpu.method.name
        assert (gpu.sparsity, gpu.prune_rate) == (cpu.sparsity, cpu.prune_rate)


def test_gpu_band_study_is_the_cpu_band_study_longer_with_te_scaled_the_same_way(hydra_ctx):
    _, jobs = expand("study_tsteps_kanjivg_gpu")
    assert values(jobs, "study_arm") == {"rigl_s90", "rigl_s90_tbands"}
    for arm in ("rigl_s90", "rigl_s90_tbands"):
        cpu = compose("study_tsteps_kanjivg_cpu", overrides=[SEARCH, f"study_arm={arm}"])
        gpu = compose("study_tsteps_kanjivg_gpu", overrides=[SEARCH, f"study_arm={arm}"])
        config.validate(gpu)
        assert gpu.update_interval == round(PAPER_TE * gpu.trainer.max_steps / PAPER_STEPS)
        assert gpu.trainer.accelerator == "gpu" and gpu.trainer.check_val_every_n_epoch is None
        assert gpu.model == cpu.model and gpu.method.name == cpu.method.name
        assert gpu.method.timestep_bands == cpu.method.timestep_bands
        assert (gpu.sparsity, gpu.prune_rate) == (cpu.sparsity, cpu.prune_rate)


# Base configs of the protocol studies: `python -m sparse_dm.study` composes them with each arm's
# overrides (multirun_sweeps/study_specs/*.yaml name them under `config`), not `--multirun`.
STUDY_SPEC_BASES = {"study_protocol_cpu"}


def test_every_sweep_file_is_covered():
    assert {p.stem for p in SWEEPS.glob("*.yaml")} == (
        set(EXPECTED) | EVAL_SWEEPS | set(STUDY_SWEEPS) | STUDY_SPEC_BASES
    )


def test_every_study_spec_base_is_named_by_a_spec():
    named = {load_spec(p).config_name for p in sorted((SWEEPS / "study_specs").glob("*.yaml"))}
    assert named >= STUDY_SPEC_BASES and named <= STUDY_SPEC_BASES | set(STUDY_SWEEPS)


def composed(name: str, job: list[str]) -> dict:
    cfg = compose(name, overrides=[SEARCH, *job])
    config.validate(cfg)
    return OmegaConf.to_container(cfg, resolve=False)


@pytest.mark.parametrize("name", sorted(STUDY_SWEEPS))
def test_study_sweeps_validate_and_share_the_single_mask_arm(hydra_ctx, name):
    _, jobs = expand(name)
    assert len(jobs) == STUDY_SWEEPS[name] and {int(v) for v in values(jobs, "seed")} == SEEDS
    for job in jobs:
        composed(name, job)


def test_timestep_band_study_reuses_the_single_mask_arm(hydra_ctx):
    # The timestep-band study's single-mask arm is the paper-findings study's rigl_s90 run for run.
    assert composed("study_tsteps_kanjivg_cpu", ["study_arm=rigl_s90", "seed=1"]) == composed(
        "study_kanjivg_cpu", ["study_arm=rigl_s90", "seed=1"]
    )
    bands = compose("study_tsteps_kanjivg_cpu", overrides=[SEARCH, "study_arm=rigl_s90_tbands_adaptive"])
    assert (
        bands.method.timestep_bands.sparsities == [0.85, 0.95]
        and bands.method.adaptive.min_prune_rate == 0.05
    )
    assert (
        bands.trainer.max_steps == 1000 and bands.update_interval == 16 and bands.method.end_fraction is None
    )


def test_table8_sweeps_ddim_steps_per_checkpoint(hydra_ctx):
    hydra_cfg, jobs = expand("table8_ddim_steps", ["ckpt_path=a.ckpt,b.ckpt"])
    assert len(jobs) == 6 and values(jobs, "sampling_steps") == {"50", "100", "200"}
    cfg = compose("table8_ddim_steps", overrides=[SEARCH, *jobs[0]])
    assert cfg.num_samples == 10000 and cfg.fidelity.feature_extractor == "inception-v3-compat"
    assert "multirun/table8_ddim_steps/" in hydra_cfg.sweep.dir


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_grid(hydra_ctx, name):
    count, methods, sparsities, rates, seeds, te = EXPECTED[name]
    hydra_cfg, jobs = expand(name)
    assert len(jobs) == count
    assert len({tuple(sorted(j)) for j in jobs}) == count  # no duplicate jobs
    assert values(jobs, "method") == methods  # dense only in the dense sweeps
    assert {int(v) for v in values(jobs, "seed")} == seeds
    if methods == {"dense"}:
        assert not values(jobs, "sparsity") and not values(jobs, "prune_rate")  # no Dense x S duplicates
    else:
        assert {float(v) for v in values(jobs, "sparsity")} == sparsities
        assert {float(v) for v in values(jobs, "prune_rate") or {"0.5"}} == rates
    for job in (jobs[0], jobs[-1]):
        cfg = compose(name, overrides=[SEARCH, *job])
        config.validate(cfg)
        assert cfg.update_interval == te  # the experiment preset (or demo value) is applied
        assert cfg.sparsity in sparsities
    assert f"multirun/{name}/" in hydra_cfg.sweep.dir
    # one folder per job, named by its overrides (conf/hydra/default.yaml)
    assert OmegaConf.to_container(hydra_cfg.sweep)["subdir"] == "${hydra:job.override_dirname}"


def test_command_line_replaces_grid_values(hydra_ctx):
    _, jobs = expand("fig3_chirodiff", ["experiment=chirodiff_vmnist", "seed=0"])
    assert len(jobs) == 15 and all("experiment=chirodiff_vmnist" in j and "seed=0" in j for j in jobs)


def test_launchers_compose(hydra_ctx, monkeypatch):
    monkeypatch.delenv("SLURM_PARTITION", raising=False)
    local = compose(
        "demo_cpu_kanjivg", overrides=[SEARCH, "hydra/launcher=local_parallel"], return_hydra_config=True
    ).hydra.launcher
    assert local._target_.endswith("JoblibLauncher") and local.n_jobs == 2
    monkeypatch.setenv("SLURM_PARTITION", "gpu-a100")
    slurm = compose(
        "fig2_latent_diffusion",
        overrides=[SEARCH, "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"],
        return_hydra_config=True,
    ).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.partition, slurm.gpus_per_node, slurm.tasks_per_node) == ("gpu-a100", 4, 1)
    assert slurm.account is None and slurm.timeout_min > 0
