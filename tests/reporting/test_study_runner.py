"""The study runner: finished runs are skipped, records are committed as runs finish, a refused spec
runs nothing, failures are reported with their log; and one real tiny run through `sparse_dm.train`."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparse_dm.reporting.protocol import ProtocolError, load_spec
from sparse_dm.reporting.protocol_report import make_protocol_report
from sparse_dm.reporting.study_runner import (
    RECORD_FILES,
    Job,
    plan,
    record_dir,
    run_job,
    run_studies,
    train_command,
)
from tests.reporting.test_protocol import spec_dict

# Stands in for the Python interpreter: `fake -m sparse_dm.train ... seed=N trainer.max_steps=T
# hydra.run.dir=D` writes a run record into D and appends its seed to calls.log; an arm with
# prune_rate=0.3 fails.
FAKE_TRAIN = """#!{python}
import json, sys
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
run = Path(args["hydra.run.dir"])
with open({calls!r}, "a") as f:
    f.write(run.parent.name + "/" + run.name + "\\n")
if args.get("prune_rate") == "0.3":
    sys.exit(3)
(run / "csv").mkdir(parents=True, exist_ok=True)
(run / "csv" / "metrics.csv").write_text("step,val/loss_raw\\n6,1.0\\n")
(run / "config.yaml").write_text("seed: " + args["seed"] + "\\n")
summary = {{"seed": int(args["seed"]), "train_steps": int(args["trainer.max_steps"]), "metrics": {{}}}}
(run / "summary.json").write_text(json.dumps(summary))
"""


def fake_python(tmp_path: Path) -> tuple[str, Path]:
    calls = tmp_path / "calls.log"
    script = tmp_path / "fake_python"
    script.write_text(FAKE_TRAIN.format(python=sys.executable, calls=str(calls)))
    script.chmod(0o755)
    return str(script), calls


def spec_at(tmp_path: Path, **changes):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(tmp_path, **changes), sort_keys=False))
    return load_spec(path)


def calls_of(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def test_runs_what_is_missing_commits_records_and_skips_them_next_time(tmp_path):
    spec = spec_at(tmp_path)
    python, calls = fake_python(tmp_path)
    outcomes = run_studies([spec], python=python)
    assert sorted((o.job.arm, o.job.seed, o.status) for o in outcomes) == [
        ("rigl", 0, "ran"),
        ("rigl", 1, "ran"),
        ("static", 0, "ran"),
        ("static", 1, "ran"),
    ]
    for arm, seed in spec.jobs():
        record = record_dir(spec, arm, seed)
        assert record == spec.out / "runs" / arm / f"seed_{seed}"
        assert all((record / name).is_file() for name in RECORD_FILES)
    assert len(calls_of(calls)) == 4
    again = run_studies([spec], python=python)
    assert {o.status for o in again} == {"committed"} and len(calls_of(calls)) == 4  # nothing ran


def test_a_finished_run_folder_is_committed_without_running(tmp_path):
    spec = spec_at(tmp_path)
    python, calls = fake_python(tmp_path)
    run_studies([spec], python=python)
    record = record_dir(spec, "rigl", 1)
    for name in RECORD_FILES:
        (record / name).unlink()
    outcomes = {(o.job.arm, o.job.seed): o.status for o in run_studies([spec], python=python)}
    assert outcomes[("rigl", 1)] == "copied" and (record / "summary.json").is_file()
    assert len(calls_of(calls)) == 4


def test_parts_run_only_their_arms(tmp_path):
    spec = spec_at(tmp_path, parts={"p1": ["static"], "p2": ["rigl"]})
    python, calls = fake_python(tmp_path)
    outcomes = run_studies([spec], parts=["p2"], python=python)
    assert sorted(o.job.name for o in outcomes) == ["tiny/rigl/seed_0", "tiny/rigl/seed_1"]
    assert sorted(calls_of(calls)) == ["rigl/seed_0", "rigl/seed_1"]
    planned = run_studies([spec], dry_run=True, python=python)
    assert sorted(o.status for o in planned) == ["committed", "committed", "planned", "planned"]
    assert len(calls_of(calls)) == 2


def test_a_refused_spec_runs_nothing(tmp_path):
    good = spec_at(tmp_path)
    bad = spec_at(tmp_path / "bad", recovery_window=3)  # RigL's update at step 4 falls within W
    python, calls = fake_python(tmp_path)
    with pytest.raises(ProtocolError, match="refused before any run"):
        run_studies([good, bad], python=python)
    assert calls_of(calls) == [] and not good.out.exists()


def test_failures_are_reported_with_their_log_and_the_rest_still_run(tmp_path):
    arms = {
        **spec_dict(tmp_path)["arms"],
        "rigl": {"label": "R", "overrides": ["debug=tiny", "method=rigl", "sparsity=0.5", "prune_rate=0.3"]},
    }
    spec = spec_at(tmp_path, arms=arms)
    python, _ = fake_python(tmp_path)
    outcomes = {(o.job.arm, o.job.seed): o for o in run_studies([spec], python=python)}
    failed = outcomes[("rigl", 0)]
    assert failed.status == "failed" and failed.detail.startswith("exit status 3; see ")
    assert "-m sparse_dm.train" in Path(failed.detail.split("see ")[1]).read_text()  # the command is logged
    assert outcomes[("static", 0)].status == "ran" and not record_dir(spec, "rigl", 0).exists()


def test_a_run_folder_holding_another_run_is_not_committed(tmp_path):
    spec = spec_at(tmp_path)
    python, _ = fake_python(tmp_path)
    job = Job(spec, "static", 0, train_command(spec, "static", 0, 1, python))
    job.run_dir.mkdir(parents=True)
    (job.run_dir / "summary.json").write_text(json.dumps({"seed": 5, "train_steps": 6}))
    with pytest.raises(RuntimeError, match=r"holds a different run: \{'seed': 5, 'train_steps': 6\}"):
        run_studies([spec], python=python)


def test_one_real_tiny_run_through_the_training_command(tmp_path):
    """The runner's command line is one `sparse_dm.train` accepts (resume=auto into a fresh folder),
    and the committed record carries what the report reads."""
    spec = spec_at(tmp_path)
    job = Job(spec, "rigl", 0, train_command(spec, "rigl", 0, 1, sys.executable))
    outcome = run_job(job)
    assert outcome.status == "ran", (job.run_dir / "train_stdout.log").read_text()[-3000:]
    summary = json.loads((job.record_dir / "summary.json").read_text())
    assert (summary["seed"], summary["train_steps"], summary["method"]) == (0, 6, "rigl")
    assert "val/loss_raw" in summary["metrics"]
    assert "val/loss_raw" in (job.record_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert yaml.safe_load((job.record_dir / "config.yaml").read_text())["update_interval"] == 2
    # the report reads the record, and finds its config equal to what the spec composes today
    make_protocol_report(spec)
    arms = {r["name"]: r for r in csv.DictReader((spec.out / "arms.csv").open())}
    assert arms["rigl"]["runs"] == "1 of 2" and arms["rigl"]["config drift"] == ""


def test_cli_lists_planned_runs_and_refuses_a_violating_spec_with_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    good = spec_at(tmp_path / "good")
    cmd = [sys.executable, "-m", "sparse_dm.study", f"specs={good.path}", "dry_run=true"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(" planned ") + done.stderr.count(" planned ") == 4
    bad = spec_at(tmp_path / "bad", recovery_window=3)
    cmd = [sys.executable, "-m", "sparse_dm.study", f"specs={bad.path}"]
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert refused.returncode == 2
    assert "refused before any run" in refused.stdout + refused.stderr and not bad.runs_dir.exists()


def test_backend_sparse_runs_the_arms_it_can_train_compact_and_the_others_dense(tmp_path):
    arms = {
        "dense": {"label": "Dense", "overrides": ["debug=tiny", "method=dense"]},
        "rigl": {"label": "RigL", "overrides": ["debug=tiny", "method=rigl", "sparsity=0.5"]},
        "bands": {
            "label": "bands",
            "overrides": [
                "debug=tiny", "method=rigl", "sparsity=0.5",
                "method.timestep_bands={boundaries:[500],sparsities:[0.4,0.6]}",
            ],
        },
    }  # fmt: skip
    spec = spec_at(tmp_path, arms=arms, contrasts=[{"a": "rigl", "b": "dense", "metric": "val_loss_raw"}])
    chosen = {job.arm: job.command for job in plan(spec, None, 1, sys.executable, "sparse")}
    assert "backend=sparse" in chosen["rigl"]
    assert "backend=dense" in chosen["dense"] and "backend=dense" in chosen["bands"]
    assert all("backend=dense" in job.command for job in plan(spec, None, 1, sys.executable))
    with pytest.raises(ValueError, match="backend='gpu'; allowed: dense or sparse"):
        plan(spec, None, 1, sys.executable, "gpu")


def test_a_compact_run_has_no_config_drift_against_the_spec(tmp_path):
    """backend is how a run executes: a record trained with backend=sparse is the arm as declared."""
    spec = spec_at(tmp_path)
    job = Job(spec, "rigl", 0, train_command(spec, "rigl", 0, 1, sys.executable, "sparse"))
    outcome = run_job(job)
    assert outcome.status == "ran", (job.run_dir / "train_stdout.log").read_text()[-3000:]
    assert json.loads((job.record_dir / "summary.json").read_text())["backend"] == "sparse"
    make_protocol_report(spec)
    arms = {r["name"]: r for r in csv.DictReader((spec.out / "arms.csv").open())}
    assert arms["rigl"]["config drift"] == ""
