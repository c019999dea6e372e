"""The protocol report from committed records: paired contrasts and Holm over the declared family,
verdicts computed, and every reason a contrast is not tested stated (absent metric, violated recovery
window, missing seeds); per-arm-CSV studies; the selection rule, the figure, the CLI; and the committed
docs equal to what the generator writes from the committed specs (no verdict typed by hand); the interval
figure of every report."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from matplotlib.colors import to_rgb
from omegaconf import OmegaConf
from PIL import Image

from sparse_dm.reporting.contrasts import holm, paired_estimate, welch_from_stats
from sparse_dm.reporting.protocol import ProtocolError, compose_arm, load_spec
from sparse_dm.reporting.protocol_plots import DETECTED_COLOR
from sparse_dm.reporting.protocol_report import make_protocol_report, write_results
from sparse_dm.reporting.seed_stats import SeedStats
from tests.reporting.test_protocol import TINY_RIGL, TINY_STATIC, spec_dict
from tests.reporting.test_report import assert_real_png

ROOT = Path(__file__).resolve().parents[2]
RESULTS_COMMAND = "python -m sparse_dm.report --config-name study_results"
# final raw val loss per arm and seed; rigl sits below static on every seed (paired differences
# -0.05, -0.04, -0.04: t = -13 on 2 df), magran above it on two seeds and below on one
RAW = {
    "static": {0: 1.00, 1: 1.02, 2: 0.98},
    "rigl": {0: 0.95, 1: 0.98, 2: 0.94},
    "magran": {0: 1.01, 1: 1.00, 2: 1.00},
}
EMA_OFFSET = 0.01


def protocol_spec(tmp_path: Path, **changes):
    arms = {
        "static": {"label": "Static", "overrides": TINY_STATIC},
        "rigl": {"label": "RigL", "overrides": [*TINY_RIGL, "method.end_step=4"]},
        "magran": {
            "label": "MagRan",
            "overrides": [
                "debug=tiny",
                "method=magran",
                "sparsity=0.5",
                "method.end_fraction=null",
                "method.end_step=4",
            ],
        },
    }
    contrasts = [
        {"a": "rigl", "b": "static", "metric": "val_loss_raw"},
        {"a": "magran", "b": "static", "metric": "val_loss_raw"},
    ]
    fields = {"seeds": [0, 1, 2], "arms": arms, "contrasts": contrasts, **changes}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(tmp_path, **fields), sort_keys=False))
    return load_spec(path)


def commit_records(spec, values=RAW, metrics_extra=None, config_edit=None) -> None:
    """What the runner commits: summary.json, the run's resolved config.yaml, its CSV curve."""
    for arm, by_seed in values.items():
        for seed, raw in by_seed.items():
            folder = spec.out / "runs" / arm / f"seed_{seed}"
            (folder / "csv").mkdir(parents=True)
            cfg = compose_arm(spec, arm, seed, spec.runs_dir / arm / f"seed_{seed}")
            if config_edit is not None:
                config_edit(arm, cfg)
            (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            with (folder / "csv" / "metrics.csv").open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["step", "val/loss_raw", "val/loss_ema"])
                for step in (0, 3, 6):
                    writer.writerow([step, raw + (6 - step) / 6, raw + EMA_OFFSET])
            metrics = {"val/loss_raw": raw, "val/loss_ema": raw + EMA_OFFSET, **(metrics_extra or {})}
            summary = {
                "seed": seed,
                "train_steps": spec.budget_steps,
                "metrics": metrics,
                "mask_updates": 0 if arm == "static" else 1,
                "exploration_rate": 0.5,
                "params_active": 100,
            }
            (folder / "summary.json").write_text(json.dumps(summary))


def contrast_csv(spec) -> list[dict[str, str]]:
    return list(csv.DictReader((spec.out / "contrasts.csv").open()))


