"""A study protocol (multirun_sweeps/study_specs/*.yaml): arms, shared seeds, pre-declared contrasts, a
budget in optimizer steps and a recovery window W, checked before anything runs.

Why a protocol: a study's verdicts follow from its settings as much as from its methods. A contrast is
declared before its runs exist; every arm runs every seed, so contrasts are paired; and no mask update
may fall within the last W steps before an evaluation that a contrast uses, so no verdict reads a
network that an update has just set to zero. The window is checked on each arm's composed training
config with the method's own UpdateSchedule (update_interval, method.end_step / end_fraction,
trainer.max_steps) and trainer.val_check_interval; a violating spec is refused naming the steps.

Paths in a spec are relative to the repository root (where the commands run).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.singleton import Singleton
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from sparse_dm import CONFIG_DIR
from sparse_dm.run import checks
from sparse_dm.run.build import check_sparsity_budget
from sparse_dm.sparsity.schedule import UpdateSchedule

SPEC_KEYS = frozenset(
    {
        "name", "title", "description", "config", "seeds", "budget_steps", "recovery_window", "confidence",
        "out", "runs_dir", "arms", "contrasts", "parts", "figures", "selection", "inputs", "source", "limits",
        "report_metrics",
    }
)  # fmt: skip
REQUIRED_KEYS = ("name", "title", "seeds", "budget_steps", "recovery_window", "out", "arms", "contrasts")
ARM_KEYS = frozenset({"label", "overrides", "csv_arm"})
CONTRAST_KEYS = frozenset({"a", "b", "metric", "metric_b", "step", "factors", "claim"})
FIGURE_KEYS = frozenset({"name", "title", "x", "series"})
SELECTION_KEYS = frozenset({"factor", "feeds"})
# keys the protocol sets for every run: an arm that sets them would break pairing or the budget
OWNED_KEYS = ("seed", "trainer.max_steps", "resume", "paths.output_dir", "num_threads", "backend")
OWNED_PREFIX = "hydra."
# How the runner executes a run, not what the run computes (backend: the same masks and weights up to
# float rounding, tests/sparse_backend/test_training_equivalence.py).
EXECUTION_KEYS = ("num_threads", "resume", "backend")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_]*$")  # arm and part names are folder names
CONTRASTS_FIGURE = "contrasts"  # plots/contrasts.png: every report's interval figure, not a spec figure name
MIN_SEEDS = 2  # an SD, and so an interval, needs two


class ProtocolError(ValueError):
    """A study spec that cannot run as declared (the message names the key, arm or steps)."""


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    overrides: tuple[str, ...]  # Hydra overrides as written (interpolations of `inputs` unresolved)
    csv_arm: str | None  # studies read from a per-arm CSV: this arm's row label there


@dataclass(frozen=True)
class ContrastSpec:
    """A − B on `metric` (B's own metric_b when it differs, e.g. EMA vs raw of one arm), at the
    evaluation at `step` (None: the final one, at the budget)."""

    a: str
    b: str
    metric: str
    metric_b: str
    step: int | None
    factors: Mapping[str, Any]
    claim: str | None  # the earlier claim this contrast tests, quoted

    def label(self, arms: Mapping[str, Arm]) -> str:
        metric = self.metric if self.metric == self.metric_b else f"{self.metric} − {self.metric_b}"
        return f"{arms[self.a].label} − {arms[self.b].label} ({metric})"


@dataclass(frozen=True)
class FigureSpec:
    """Contrast differences with their intervals against factor `x`, one line per `series` value."""

    name: str
    title: str
    x: str
    series: tuple[str, ...]


@dataclass(frozen=True)
class Selection:
    """A value chosen from this study by a rule fixed before the runs: the `factor` value whose
    contrasts have the lowest mean difference; `feeds` names the spec input it is meant for."""

    factor: str
    feeds: str


@dataclass(frozen=True)
class StudySpec:
    path: Path
    name: str
    title: str
    description: str
    config_dir: Path
    config_name: str
    seeds: tuple[int, ...]
    budget_steps: int
    recovery_window: int
    confidence: float
    out: Path
    runs_dir: Path
    arms: Mapping[str, Arm]
    contrasts: tuple[ContrastSpec, ...]
    parts: Mapping[str, tuple[str, ...]]
    figures: tuple[FigureSpec, ...] = ()
    selection: Selection | None = None
    source_csv: Path | None = None
    limits: tuple[str, ...] = ()
    report_metrics: tuple[str, ...] = ()  # shown per arm beside the contrasts' metrics, not tested
    raw: DictConfig = field(default_factory=lambda: OmegaConf.create({}), repr=False)

    @property
    def alpha(self) -> float:
        """The verdicts' level: 1 − confidence, so a verdict and its interval use the same level."""
        return 1.0 - self.confidence

    def missing_inputs(self) -> list[str]:
        """Declared inputs still ??? (e.g. a Te chosen from another study's report)."""
        inputs = self.raw.get("inputs") or {}
        return [f"inputs.{k}" for k in inputs if OmegaConf.is_missing(inputs, k)]

    def arm_overrides(self, arm: str) -> list[str]:
        """The arm's overrides with `inputs` interpolated; refused while an input they need is ???."""
        try:
            return [str(o) for o in OmegaConf.to_container(self.raw.arms[arm].overrides, resolve=True)]
        except (MissingMandatoryValue, InterpolationResolutionError) as err:
            missing = ", ".join(self.missing_inputs()) or str(err)
            raise ProtocolError(
                f"study {self.name} ({self.path}): arm {arm} needs {missing}, still ??? (missing); set it "
                "in the spec (see its comment for the rule that chooses it)"
            ) from err

    def evaluation_steps(self, arm: str) -> list[int]:
        """The evaluations the arm's contrasts read (the final one unless a contrast names a step)."""
        steps = {c.step or self.budget_steps for c in self.contrasts if arm in (c.a, c.b)}
        return sorted(steps)

    def jobs(self, parts: Sequence[str] | None = None) -> list[tuple[str, int]]:
        """(arm, seed) of the named parts (all parts when None), in spec order."""
        chosen = list(self.parts) if parts is None else list(parts)
        unknown = [p for p in chosen if p not in self.parts]
        if unknown:
            raise ProtocolError(
                f"study {self.name}: part(s) {unknown} not declared; allowed: {sorted(self.parts)}"
            )
        return [(arm, seed) for p in chosen for arm in self.parts[p] for seed in self.seeds]


def _fail(path: Path, message: str) -> ProtocolError:
    return ProtocolError(f"invalid study spec {path}: {message}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _arms(path: Path, node: Any) -> dict[str, Arm]:
    if not isinstance(node, DictConfig) or not node:
        raise _fail(path, "arms must be a non-empty mapping name -> {label, overrides}")
    arms = {}
    for name, arm in node.items():
        if not NAME_PATTERN.match(str(name)):
            raise _fail(path, f"arm name {name!r}; allowed: lowercase letters, digits and _ (a folder name)")
        if not isinstance(arm, DictConfig) or set(arm) - ARM_KEYS or "label" not in arm:
            raise _fail(path, f"arms.{name} must have a label and may have {sorted(ARM_KEYS - {'label'})}")
        raw = OmegaConf.to_container(arm, resolve=False)
        overrides = raw.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise _fail(path, f"arms.{name}.overrides must be a list of Hydra overrides (key=value)")
        for o in overrides:
            key = _override_key(o)
            if key in OWNED_KEYS or key.startswith(OWNED_PREFIX):
                raise _fail(
                    path,
                    f"arms.{name}.overrides sets {key}, which the protocol sets for every run "
                    f"(allowed: any key but {list(OWNED_KEYS)} and {OWNED_PREFIX}*; the budget is "
                    "budget_steps, the seeds are seeds)",
                )
        arms[str(name)] = Arm(str(name), str(raw["label"]), tuple(overrides), raw.get("csv_arm"))
    return arms


def _contrasts(path: Path, node: Any, arms: Mapping[str, Arm], budget: int) -> tuple[ContrastSpec, ...]:
    if not isinstance(node, ListConfig) or not node:
        raise _fail(path, "contrasts must be a non-empty list of {a, b, metric}")
    out = []
    for i, c in enumerate(node):
        where = f"contrasts[{i}]"
        if not isinstance(c, DictConfig) or set(c) - CONTRAST_KEYS or not {"a", "b", "metric"} <= set(c):
            raise _fail(path, f"{where} needs a, b, metric and may have {sorted(CONTRAST_KEYS)}")
        for side in ("a", "b"):
            if c[side] not in arms:
                raise _fail(path, f"{where}.{side}={c[side]!r}; allowed: one of the arms {list(arms)}")
        metric_b = c.get("metric_b") or c.metric
        if c.a == c.b and metric_b == c.metric:
            raise _fail(path, f"{where} compares arm {c.a} with itself on one metric")
        step = c.get("step")
        if step is not None and (not _is_int(step) or not 0 < step <= budget):
            raise _fail(path, f"{where}.step={step!r}; allowed: null (final) or an integer in [1, {budget}]")
        factors = OmegaConf.to_container(c.get("factors") or OmegaConf.create({}), resolve=True)
        out.append(ContrastSpec(c.a, c.b, str(c.metric), str(metric_b), step, factors, c.get("claim")))
    return tuple(out)


def _parts(path: Path, node: Any, arms: Mapping[str, Arm]) -> dict[str, tuple[str, ...]]:
    """Every arm in exactly one part, so running every part runs the whole study once."""
    if node is None:
        return {"all": tuple(arms)}
    parts = {str(k): tuple(str(a) for a in v) for k, v in node.items()}
    seen: dict[str, str] = {}
    for part, members in parts.items():
        if not NAME_PATTERN.match(part):
            raise _fail(path, f"part name {part!r}; allowed: lowercase letters, digits and _")
        for arm in members:
            if arm not in arms:
                raise _fail(path, f"parts.{part} lists {arm!r}; allowed: one of the arms {list(arms)}")
            if arm in seen:
                raise _fail(path, f"arm {arm} is in parts {seen[arm]} and {part}; allowed: exactly one part")
            seen[arm] = part
    unplaced = [a for a in arms if a not in seen]
    if unplaced:
        raise _fail(path, f"arms {unplaced} are in no part; every arm must be in exactly one")
    return parts


def _figures(path: Path, node: Any, contrasts: Sequence[ContrastSpec]) -> tuple[FigureSpec, ...]:
    figures = []
    for i, f in enumerate(node or []):
        if not isinstance(f, DictConfig) or set(f) != FIGURE_KEYS:
            raise _fail(path, f"figures[{i}] needs exactly {sorted(FIGURE_KEYS)}")
        if not NAME_PATTERN.match(str(f.name)):
            raise _fail(path, f"figures[{i}].name={f.name!r}; allowed: lowercase letters, digits and _")
        if f.name == CONTRASTS_FIGURE:
            raise _fail(path, f"figures[{i}].name={f.name!r} is the report's interval figure; rename it")
        keys = (f.x, *f.series)
        if not any(all(k in c.factors for k in keys) for c in contrasts):
            raise _fail(path, f"figures[{i}]: no contrast has factors {list(keys)}")
        figures.append(FigureSpec(str(f.name), str(f.title), str(f.x), tuple(str(s) for s in f.series)))
    return tuple(figures)


def _selection(path: Path, node: Any, contrasts: Sequence[ContrastSpec]) -> Selection | None:
    if node is None:
        return None
    if not isinstance(node, DictConfig) or set(node) != SELECTION_KEYS:
        raise _fail(path, f"selection needs exactly {sorted(SELECTION_KEYS)}")
    if not any(node.factor in c.factors for c in contrasts):
        raise _fail(path, f"selection.factor={node.factor!r}: no contrast declares that factor")
    return Selection(str(node.factor), str(node.feeds))


def load_spec(path: Path) -> StudySpec:
    """Read and check a study spec; every error names the key and what is allowed."""
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"study spec {path} not found")
    raw = OmegaConf.load(path)
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise _fail(path, f"unknown keys {unknown}; allowed: {sorted(SPEC_KEYS)}")
    absent = [k for k in REQUIRED_KEYS if k not in raw]
    if absent:
        raise _fail(path, f"missing keys {absent}")
    seeds = list(raw.seeds) if isinstance(raw.seeds, ListConfig) else None
    if not seeds or not all(_is_int(s) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise _fail(path, f"seeds={raw.seeds!r}; allowed: a list of distinct integers >= 0")
    if len(seeds) < MIN_SEEDS:
        raise _fail(path, f"seeds={seeds}; allowed: at least {MIN_SEEDS} (an interval needs two)")
    budget = raw.budget_steps
    if not _is_int(budget) or budget < 1:
        raise _fail(path, f"budget_steps={budget!r}; allowed: an integer >= 1")
    window = raw.recovery_window
    if not _is_int(window) or not 0 <= window < budget:
        raise _fail(path, f"recovery_window={window!r}; allowed: an integer in [0, budget_steps)")
    confidence = raw.get("confidence", 0.95)
    if not isinstance(confidence, float) or not 0.0 < confidence < 1.0:
        raise _fail(path, f"confidence={confidence!r}; allowed: a number in (0, 1)")
    if not NAME_PATTERN.match(str(raw.name)):
        raise _fail(path, f"name={raw.name!r}; allowed: lowercase letters, digits and _")
    arms = _arms(path, raw.arms)
    contrasts = _contrasts(path, raw.contrasts, arms, budget)
    config = raw.get("config") or {}
    source = raw.get("source")
    source_csv = None if source is None else Path(source.arms_csv)
    if source_csv is not None and any(a.csv_arm is None for a in arms.values()):
        raise _fail(path, "source.arms_csv is set: every arm needs csv_arm (its row label in that CSV)")
    return StudySpec(
        path=path,
        name=str(raw.name),
        title=str(raw.title),
        description=str(raw.get("description") or "").strip(),
        config_dir=Path(config["dir"]) if config.get("dir") else CONFIG_DIR,
        config_name=str(config.get("name") or "train"),
        seeds=tuple(seeds),
        budget_steps=budget,
        recovery_window=window,
        confidence=confidence,
        out=Path(raw.out),
        runs_dir=Path(raw.get("runs_dir") or Path("runs") / str(raw.name)),
        arms=arms,
        contrasts=contrasts,
        parts=_parts(path, raw.get("parts"), arms),
        figures=_figures(path, raw.get("figures"), contrasts),
        selection=_selection(path, raw.get("selection"), contrasts),
        source_csv=source_csv,
        limits=tuple(str(x) for x in raw.get("limits") or ()),
        report_metrics=tuple(str(x) for x in raw.get("report_metrics") or ()),
        raw=raw,
    )


# ----- composing an arm's training config ----------------------------------------------------------------
@contextmanager
def _outside_running_app() -> Iterator[None]:
    """Hydra's compose API refuses to start while a Hydra app holds its global state (the commands
    are Hydra apps): set that state aside while composing and put it back afterwards."""
    saved = Singleton._instances.pop(GlobalHydra, None)
    try:
        yield
    finally:
        Singleton._instances.pop(GlobalHydra, None)
        if saved is not None:
            Singleton._instances[GlobalHydra] = saved


def run_overrides(spec: StudySpec, arm: str, seed: int) -> list[str]:
    """What every run of (arm, seed) is given: the arm's overrides, then the protocol's budget and seed."""
    return [*spec.arm_overrides(arm), f"trainer.max_steps={spec.budget_steps}", f"seed={seed}"]


def compose_arm(spec: StudySpec, arm: str, seed: int, output_dir: Path) -> DictConfig:
    """The training config `python -m sparse_dm.train` builds for this run (same config files, same
    overrides), composed in-process so the protocol can be checked before anything runs."""
    search = [] if spec.config_dir.resolve() == CONFIG_DIR else [f"hydra.searchpath=[file://{CONFIG_DIR}]"]
    overrides = [*search, *run_overrides(spec, arm, seed), f"paths.output_dir={output_dir}"]
    with _outside_running_app(), initialize_config_dir(str(spec.config_dir.resolve()), version_base="1.3"):
        return compose(config_name=spec.config_name, overrides=overrides)


# ----- the schedule and the recovery window --------------------------------------------------------------
@dataclass(frozen=True)
class ArmSchedule:
    """When a run's masks change and when it is evaluated (optimizer steps completed)."""

    budget: int
    update_interval: int
    updates: tuple[int, ...]
    evaluations: tuple[int, ...]

    def last_update_before(self, step: int) -> int | None:
        return max((u for u in self.updates if u <= step), default=None)


def _trainer_step_rules(cfg: DictConfig) -> int:
    """The settings under which 'validation at step e' means e optimizer steps: returns
    trainer.val_check_interval (refused unless an integer of optimizer steps)."""
    trainer = cfg.trainer
    rules = (
        ("trainer.accumulate_grad_batches", trainer.get("accumulate_grad_batches", 1) == 1, "1"),
        ("trainer.check_val_every_n_epoch", trainer.get("check_val_every_n_epoch") is None, "null"),
        ("trainer.max_epochs", trainer.get("max_epochs", -1) in (-1, None), "-1 (the budget is in steps)"),
    )
    for key, ok, allowed in rules:
        if not ok:
            raise ProtocolError(
                f"invalid config for a study: {key}={OmegaConf.select(cfg, key)!r}; allowed: {allowed}"
            )
    interval = trainer.val_check_interval
    if not _is_int(interval) or interval < 1:
        raise ProtocolError(
            f"invalid config for a study: trainer.val_check_interval={interval!r}; allowed: an integer >= 1 "
            "(optimizer steps between validations)"
        )
    return interval


def arm_schedule(cfg: DictConfig) -> ArmSchedule:
    """Mask updates by the method's own UpdateSchedule (none for methods that never grow: dense,
    static); validations at step 0 (validate_before_fit), every val_check_interval, and the last step."""
    budget = int(cfg.trainer.max_steps)
    interval = _trainer_step_rules(cfg)
    te = int(cfg.update_interval)
    schedule = UpdateSchedule(
        te, float(cfg.prune_rate), cfg.method.schedule, cfg.method.end_step, cfg.method.end_fraction, budget
    )
    dynamic = cfg.method.get("grow") is not None
    updates = tuple(s for s in range(te, budget + 1, te) if schedule.is_update_step(s)) if dynamic else ()
    evaluations = {budget, *range(interval, budget + 1, interval)}
    if cfg.get("validate_before_fit", False):
        evaluations.add(0)
    return ArmSchedule(budget, te, updates, tuple(sorted(evaluations)))


def recovery_violations(arm: str, schedule: ArmSchedule, steps: Sequence[int], window: int) -> list[str]:
    """One line per evaluation a contrast reads that is not an evaluation step, or that has a mask
    update in its last `window` steps (steps e − W + 1 .. e)."""
    problems = []
    for e in steps:
        if e not in schedule.evaluations:
            problems.append(
                f"arm {arm}: a contrast reads step {e}, which is not evaluated (validations at "
                f"{list(schedule.evaluations)})"
            )
            continue
        close = [u for u in schedule.updates if e - window < u <= e]
        if close:
            problems.append(
                f"arm {arm}: mask update(s) at step(s) {close} fall within the recovery window W = {window} "
                f"before the evaluation at step {e} (no update allowed in steps {max(1, e - window + 1)}-{e}"
                "); "
                f"stop updates earlier, e.g. method.end_step={e - window + 1} (last update <= {e - window})"
            )
    return problems


def check_protocol(spec: StudySpec, scratch: Path) -> dict[str, ArmSchedule]:
    """Compose and validate every arm's training config (as the runs will get it), and check the
    recovery window on the evaluations its contrasts read; refused with every problem named.
    `scratch` stands in for the run folders (nothing is written there)."""
    problems: list[str] = []
    schedules = {}
    for arm in spec.arms:
        cfg = compose_arm(spec, arm, spec.seeds[0], scratch / arm)
        try:
            checks.validate(cfg)
            check_sparsity_budget(cfg)
        except ValueError as err:
            problems.append(f"arm {arm}: {err}")
            continue
        schedules[arm] = arm_schedule(cfg)
        problems += recovery_violations(arm, schedules[arm], spec.evaluation_steps(arm), spec.recovery_window)
    if problems:
        raise ProtocolError(
            f"study {spec.name} ({spec.path}) refused before any run:\n  " + "\n  ".join(problems)
        )
    return schedules
