"""Study specs: what a spec must declare, the refusals that name the key, the arm schedule read with
the method's own UpdateSchedule, and the recovery window W refused before anything runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from sparse_dm.reporting.protocol import (
    ProtocolError,
    arm_schedule,
    check_protocol,
    compose_arm,
    load_spec,
    recovery_violations,
)
from sparse_dm.reporting.protocol_contrasts import contrast_rows, selection_result
from sparse_dm.reporting.protocol_records import load_committed

SPECS = Path(__file__).resolve().parents[2] / "multirun_sweeps" / "study_specs"
# debug=tiny: 6 steps, validation every 3, Te = 2 (conf/debug/tiny.yaml); with updates until the end
# (end_fraction null) RigL updates at 2 and 4
TINY_RIGL = ["debug=tiny", "method=rigl", "sparsity=0.5", "method.end_fraction=null"]
TINY_STATIC = ["debug=tiny", "method=static", "sparsity=0.5"]


def spec_dict(tmp_path: Path, **changes) -> dict:
    spec = {
        "name": "tiny",
        "title": "tiny study",
        "seeds": [0, 1],
        "budget_steps": 6,
        "recovery_window": 2,
        "out": str(tmp_path / "docs" / "tiny"),
        "runs_dir": str(tmp_path / "runs" / "tiny"),
        "arms": {
            "static": {"label": "Static", "overrides": TINY_STATIC},
            "rigl": {"label": "RigL", "overrides": TINY_RIGL},
        },
        "contrasts": [{"a": "rigl", "b": "static", "metric": "val_loss_raw"}],
    }
    spec.update(changes)
    return spec


def write_spec(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(tmp_path, **changes), sort_keys=False))
    return path


def tiny_schedule(tmp_path: Path, overrides: list[str]):
    spec = load_spec(
        write_spec(
            tmp_path,
            arms={"x": {"label": "x", "overrides": overrides}},
            contrasts=[{"a": "x", "b": "x", "metric": "val_loss_raw", "metric_b": "val_loss_ema"}],
        )
    )
    return arm_schedule(compose_arm(spec, "x", 0, tmp_path / "run"))


# ----- the schedule ------------------------------------------------------------------------------------
def test_arm_schedule_uses_the_methods_update_rule(tmp_path):
    rigl = tiny_schedule(tmp_path, TINY_RIGL)
    assert rigl.updates == (2, 4)  # never on the final step 6
    assert rigl.evaluations == (0, 3, 6)  # validate_before_fit, every val_check_interval, the last step
    assert tiny_schedule(tmp_path, [*TINY_RIGL, "method.end_step=4"]).updates == (2,)
    assert tiny_schedule(tmp_path, [*TINY_RIGL, "method.end_fraction=0.5"]).updates == (2,)  # floor(3)
    assert tiny_schedule(tmp_path, TINY_STATIC).updates == ()  # static never grows
    assert tiny_schedule(tmp_path, ["debug=tiny", "method=dense"]).updates == ()


def test_recovery_violations_name_the_steps(tmp_path):
    rigl = tiny_schedule(tmp_path, TINY_RIGL)
    assert recovery_violations("rigl", rigl, [6], 2) == []  # update at 4 is 2 steps before 6: allowed
    (problem,) = recovery_violations("rigl", rigl, [6], 3)
    assert problem == (
        "arm rigl: mask update(s) at step(s) [4] fall within the recovery window W = 3 before the evaluation "
        "at step 6 (no update allowed in steps 4-6); stop updates earlier, e.g. method.end_step=4 "
        "(last update <= 3)"
    )
    (at_3,) = recovery_violations("rigl", rigl, [3], 2)
    assert "step(s) [2]" in at_3 and "evaluation at step 3" in at_3
    (not_evaluated,) = recovery_violations("rigl", rigl, [5], 0)
    assert "reads step 5, which is not evaluated (validations at [0, 3, 6])" in not_evaluated


def test_a_study_violating_the_recovery_window_is_refused_before_any_run(tmp_path):
    spec = load_spec(write_spec(tmp_path, recovery_window=3))
    with pytest.raises(
        ProtocolError, match=r"refused before any run:\n  arm rigl: mask update\(s\) at step\(s\) \[4\]"
    ):
        check_protocol(spec, tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    fixed = {"label": "RigL", "overrides": [*TINY_RIGL, "method.end_step=4"]}
    ok = load_spec(
        write_spec(tmp_path, recovery_window=3, arms={**spec_dict(tmp_path)["arms"], "rigl": fixed})
    )
    schedules = check_protocol(ok, tmp_path / "runs")
    assert schedules["rigl"].updates == (2,) and schedules["static"].updates == ()


def test_only_the_evaluations_a_contrast_reads_are_checked(tmp_path):
    """A contrast at step 3 reads the evaluation right after the update at 2: refused at W = 2."""
    contrasts = [{"a": "rigl", "b": "static", "metric": "val_loss_raw", "step": 3}]
    spec = load_spec(write_spec(tmp_path, recovery_window=2, contrasts=contrasts))
    with pytest.raises(
        ProtocolError, match=r"step\(s\) \[2\] fall within .* before the evaluation at step 3"
    ):
        check_protocol(spec, tmp_path / "runs")


def test_invalid_arm_configs_are_refused_with_the_trainers_message(tmp_path):
    arms = {
        **spec_dict(tmp_path)["arms"],
        "rigl": {"label": "RigL", "overrides": [*TINY_RIGL, "prune_rate=2"]},
    }
    with pytest.raises(
        ProtocolError, match=r"arm rigl: invalid config: prune_rate=2; allowed: a number in \(0, 1\]"
    ):
        check_protocol(load_spec(write_spec(tmp_path, arms=arms)), tmp_path / "runs")


def test_fractional_validation_interval_is_refused(tmp_path):
    arms = {
        "rigl": {"label": "RigL", "overrides": [*TINY_RIGL, "trainer.accumulate_grad_batches=2"]},
        "static": {"label": "Static", "overrides": TINY_STATIC},
    }
    with pytest.raises(ProtocolError, match=r"trainer.accumulate_grad_batches=2; allowed: 1"):
        check_protocol(load_spec(write_spec(tmp_path, arms=arms)), tmp_path / "runs")


# ----- what a spec must say ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seeds": [0]}, r"seeds=\[0\]; allowed: at least 2"),
        ({"seeds": [0, 0]}, r"allowed: a list of distinct integers >= 0"),
        ({"budget_steps": 0}, r"budget_steps=0; allowed: an integer >= 1"),
        ({"recovery_window": 6}, r"recovery_window=6; allowed: an integer in \[0, budget_steps\)"),
        ({"confidence": 95}, r"confidence=95; allowed: a number in \(0, 1\)"),
        ({"colour": "red"}, r"unknown keys \['colour'\]"),
        (
            {"contrasts": [{"a": "rigl", "b": "dense", "metric": "val_loss_raw"}]},
            r"contrasts\[0\].b='dense'; allowed: one of the arms \['static', 'rigl'\]",
        ),
        (
            {"contrasts": [{"a": "rigl", "b": "rigl", "metric": "val_loss_raw"}]},
            r"compares arm rigl with itself",
        ),
        (
            {"contrasts": [{"a": "rigl", "b": "static", "metric": "val_loss_raw", "step": 7}]},
            r"contrasts\[0\].step=7; allowed: null \(final\) or an integer in \[1, 6\]",
        ),
        (
            {"arms": {"rigl": {"label": "R", "overrides": ["seed=3"]}}},
            r"arms.rigl.overrides sets seed, which the protocol sets for every run",
        ),
        ({"arms": {"rigl": {"label": "R", "overrides": ["trainer.max_steps=9"]}}}, r"sets trainer.max_steps"),
        ({"arms": {"rigl": {"label": "R", "overrides": ["hydra.run.dir=x"]}}}, r"sets hydra.run.dir"),
        ({"arms": {"Bad Name": {"label": "R"}}}, r"arm name 'Bad Name'; allowed: lowercase"),
        ({"parts": {"p1": ["rigl"]}}, r"arms \['static'\] are in no part"),
        ({"parts": {"p1": ["rigl", "static"], "p2": ["rigl"]}}, r"arm rigl is in parts p1 and p2"),
        (
            {"figures": [{"name": "f", "title": "t", "x": "te", "series": ["p"]}]},
            r"no contrast has factors \['te', 'p'\]",
        ),
        (
            {"selection": {"factor": "te", "feeds": "x"}},
            r"selection.factor='te': no contrast declares that factor",
        ),
        ({"source": {"arms_csv": "x.csv"}}, r"every arm needs csv_arm"),
    ],
)
def test_bad_specs_name_the_key(tmp_path, changes, message):
    with pytest.raises(ProtocolError, match=message):
        load_spec(write_spec(tmp_path, **changes))


def test_missing_inputs_block_composition_and_name_the_input(tmp_path):
    arms = {
        "static": {"label": "S", "overrides": TINY_STATIC},
        "rigl": {"label": "R", "overrides": [*TINY_RIGL, "update_interval=${inputs.te}"]},
    }
    path = write_spec(tmp_path, arms=arms, inputs={"te": "???"})
    spec = load_spec(path)
    assert spec.missing_inputs() == ["inputs.te"]
    with pytest.raises(ProtocolError, match=r"arm rigl needs inputs.te, still \?\?\? \(missing\)"):
        check_protocol(spec, tmp_path / "runs")
    raw = OmegaConf.load(path)
    raw.inputs.te = 3
    OmegaConf.save(raw, path)
    assert check_protocol(load_spec(path), tmp_path / "runs")["rigl"].updates == (3,)


def test_jobs_cover_every_part_and_refuse_unknown_ones(tmp_path):
    spec = load_spec(write_spec(tmp_path, parts={"p1": ["static"], "p2": ["rigl"]}))
    assert spec.jobs() == [("static", 0), ("static", 1), ("rigl", 0), ("rigl", 1)]
    assert spec.jobs(["p2"]) == [("rigl", 0), ("rigl", 1)]
    with pytest.raises(ProtocolError, match=r"part\(s\) \['p3'\] not declared; allowed: \['p1', 'p2'\]"):
        spec.jobs(["p3"])


# ----- the committed specs -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dst_schedule_s50", "bands_fair"])
def test_the_declared_cpu_studies_pass_their_protocol(name, tmp_path):
    """The studies the lead will run: >= 3 paired seeds, >= 1,500 steps, and every arm's updates stop
    W steps before the final evaluation."""
    spec = load_spec(SPECS / f"{name}.yaml")
    assert len(spec.seeds) >= 3 and spec.budget_steps >= 1500
    schedules = check_protocol(spec, tmp_path)
    for arm, s in schedules.items():
        last = s.last_update_before(spec.budget_steps)
        assert last is None or spec.budget_steps - last >= spec.recovery_window, arm


def test_stage_two_waits_for_stage_ones_selection(tmp_path):
    """Unset, stage two names its missing input; set, it is the Te stage one's committed runs select."""
    text = (SPECS / "dst_schedule_s90.yaml").read_text()
    unset = tmp_path / "dst_schedule_s90.yaml"
    unset.write_text(re.sub(r"(?m)^(  te_best:) \S+", r"\1 ???", text))
    assert load_spec(unset).missing_inputs() == ["inputs.te_best"]
    spec = load_spec(SPECS / "dst_schedule_s90.yaml")
    assert spec.missing_inputs() == []
    stage_one = load_spec(SPECS / "dst_schedule_s50.yaml")
    selected = selection_result(stage_one, contrast_rows(stage_one, load_committed(stage_one)))
    assert not isinstance(selected, str), selected
    assert spec.raw["inputs"]["te_best"] == selected[0]
    assert stage_one.selection is not None and "dst_schedule_s90.yaml" in stage_one.selection.feeds
    te = sorted({c.factors["te"] for c in stage_one.contrasts if "te" in c.factors})
    assert te[0] <= 16 and 50 <= te[1] <= 80 and te[-1] >= 150


@pytest.mark.parametrize("name", ["dst_schedule_s50", "bands_fair"])
def test_every_arm_logs_the_band_losses_and_scores_its_samples(name, tmp_path):
    """Per-band losses in every arm (the one-mask controls split at the bands' boundary too) and the
    sketch metric at the count the report compares at."""
    spec = load_spec(SPECS / f"{name}.yaml")
    assert {"fsd_kanjivg", "ksd_kanjivg"} <= set(spec.report_metrics)
    for arm in spec.arms:
        cfg = compose_arm(spec, arm, spec.seeds[0], tmp_path / arm)
        assert cfg.model.sketch_metric.num_samples >= 500, arm
        assert list(cfg.model.validation.band_boundaries) == [500], arm
        bands = OmegaConf.select(cfg, "method.timestep_bands")
        if bands is not None:  # the validation split is the bands' own split
            assert list(bands.boundaries) == [500], arm