def table_row(text: str, index: int) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {index} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_paired_contrasts_and_holm_from_committed_records(tmp_path):
    spec = protocol_spec(tmp_path)
    commit_records(spec)
    report = make_protocol_report(spec)
    rigl = paired_estimate(RAW["rigl"], RAW["static"], 0.95)
    magran = paired_estimate(RAW["magran"], RAW["static"], 0.95)
    adjusted = holm([rigl.p, magran.p])
    rows = contrast_csv(spec)
    assert [r["test"] for r in rows] == ["paired t", "paired t"] and rows[0]["n_pairs"] == "3"
    assert float(rows[0]["difference"]) == pytest.approx(rigl.difference, rel=1e-12)
    assert (float(rows[0]["ci_low"]), float(rows[0]["ci_high"])) == pytest.approx(
        (rigl.low, rigl.high), rel=1e-12
    )
    assert [float(r["p_holm"]) for r in rows] == pytest.approx(adjusted, rel=1e-12)
    assert rigl.high < 0 and adjusted[0] < 0.05  # the constructed data: RigL below Static on every seed
    assert [r["verdict"] for r in rows] == ["RigL < Static", "no difference detected"]
    text = report.path.read_text()
    cells = table_row(text, 1)
    assert cells[1:7] == [
        "RigL − Static (val_loss_raw)",
        "final",
        "paired t",
        "3 pairs",
        f"{rigl.difference:+.4f}",
        f"[{rigl.low:+.4f}, {rigl.high:+.4f}]",
    ]
    assert cells[-1] == "**RigL < Static**"
    assert "Holm-adjusted p over this study's 2 declared contrasts is below 0.05" in text
    arms = {r["name"]: r for r in csv.DictReader((spec.out / "arms.csv").open())}
    assert arms["rigl"]["runs"] == "3 of 3" and arms["rigl"]["last update → evaluation"] == "2 → 6: 4 steps"
    assert arms["static"]["last update → evaluation"] == "none before 6"
    assert arms["rigl"]["params_stored"] == "not in summary.json" and arms["rigl"]["config drift"] == ""


def test_contrasts_at_an_earlier_evaluation_read_the_curve(tmp_path):
    spec = protocol_spec(
        tmp_path,
        contrasts=[{"a": "rigl", "b": "static", "metric": "val_loss_raw", "step": 3}],
        recovery_window=1,
    )
    commit_records(spec)
    make_protocol_report(spec)
    (row,) = contrast_csv(spec)
    # the synthetic curve at step 3 is raw + 0.5 on both arms: the difference is the final one's
    assert float(row["difference"]) == pytest.approx(
        paired_estimate(RAW["rigl"], RAW["static"], 0.95).difference
    )
    assert row["step"] == "3"


def test_untestable_contrasts_say_why_and_stay_in_the_family(tmp_path):
    contrasts = [
        {"a": "rigl", "b": "static", "metric": "val_loss_raw"},
        {"a": "rigl", "b": "static", "metric": "val/loss_raw_band0"},
    ]
    spec = protocol_spec(tmp_path, contrasts=contrasts)
    commit_records(spec)
    make_protocol_report(spec)
    tested, absent = contrast_csv(spec)
    assert absent["verdict"] == (
        "not tested (val/loss_raw_band0 absent from 3 of 3 runs of rigl; "
        "val/loss_raw_band0 absent from 3 of 3 runs of static)"
    )
    # m = 2 although only one contrast has data
    assert float(tested["p_holm"]) == pytest.approx(2 * paired_estimate(RAW["rigl"], RAW["static"], 0.95).p)


def test_a_record_that_violates_the_recovery_window_is_not_tested(tmp_path):
    spec = protocol_spec(tmp_path, recovery_window=2)

    def updates_until_the_end(arm, cfg):
        if arm == "rigl":
            cfg.method.end_step = None  # as if the run had updated at step 4, 2 steps before the evaluation

    commit_records(spec, config_edit=updates_until_the_end)
    spec = dataclasses.replace(spec, recovery_window=3)
    make_protocol_report(spec)
    rigl, magran = contrast_csv(spec)
    assert rigl["verdict"].startswith(
        "not tested (recovery window violated: arm rigl: mask update(s) at step(s) [4] fall within the "
        "recovery "
        "window W = 3 before the evaluation at step 6"
    )
    assert magran["test"] == "paired t"
    arms = {r["name"]: r for r in csv.DictReader((spec.out / "arms.csv").open())}
    assert arms["rigl"]["config drift"] == "method.end_step"  # the record differs from the spec today


