"""The study layout of sparse_dm.report on synthetic sweeps written here: the t quantile and Welch
interval, per-arm table values, learning curves, missing seeds, bad input, provenance and the CLI."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.run_config import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from sparse_dm.report import report
from sparse_dm.reporting.seed_stats import SeedStats, t_quantile, welch_difference
from sparse_dm.reporting.study import arm_curve, read_curve, sweep_records
from sparse_dm.reporting.study_report import make_study_report, study_options
from sparse_dm.reporting.tables import group_runs, load_summaries
from tests.reporting.test_report import assert_real_png

STEPS = 1000
TE = 16
CURVE_STEPS = (0, 250, 500, 750, 1000)
DATA_SKETCH = {
    "strokes_per_drawing": 9.0,
    "one_point_stroke_fraction": 0.0,
    "pen_up_rate": 0.1,
    "delta_std": 2.5,
}
SEEDS = (0, 1, 2)
# final raw val loss per arm and seed: dense mean 1.00 (SD 0.02); RigL S = 0.5 sits 0.10 above it with
# the same SD; MagRan S = 0.5 has dense's values (difference 0, interval straddles 0)
RAW = {
    ("dense", 0.0, 0.5): (1.00, 1.02, 0.98),
    ("rigl", 0.5, 0.5): (1.10, 1.12, 1.08),
    ("magran", 0.5, 0.5): (1.00, 1.02, 0.98),
    ("rigl", 0.9, 0.5): (1.30, 1.34, 1.26),
    ("rigl", 0.9, 0.05): (1.20, 1.22, 1.18),
    ("static", 0.9, 0.5): (1.40, 1.42, 1.38),
}
EMA_OFFSET = -0.05
MULTIRUN = {
    "hydra": {
        "mode": "MULTIRUN",
        "overrides": {
            "hydra": ["hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2", "hydra.mode=MULTIRUN"],
            "task": ["num_threads=1", "seed=0,1,2"],
        },
        "job": {"name": "train", "config_name": "study_kanjivg_cpu"},
        "sweeper": {
            "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
            "params": {"study_arm": "a,b,c,d,e,f", "seed": "0,1"},  # the command line sets seed=0,1,2
        },
        "runtime": {
            "cwd": "/repo",
            "config_sources": [
                {"path": "hydra.conf", "schema": "pkg", "provider": "hydra"},
                {"path": "/repo/multirun_sweeps", "schema": "file", "provider": "command-line"},
            ],
        },
    }
}
SWEEP_COMMAND = (
    "python -m sparse_dm.train -m --config-dir multirun_sweeps --config-name study_kanjivg_cpu "
    "hydra/launcher=local_parallel hydra.launcher.n_jobs=2 num_threads=1 seed=0,1,2"
)
T0 = 1_800_000_000.0  # job start times (file mtimes) of the synthetic runs
WALL = 300.0  # each run's wall_time_s; two jobs at a time: starts T0 + WALL * (run index // 2)


def write_curve(path: Path, values: dict[int, float]) -> None:
    """A Lightning-style CSV: validation rows interleaved with train-loss rows that leave it empty."""
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train/loss", "val/loss_raw", "val/loss_ema"])
        for step, value in values.items():
            writer.writerow([0, step, "", value, value + EMA_OFFSET])
            writer.writerow([0, step + 1, 1.5, "", ""])


def write_run(
    root: Path, method: str, sparsity: float, p: float, seed: int, raw: float, start: float | None = None
) -> Path:
    run = root / f"method={method},sparsity={sparsity},prune_rate={p},seed={seed}"
    sample = run / "samples" / f"step_{STEPS:06d}.png"
    sample.parent.mkdir(parents=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(sample)
    # the curve ends at the final value; earlier points lie above it
    write_curve(run / "csv" / "metrics.csv", {s: raw + (STEPS - s) / STEPS for s in CURVE_STEPS})
    summary = {
        "model": "chirodiff",
        "dataset": "kanjivg",
        "method": method,
        "sparsity": sparsity,
        "prune_rate": p,
        "update_interval": TE,
        "seed": seed,
        "train_steps": STEPS,
        "exploration_rate": 1.0 if method == "dense" else 1.0 - sparsity + 0.1 * (method != "static"),
        "mask_updates": 0 if method in ("dense", "static") else 62,
        "metrics": {"val/loss_raw": raw, "val/loss_ema": raw + EMA_OFFSET, "val/loss": raw},
        "sketch_stats": {
            "samples": {k: v * (1 + sparsity) for k, v in DATA_SKETCH.items()},
            "data": DATA_SKETCH,
            "num_drawings": 64,
        },
        "samples": [f"/elsewhere/{run.name}/samples/step_000500.png", f"/elsewhere/{run.name}/{sample.name}"],
        "wall_time_s": WALL,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    if start is not None:
        (run / ".hydra").mkdir()
        (run / ".hydra" / "hydra.yaml").write_text("hydra: {}\n")
        os.utime(run / ".hydra" / "hydra.yaml", (start, start))
    return run


def write_sweep(root: Path, arms: dict = RAW, seeds: dict | None = None) -> Path:
    """The study layout: a timestamped sweep folder with multirun.yaml and one folder per run."""
    sweep = root / "2026-01-01_00-00-00"
    sweep.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(MULTIRUN), sweep / "multirun.yaml")
    index = 0
    for (method, sparsity, p), values in arms.items():
        for seed in (seeds or {}).get((method, sparsity, p), SEEDS):
            write_run(sweep, method, sparsity, p, seed, values[seed], start=T0 + WALL * (index // 2))
            index += 1
    return sweep


def study_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="study", overrides=overrides)


def options(*overrides: str):
    return study_options(study_config(["sweep_dir=x", "out=y", *overrides]).study)


def table_row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


# ----- statistics -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("df", "expected"), [(2, 4.3027), (4, 2.7764), (10, 2.2281)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-5)


def test_t_quantile_closed_forms_and_symmetry():
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)  # Cauchy
    p = 0.9
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4), rel=1e-12)
    assert 1.959 < t_quantile(0.975, 1e6) < 1.9601  # tends to the normal quantile 1.95996


def test_welch_interval_hand_computed():
    # equal n and SD: va = vb = 1, se = sqrt(2), df = 2 exactly
    d = welch_difference([1.0, 3.0], [0.0, 2.0], 0.95)
    half = 4.302653 * math.sqrt(2)
    assert (d.mean, d.df) == pytest.approx((1.0, 2.0))
    assert (d.low, d.high) == pytest.approx((1.0 - half, 1.0 + half), abs=1e-5)
    assert d.excludes_zero is False
    # unequal variances: var 1 vs 19/12, n = 3 each -> df = (1/3 + 19/36)^2 / ((1/3)^2/2 + (19/36)^2/2)
    d = welch_difference([1.0, 2.0, 3.0], [1.5, 2.5, 4.0], 0.95)
    assert d.df == pytest.approx(3.80594, abs=1e-5)
    assert d.mean == pytest.approx(-2 / 3)
    assert (d.low, d.high) == pytest.approx((-3.29574, 1.96241), abs=1e-4)


def test_welch_interval_undefined_cases_say_why():
    one = welch_difference([1.0], [1.0, 2.0], 0.95)
    assert one.low is None and one.excludes_zero is None and "n = 1 vs 2" in one.reason
    flat = welch_difference([1.0, 1.0], [2.0, 2.0], 0.95)
    assert flat.low is None and flat.reason == "zero variance in both groups"
    assert math.isnan(SeedStats.of([1.0]).sd) and SeedStats.of([1.0, 3.0]).sd == pytest.approx(math.sqrt(2))


# ----- the table --------------------------------------------------------------------------------------
def test_table_values_for_a_constructed_study(tmp_path):
    write_sweep(tmp_path / "sweep")
    text = make_study_report([tmp_path / "sweep"], tmp_path / "out", options()).read_text()
    # RigL S = 0.5: mean 1.10, SD 0.02 vs dense 1.00, SD 0.02: df = 4, half = 2.7764 * sqrt(2 * 0.02^2 / 3)
    half = 2.776445 * math.sqrt(2 * 0.02**2 / 3)
    assert table_row(text, "RigL-DM, S = 0.5, p = 0.5") == [
        "RigL-DM, S = 0.5, p = 0.5",
        "3",
        "1.1000 ± 0.0200",
        "1.0500 ± 0.0200",
        "+0.1000",
        f"[{0.1 - half:+.4f}, {0.1 + half:+.4f}]",
        "yes",
        "+5.0",
    ]
    assert table_row(text, "MagRan-DM, S = 0.5, p = 0.5")[4:7] == [
        "+0.0000",
        f"[{-half:+.4f}, {half:+.4f}]",
        "no",
    ]
    assert table_row(text, "Dense")[1:5] == ["3", "1.0000 ± 0.0200", "0.9500 ± 0.0200", "reference"]
    # sketch statistics of the samples (scaled by 1 + S here), exploration and updates
    sketch_table = text.split("## Samples and sparse-training statistics per arm")[1]
    sketch = table_row(sketch_table, "RigL-DM, S = 0.9, p = 0.05")
    assert sketch[2:] == [
        "4.750 ± 0.000",
        "0.190 ± 0.000",
        "0.000 ± 0.000",
        "17.100 ± 0.000",
        "0.200 ± 0.000",
        "62",
    ]
    assert table_row(sketch_table, "Data (reference drawings)")[2] == "2.500 ± 0.000"
    rows = {r["arm"]: r for r in csv.DictReader((tmp_path / "out" / "report.csv").open())}
    rigl = rows["RigL-DM, S = 0.5, p = 0.5"]
    assert float(rigl["diff_vs_dense"]) == pytest.approx(0.1)
    assert float(rigl["ci_low"]) == pytest.approx(0.1 - half, abs=1e-6)
    assert float(rigl["welch_df"]) == pytest.approx(4.0)
    assert (
        rigl["ci_excludes_zero"] == "True"
        and rows["MagRan-DM, S = 0.5, p = 0.5"]["ci_excludes_zero"] == "False"
    )
    assert float(rigl["val_loss_raw_sd"]) == pytest.approx(0.02) and float(
        rigl["gap_dense_sds"]
    ) == pytest.approx(5)
    assert list(rows) == [  # dense first, then paper order, S ascending, p = 0.5 before p = 0.05
        "Dense",
        "Static-DM, S = 0.9",
        "RigL-DM, S = 0.5, p = 0.5",
        "RigL-DM, S = 0.9, p = 0.5",
        "RigL-DM, S = 0.9, p = 0.05",
        "MagRan-DM, S = 0.5, p = 0.5",
    ]


def test_missing_seeds_render_with_their_n(tmp_path):
    seeds = {("rigl", 0.5, 0.5): (0, 1), ("magran", 0.5, 0.5): (2,)}
    write_sweep(tmp_path / "sweep", seeds=seeds)
    text = make_study_report([tmp_path / "sweep"], tmp_path / "out", options()).read_text()
    two = table_row(text, "RigL-DM, S = 0.5, p = 0.5")
    assert two[1] == "2" and two[2] == f"1.1100 ± {math.sqrt(2) * 0.01:.4f}" and two[6] == "yes"
    one = table_row(text, "MagRan-DM, S = 0.5, p = 0.5")
    assert one[1:4] == ["1", "0.9800 ± n/a (1 seed)", "0.9300 ± n/a (1 seed)"]
    assert one[5] == "none: n = 1 vs 3: an SD, and so an interval, needs 2 seeds each" and one[6] == "n/a"
    assert "15 finished of 18 planned runs" in text


# ----- learning curves --------------------------------------------------------------------------------
def test_read_curve_skips_other_rows_and_keeps_the_replayed_value(tmp_path):
    path = tmp_path / "csv" / "metrics.csv"
    write_curve(path, {0: 1.5, 250: 1.2})
    with path.open("a", newline="") as f:
        csv.writer(f).writerow([0, 250, "", 1.1, 1.0])  # a resumed run logs step 250 again
    assert read_curve(path, "val/loss_raw") == {0: 1.5, 250: 1.1}
    with pytest.raises(ValueError, match=r"metrics.csv has no 'val/fid' and 'step' columns"):
        read_curve(path, "val/fid")
    with pytest.raises(FileNotFoundError, match=r"missing.csv not found \(the run needs logger.csv=true\)"):
        read_curve(tmp_path / "missing.csv", "val/loss_raw")


def test_arm_curve_averages_the_steps_every_seed_logged(tmp_path):
    sweep = write_sweep(tmp_path / "sweep", arms={("rigl", 0.5, 0.5): RAW[("rigl", 0.5, 0.5)]})
    short = next(sweep.glob("*seed=2"))
    (short / "csv" / "metrics.csv").unlink()
    (short / "csv").rmdir()
    write_curve(short / "csv" / "metrics.csv", {0: 2.0, 250: 1.83})  # seed 2 stopped logging at 250
    (group,), _ = group_runs(load_summaries([sweep]), "val_loss_raw")
    curve = arm_curve(group, "val/loss_raw")
    assert curve.steps == [0, 250] and curve.dropped_steps == 3
    assert curve.stats[1].mean == pytest.approx((1.10 + 0.75 + 1.12 + 0.75 + 1.83) / 3)
    assert curve.stats[0].n == 3


# ----- bad input --------------------------------------------------------------------------------------
def test_no_runs_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no summary.json found below {tmp_path}"):
        make_study_report([tmp_path], tmp_path / "out", options())


def test_no_dense_runs_is_stated(tmp_path):
    arms = {k: v for k, v in RAW.items() if k[0] != "dense"}
    write_sweep(tmp_path / "sweep", arms=arms)
    text = make_study_report([tmp_path / "sweep"], tmp_path / "out", options()).read_text()
    assert "> No dense reference: no dense run has the primary metric" in text
    assert table_row(text, "RigL-DM, S = 0.5, p = 0.5")[4] == "no dense reference"
    rigl = next(r for r in csv.DictReader((tmp_path / "out" / "report.csv").open()) if r["method"] == "rigl")
    assert rigl["diff_vs_dense"] == "" and rigl["ci_low"] == ""


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("layout=table", r"layout='table'; allowed: one of \['paper', 'study', 'protocol'\]"),
        ("metric=fid", r"metric='fid' applies to layout=paper"),
        (
            "study.primary=fid",
            r"study.primary='fid'; allowed: one of \['val_loss', 'val_loss_ema', 'val_loss_raw'\]",
        ),
        ("study.confidence=95", r"study.confidence=95; allowed: 0 < confidence < 1"),
        ("study.sketch=[delta_std,fid]", r"study.sketch has \['fid'\]; allowed: \['delta_std'"),
    ],
)
def test_bad_config_names_the_key(tmp_path, override, message):
    write_sweep(tmp_path / "sweep")
    cfg = study_config([f"sweep_dir={tmp_path / 'sweep'}", f"out={tmp_path / 'out'}", override])
    with pytest.raises(ValueError, match=message):
        report(cfg)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_two_tasks_in_one_study_are_refused(tmp_path):
    sweep = write_sweep(tmp_path / "sweep", arms={("dense", 0.0, 0.5): RAW[("dense", 0.0, 0.5)]})
    other = json.loads((next(sweep.glob("*seed=0")) / "summary.json").read_text())
    (tmp_path / "sweep" / "ldm").mkdir()
    (tmp_path / "sweep" / "ldm" / "summary.json").write_text(
        json.dumps({**other, "model": "latent_diffusion"})
    )
    with pytest.raises(ValueError, match=r"compares arms of one \(model, dataset\); found \[\('chirodiff'"):
        make_study_report([tmp_path / "sweep"], tmp_path / "out", options())


# ----- provenance and figures ------------------------------------------------------------------------
def test_sweep_command_and_wall_time(tmp_path):
    write_sweep(tmp_path / "sweep")
    (record,) = sweep_records(load_summaries([tmp_path / "sweep"]))
    runs = len(RAW) * len(SEEDS)
    assert record.command == SWEEP_COMMAND and record.runs == runs and record.planned == 6 * 3
    # pairs run back to back: the last pair ends WALL * runs / 2 after the first start
    assert record.wall_s == pytest.approx(WALL * runs / 2)
    assert record.job_seconds == pytest.approx(WALL * runs)
    # a run without its job-start file: the wall time is not measured, and the report says so
    (next((tmp_path / "sweep").rglob("hydra.yaml"))).unlink()
    (record,) = sweep_records(load_summaries([tmp_path / "sweep"]))
    assert record.wall_s is None and record.missing_start == 1
    text = make_study_report([tmp_path / "sweep"], tmp_path / "out", options()).read_text()
    assert f"wall time not measured (1 of {runs} runs lack .hydra/hydra.yaml)" in text


def test_sample_figure_shows_seed0_final_grid_per_arm_at_grid_sparsity(tmp_path, monkeypatch):
    from sparse_dm.reporting import study_report

    drawn = {}
    monkeypatch.setattr(study_report, "plot_sample_grids", lambda panels, path: drawn.update(panels) or path)
    write_sweep(tmp_path / "sweep", seeds={("static", 0.9, 0.5): (1, 2)})
    make_study_report([tmp_path / "sweep"], tmp_path / "out", options())
    assert sorted(drawn) == [
        "Dense\nseed 0, step_001000",
        "RigL-DM, S = 0.9, p = 0.05\nseed 0, step_001000",
        "RigL-DM, S = 0.9, p = 0.5\nseed 0, step_001000",
        "Static-DM, S = 0.9\nseed 0 not run",
    ]
    rigl = drawn["RigL-DM, S = 0.9, p = 0.05\nseed 0, step_001000"]
    assert rigl.parent.parent.name == "method=rigl,sparsity=0.9,prune_rate=0.05,seed=0" and rigl.is_file()
    assert drawn["Static-DM, S = 0.9\nseed 0 not run"] is None


def test_cli_renders_the_study_with_its_commands(tmp_path):
    """The documented command line, on a tiny synthetic sweep: header, tables, CSV, four real figures."""
    write_sweep(tmp_path / "multirun" / "study")
    cmd = [
        sys.executable,
        "-m",
        "sparse_dm.report",
        "--config-name",
        "study",
        "sweep_dir=multirun/study",
        "out=docs",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path, env=env)
    text = (tmp_path / "docs" / "report.md").read_text()
    header = text.split("```sh\n")[1].split("```")[0].splitlines()
    assert header == [
        SWEEP_COMMAND,
        "python -m sparse_dm.report --config-name study sweep_dir=multirun/study out=docs",
    ]
    assert f"- Training steps: {STEPS}" in text and f"- Mask update interval Te: {TE} steps" in text
    assert "- Seeds: 0, 1, 2" in text
    assert (
        "18 finished of 18 planned runs; wall time 45.0 min from the first job's start to the last job's end"
        in text
    )
    assert "(summed run time 90.0 min, 2.00 jobs in parallel on average)" in text
    links = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert links == [
        "plots/loss_vs_sparsity.png",
        "plots/learning_curves.png",
        "plots/prune_rate.png",
        "plots/samples.png",
    ]
    for link in links:
        assert_real_png(tmp_path / "docs" / link)
    assert len(list(csv.DictReader((tmp_path / "docs" / "report.csv").open()))) == len(RAW)


def test_runs_outside_a_multirun_say_what_was_not_recorded(tmp_path):
    for seed in SEEDS[:2]:
        write_run(tmp_path / "runs", "dense", 0.0, 0.5, seed, RAW[("dense", 0.0, 0.5)][seed])
    text = make_study_report([tmp_path / "runs"], tmp_path / "out", options()).read_text()
    header = text.split("```sh\n")[1].split("```")[0].splitlines()
    assert header == [
        "(not recorded: some runs have no multirun.yaml above them)",
        "(not recorded: the report was not made from the command line)",
    ]
    assert "2 finished of an uncounted number of planned runs; wall time not measured (2 of 2 runs" in text
