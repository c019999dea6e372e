"""sparse_dm.report on synthetic summaries: Table 1/2 layout, marks, CSV and a real plot."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.run_config import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from sparse_dm.report import make_report, report
from sparse_dm.reporting import plots
from sparse_dm.reporting.tables import METRICS
from sparse_dm.run.summary import merge_results

PARAMS, PRUNABLE = 416_859, 413_304
FLOPS_TRAIN, FLOPS_TEST = 1.8e13, 7.35e9
# mean FID per (method, S); seeds add -0.5 / +0.5 so the SD over 2 seeds is 0.71
FID = {
    ("static", 0.5): 22.0,
    ("static", 0.9): 30.0,
    ("rigl", 0.5): 20.0,
    ("rigl", 0.9): 28.0,
    ("magran", 0.5): 21.5,
    ("magran", 0.9): 29.0,
    ("dense", 0.0): 21.0,
}
SEED_OFFSET = {0: -0.5, 1: 0.5}


def summary(method: str, sparsity: float, seed: int, fid: float | None, val_loss: float) -> dict:
    density = 1.0 - sparsity
    s = {
        "model": "chirodiff",
        "dataset": "kanjivg",
        "method": method,
        "sparsity": sparsity,
        "prune_rate": 0.5,
        "update_interval": 800,
        "seed": seed,
        "params_total": PARAMS,
        "params_prunable": PRUNABLE,
        "params_active": round(PRUNABLE * density),
        "flops_forward_dense": FLOPS_TEST / 50,
        "flops_forward": FLOPS_TEST / 50 * density,
        "flops_test_per_sample": FLOPS_TEST * density,
        "flops_test_per_sample_dense": FLOPS_TEST,
        "flops_train": FLOPS_TRAIN * density,
        "flops_train_dense": FLOPS_TRAIN,
        "flops_train_ratio": density,
        "flops_test_ratio": density,
        "layers": [],
        "mask_updates": 3,
        "exploration_rate": density,
        "metrics": {"val/loss": val_loss, "train/loss": val_loss},
        "samples": [],
        "checkpoints": [],
        "wall_time_s": 1.0,
    }
    if fid is not None:
        s.update(fid=fid, kid_mean=0.01, kid_std=0.001, num_samples=100, sampling_steps=50)
    return s


def write_runs(root: Path, with_fid: bool = True, with_dense: bool = True) -> None:
    for (method, sparsity), fid in FID.items():
        if method == "dense" and not with_dense:
            continue
        for seed, off in SEED_OFFSET.items():
            run = root / f"method={method},sparsity={sparsity},seed={seed}"
            run.mkdir(parents=True)
            s = summary(method, sparsity, seed, fid + off if with_fid else None, (fid + off) / 100)
            (run / "summary.json").write_text(json.dumps(s))


def assert_real_png(path: Path) -> None:
    assert path.stat().st_size > 10_000
    with Image.open(path) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # lines, bands and text, not a blank canvas


def test_report_table_marks_csv_and_plot(tmp_path):
    write_runs(tmp_path / "runs")
    report = make_report([tmp_path / "runs"], tmp_path / "out")
    text = report.read_text()
    assert "FID ± SD" in text
    assert "| Dense | 21.00 ± 0.71 | 0,1 | 416,859 | 1.80e+13 | 7.35e+09 |" in text
    # RigL S=0.5 beats dense (bold) and is the top sparse model (underlined)
    assert "| RigL-DM, S = 0.5 | **<u>20.00 ± 0.71</u>** | 0,1 | 0.50 | 0.50 | 0.50 |" in text
    # Static S=0.5 is its method's best but does not beat dense: no marks
    assert "| Static-DM, S = 0.5 | 22.00 ± 0.71 |" in text
    assert "MagRan-DM, S = 0.9 | 29.00 ± 0.71" in text  # full grid lists every S
    plots = list((tmp_path / "out" / "plots").glob("*.png"))
    assert len(plots) == 1 and plots[0].name in text
    assert_real_png(plots[0])
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert len(rows) == 7
    top = [r for r in rows if r["top_sparse"] == "True"]
    assert [(r["method"], float(r["sparsity"])) for r in top] == [("rigl", 0.5)]


def test_fid_preferred_over_val_loss_and_fallback(tmp_path):
    write_runs(tmp_path / "fid")
    assert "FID ± SD" in make_report([tmp_path / "fid"], tmp_path / "a").read_text()
    write_runs(tmp_path / "loss", with_fid=False)
    text = make_report([tmp_path / "loss"], tmp_path / "b").read_text()
    assert "validation loss ± SD" in text and "0.2000 ± 0.0071" in text


def test_missing_dense_is_reported_and_plot_still_made(tmp_path):
    write_runs(tmp_path / "runs", with_dense=False)
    text = make_report([tmp_path / "runs"], tmp_path / "out").read_text()
    assert "Dense baseline missing" in text and "| Dense | missing |" in text
    assert "**" not in text.split("Metric:")[1].split("\n", 1)[1]  # nothing marked as beating dense
    assert_real_png(next((tmp_path / "out" / "plots").glob("*.png")))


def report_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="report", overrides=overrides)


def test_no_summaries_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no summary.json found below {tmp_path}"):
        report(report_config([f"sweep_dir={tmp_path}", f"out={tmp_path / 'out'}"]))


def test_unknown_metric_names_the_key(tmp_path):
    write_runs(tmp_path / "runs")
    cfg = report_config([f"sweep_dir={tmp_path / 'runs'}", f"out={tmp_path / 'out'}", "metric=kid"])
    allowed = r"\['fid', 'val_loss', 'val_loss_ema', 'val_loss_raw'\]"
    with pytest.raises(ValueError, match=rf"metric='kid'; allowed: one of {allowed}"):
        report(cfg)


@pytest.mark.parametrize("metric", ["fid", "val_loss"])
def test_metric_option(tmp_path, metric):
    write_runs(tmp_path / "runs")
    report(report_config([f"sweep_dir={tmp_path / 'runs'}", f"out={tmp_path / 'out'}", f"metric={metric}"]))
    assert f"Metric: {METRICS[metric]}" in (tmp_path / "out" / "report.md").read_text()


def test_cli_reads_several_sweep_folders(tmp_path):
    """The README's command line: runs of two sweep folders land in one report."""
    write_runs(tmp_path / "sparse", with_dense=False)
    dense = tmp_path / "dense" / "seed=0"
    dense.mkdir(parents=True)
    (dense / "summary.json").write_text(json.dumps(summary("dense", 0.0, 0, FID[("dense", 0.0)], 0.2)))
    out = tmp_path / "out"
    sweep_dirs = f"sweep_dir=[{tmp_path / 'sparse'},{tmp_path / 'dense'}]"
    cmd = [sys.executable, "-m", "sparse_dm.report", sweep_dirs, f"out={out}"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    text = (out / "report.md").read_text()
    assert f"from {len(FID) * len(SEED_OFFSET) - 1} runs" in text
    assert "| Dense | 21.00 ± 0.00 | 0 |" in text


# ----- Table 8 (FID by DDIM steps) and Fig. 8 (metric vs prune rate) --------------------------------
FID_BY_STEPS = {"dense": {50: 21.0, 100: 18.0, 200: 17.0}, "rigl": {50: 20.0, 100: 19.0, 200: 17.5}}
TRAINED_STEPS = 50  # the runs' model.sampling.steps: the headline FID


def test_table8_rows_are_seed_means_per_step_count(tmp_path):
    """Summaries as train writes them, FIDs merged in by sparse_dm.evaluate at 50 / 100 / 200 steps."""
    for method, by_steps in FID_BY_STEPS.items():
        sparsity = 0.0 if method == "dense" else 0.5
        for seed, off in SEED_OFFSET.items():
            run = tmp_path / "runs" / f"method={method},seed={seed}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps(summary(method, sparsity, seed, None, 0.2)))
            for steps, fid in by_steps.items():
                result = {"fid": fid + off, "kid_mean": 0.01, "kid_std": 0.001, "sampling_steps": steps}
                merge_results(run / "summary.json", result, steps, TRAINED_STEPS)
    text = make_report([tmp_path / "runs"], tmp_path / "out").read_text()
    table = text.split("## FID by DDIM sampling steps (Table 8): chirodiff / kanjivg, p = 0.5")[1]
    assert "| Approach | 50 steps | 100 steps | 200 steps |" in table
    assert "| Dense | 21.00 | 18.00 | 17.00 |" in table
    assert "| RigL-DM, S = 0.5 | **20.00** | 19.00 | 17.50 |" in table  # bold only where it beats dense
    assert "| RigL-DM, S = 0.5 | **<u>20.00 ± 0.71</u>** |" in text  # headline FID: the trained steps


def test_single_step_count_has_no_table8(tmp_path):
    write_runs(tmp_path / "runs")
    assert "Table 8" not in make_report([tmp_path / "runs"], tmp_path / "out").read_text()


FIG8_FID = {0.05: 24.0, 0.1: 22.0, 0.2: 23.0}  # RigL-DM, S = 0.25, per prune rate


def write_prune_rate_sweep(root: Path, rates: dict[float, float]) -> None:
    for p, fid in rates.items():
        for seed, off in SEED_OFFSET.items():
            s = summary("rigl", 0.25, seed, fid + off, 0.2)
            run = root / f"prune_rate={p},seed={seed}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps({**s, "prune_rate": p}))
    dense = root / "dense"
    dense.mkdir()
    (dense / "summary.json").write_text(json.dumps(summary("dense", 0.0, 0, FID[("dense", 0.0)], 0.2)))


def test_fig8_plots_the_seed_means_against_p(tmp_path, monkeypatch):
    drawn = {}
    original = plots._draw_series

    def record(ax, xs, series, label, style):
        drawn[label] = dict(zip(xs, (g.mean for g in series), strict=True))
        return original(ax, xs, series, label, style)

    monkeypatch.setattr(plots, "_draw_series", record)
    write_prune_rate_sweep(tmp_path / "runs", FIG8_FID)
    text = make_report([tmp_path / "runs"], tmp_path / "out").read_text()
    fig8 = text.split("## Prune and regrowth rate (Appendix H, Fig. 8)")[1]
    link = fig8.split("](", 1)[1].split(")", 1)[0]
    assert link.endswith("_vs_p_fid.png")
    assert_real_png(tmp_path / "out" / link)
    assert drawn["RigL-DM"] == pytest.approx(FIG8_FID)  # the last plot drawn is Fig. 8: one point per p
    for p, fid in FIG8_FID.items():  # and each p has its own Table 1/2 section with the same mean
        assert f"| RigL-DM, S = 0.25 | <u>{fid:.2f} ± 0.71</u> |" in text.split(f"p = {p:g}")[1]


def test_two_prune_rates_are_not_a_fig8(tmp_path):
    write_prune_rate_sweep(tmp_path / "runs", dict(list(FIG8_FID.items())[:2]))
    assert "Fig. 8" not in make_report([tmp_path / "runs"], tmp_path / "out").read_text()