def test_missing_seeds_are_paired_over_what_is_shared(tmp_path):
    spec = protocol_spec(tmp_path)
    commit_records(spec, values={**RAW, "rigl": {0: 0.95, 2: 0.94}})
    make_protocol_report(spec)
    rigl = contrast_csv(spec)[0]
    assert rigl["n_pairs"] == "2" and "rigl: 2 of 3 seeds committed" in rigl["notes"]
    expected = paired_estimate({0: 0.95, 2: 0.94}, RAW["static"], 0.95)
    assert float(rigl["difference"]) == pytest.approx(expected.difference)
    assert "Runs committed: 8 of 9 planned." in (spec.out / "contrasts.md").read_text()


def test_folders_that_are_not_runs_of_the_spec_are_refused(tmp_path):
    spec = protocol_spec(tmp_path)
    commit_records(spec, values={"static": RAW["static"]})
    ghost = spec.out / "runs" / "ghost" / "seed_0"
    shutil.copytree(spec.out / "runs" / "static" / "seed_0", ghost)
    with pytest.raises(ProtocolError, match=r"ghost/seed_0 is not a run of study tiny"):
        make_protocol_report(spec)
    shutil.rmtree(ghost.parent)
    summary = spec.out / "runs" / "static" / "seed_1" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "train_steps": 5}))
    with pytest.raises(ProtocolError, match=r"seed_1: summary says seed 1, 5 steps; the spec declares"):
        make_protocol_report(spec)


def test_per_arm_csv_studies_get_welch_from_the_committed_statistics(tmp_path):
    table = tmp_path / "report.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["arm", "n", "val_loss_raw_mean", "val_loss_raw_sd", "mask_updates_mean", "exploration_rate_mean"]
        )
        writer.writerow(["Static-DM, S = 0.5", 3, 0.25, 0.004, 0, 0.5])
        writer.writerow(["RigL-DM, S = 0.5", 3, 0.28, 0.002, 2, 0.9])
    arms = {
        "static": {"label": "Static", "overrides": TINY_STATIC, "csv_arm": "Static-DM, S = 0.5"},
        "rigl": {"label": "RigL", "overrides": TINY_RIGL, "csv_arm": "RigL-DM, S = 0.5"},
    }
    contrasts = [{"a": "rigl", "b": "static", "metric": "val_loss_raw", "claim": "RigL worse"}]
    spec = protocol_spec(
        tmp_path, arms=arms, contrasts=contrasts, recovery_window=0, source={"arms_csv": str(table)}
    )
    report = make_protocol_report(spec)
    (row,) = contrast_csv(spec)
    expected = welch_from_stats(SeedStats(3, 0.28, 0.002), SeedStats(3, 0.25, 0.004), 0.95)
    assert row["test"] == "Welch t" and float(row["df"]) == pytest.approx(expected.df, rel=1e-12)
    assert float(row["p_holm"]) == pytest.approx(expected.p, rel=1e-12) and row["verdict"] == "RigL > Static"
    text = report.path.read_text()
    assert table_row(text, 1)[-1] == "RigL worse" and "Welch from per-arm mean, SD, n" in text
    arms_rows = {r["name"]: r for r in csv.DictReader((spec.out / "arms.csv").open())}
    assert arms_rows["rigl"]["last update → evaluation"] == "4 → 6: 2 steps"  # composed: updates 2, 4


def test_selection_and_figure(tmp_path):
    contrasts = [
        {"a": "rigl", "b": "static", "metric": "val_loss_raw", "factors": {"te": 16, "method": "rigl"}},
        {"a": "magran", "b": "static", "metric": "val_loss_raw", "factors": {"te": 64, "method": "magran"}},
    ]
    figures = [{"name": "diff", "title": "A − B against Te", "x": "te", "series": ["method"]}]
    spec = protocol_spec(
        tmp_path, contrasts=contrasts, figures=figures, selection={"factor": "te", "feeds": "stage 2"}
    )
    commit_records(spec)
    text = make_protocol_report(spec).path.read_text()
    assert "Result: **te = 16** (mean differences 16: -0.0433, 64: +0.0033)." in text
    assert "![A − B against Te](plots/diff.png)" in text
    assert_real_png(spec.out / "plots" / "diff.png")


def detected_pixels(path: Path) -> int:
    red = tuple(round(255 * c) for c in to_rgb(DETECTED_COLOR))
    with Image.open(path) as im:
        return sum(n for n, colour in im.convert("RGB").getcolors(maxcolors=1 << 20) if colour == red)


def test_every_report_draws_its_tested_contrasts_marking_what_holm_detects(tmp_path):
    spec = protocol_spec(tmp_path)
    commit_records(spec)  # RigL < Static detected, MagRan − Static not
    text = make_protocol_report(spec).path.read_text()
    figure = spec.out / "plots" / "contrasts.png"
    assert "![Every tested contrast with its interval](plots/contrasts.png)" in text
    assert_real_png(figure)
    assert detected_pixels(figure) > 50
    flat = {arm: {s: 1.0 + 0.01 * (s % 2) for s in (0, 1, 2)} for arm in ("static", "rigl", "magran")}
    flat["rigl"] = {0: 1.03, 1: 0.99, 2: 0.98}  # RigL − Static: +0.03, -0.02, -0.02: nothing detected
    (tmp_path / "again").mkdir()
    again = protocol_spec(tmp_path / "again")
    commit_records(again, values=flat)
    make_protocol_report(again)
    assert detected_pixels(again.out / "plots" / "contrasts.png") == 0


def test_no_figure_without_an_interval_and_its_name_is_reserved(tmp_path):
    spec = protocol_spec(tmp_path)
    commit_records(spec, values={"static": RAW["static"]})
    text = make_protocol_report(spec).path.read_text()
    assert "plots/contrasts.png" not in text and not (spec.out / "plots" / "contrasts.png").exists()
    contrasts = [{"a": "rigl", "b": "static", "metric": "val_loss_raw", "factors": {"te": 16}}]
    figures = [{"name": "contrasts", "title": "t", "x": "te", "series": []}]
    (tmp_path / "reserved").mkdir()
    with pytest.raises(ProtocolError, match=r"figures\[0\].name='contrasts' is the report's interval figure"):
        protocol_spec(tmp_path / "reserved", contrasts=contrasts, figures=figures)


def test_selection_waits_for_every_contrast(tmp_path):
    contrasts = [
        {"a": "rigl", "b": "static", "metric": "val_loss_raw", "factors": {"te": 16}},
        {"a": "magran", "b": "static", "metric": "val_loss_raw", "factors": {"te": 64}},
    ]
    spec = protocol_spec(tmp_path, contrasts=contrasts, selection={"factor": "te", "feeds": "x"})
    commit_records(spec, values={"static": RAW["static"], "rigl": RAW["rigl"]})
    assert "Result: not yet: contrasts [2] have no estimate." in make_protocol_report(spec).path.read_text()


def test_cli_writes_each_report_and_the_results_page(tmp_path):
    spec = protocol_spec(tmp_path)
    commit_records(spec)
    results = tmp_path / "docs" / "results.md"
    cmd = [
        sys.executable,
        "-m",
        "sparse_dm.report",
        "--config-name",
        "study_results",
        f"specs=[{spec.path}]",
        f"results={results}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path, env=env)
    text = results.read_text()
    assert "## tiny study" in text and "[Full report](tiny/contrasts.md)" in text
    assert "**RigL < Static**" in text
    assert (
        f"python -m sparse_dm.report --config-name study_results 'specs=[{spec.path}]' results={results}"
        in text
    )


def test_committed_reports_are_what_the_generator_writes(tmp_path):
    """docs/results.md and every study's contrasts.md equal a fresh rendering of the committed specs and
    records: a verdict edited by hand, or code changed without regenerating, fails here."""
    cfg = OmegaConf.load(ROOT / "sparse_dm" / "conf" / "study_results.yaml")
    os.chdir(ROOT)  # spec paths are relative to the repository root, as the command runs
    reports = []
    for path in cfg.specs:
        spec = load_spec(Path(path))
        copy = tmp_path / spec.out
        if (spec.out / "runs").is_dir():
            shutil.copytree(spec.out / "runs", copy / "runs")
        reports.append(make_protocol_report(dataclasses.replace(spec, out=copy)))
        assert (copy / "contrasts.md").read_text() == (spec.out / "contrasts.md").read_text(), spec.out
    written = write_results(reports, tmp_path / cfg.results, RESULTS_COMMAND)
    assert written.read_text() == (ROOT / cfg.results).read_text()
