"""Run a study spec so that it can finish over several sessions.

Each (arm, seed) of the chosen parts runs as its own `python -m sparse_dm.train` process (the same
config files and overrides the protocol checked), `n_jobs` at a time, into `<runs_dir>/<arm>/seed_<n>/`
(ignored by git) with `resume=auto`, so a run cut off by the end of a session continues from its last
checkpoint. A run is not run again once its summary.json exists, in its run folder or committed. As
each run finishes, its small record (summary.json, config.yaml, csv/metrics.csv: a few kB) is copied
to the committed folder `<out>/runs/<arm>/seed_<n>/`, which is all the report reads.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from sparse_dm import CONFIG_DIR
from sparse_dm.reporting.protocol import StudySpec, check_protocol, compose_arm, run_overrides
from sparse_dm.run.checks import sparse_backend_refusal

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
RECORD_FILES = ("config.yaml", "csv/metrics.csv", SUMMARY)  # summary last: its presence means complete
RUN_LOG = "train_stdout.log"
TRAIN_MODULE = "sparse_dm.train"


@dataclass(frozen=True)
class Job:
    spec: StudySpec
    arm: str
    seed: int
    command: tuple[str, ...]

    @property
    def run_dir(self) -> Path:
        return self.spec.runs_dir / self.arm / f"seed_{self.seed}"

    @property
    def record_dir(self) -> Path:
        return record_dir(self.spec, self.arm, self.seed)

    @property
    def name(self) -> str:
        return f"{self.spec.name}/{self.arm}/seed_{self.seed}"


@dataclass(frozen=True)
class Outcome:
    job: Job
    status: str  # committed (already) | copied (finished before, now committed) | ran | failed | planned
    detail: str = ""


def record_dir(spec: StudySpec, arm: str, seed: int) -> Path:
    """Where the run's committed record lives (read by the report)."""
    return spec.out / "runs" / arm / f"seed_{seed}"


def train_command(
    spec: StudySpec, arm: str, seed: int, num_threads: int, python: str, backend: str = "dense"
) -> tuple[str, ...]:
    """The training command of one run: the spec's config, the arm's overrides, budget, seed, and how
    it executes (threads, backend)."""
    config = [] if spec.config_dir.resolve() == CONFIG_DIR else ["--config-dir", str(spec.config_dir)]
    run_dir = spec.runs_dir / arm / f"seed_{seed}"
    return (
        python, "-m", TRAIN_MODULE, *config, "--config-name", spec.config_name,
        *run_overrides(spec, arm, seed), f"num_threads={num_threads}", f"backend={backend}", "resume=auto",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip


def arm_backend(spec: StudySpec, arm: str, requested: str) -> str:
    """`requested` = sparse: backend=sparse for an arm it can train (a sparse method, one mask per
    weight), dense for the others (dense, timestep bands). The two backends train the same masks and
    weights up to float rounding (tests/sparse_backend/test_training_equivalence.py), so this changes
    how fast a run is, not what it computes; each run's summary.json records the backend it ran."""
    if requested == "dense":
        return "dense"
    if requested != "sparse":
        raise ValueError(f"backend={requested!r}; allowed: dense or sparse")
    with tempfile.TemporaryDirectory() as scratch:
        cfg = compose_arm(spec, arm, spec.seeds[0], Path(scratch))
    return "sparse" if sparse_backend_refusal(cfg) is None else "dense"


def copy_record(job: Job) -> None:
    """Copy the run's record into the committed folder, refusing a run folder that holds another run
    (a different seed or budget than the job's)."""
    summary = json.loads((job.run_dir / SUMMARY).read_text())
    expected = {"seed": job.seed, "train_steps": job.spec.budget_steps}
    found = {k: summary.get(k) for k in expected}
    if found != expected:
        raise RuntimeError(f"{job.run_dir} holds a different run: {found}, expected {expected}")
    missing = [f for f in RECORD_FILES if not (job.run_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{job.run_dir} lacks {missing} (the study needs logger.csv)")
    for name in RECORD_FILES:
        target = job.record_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(job.run_dir / name, partial)
        partial.replace(target)


def plan(
    spec: StudySpec, parts: Sequence[str] | None, num_threads: int, python: str, backend: str = "dense"
) -> list[Job]:
    jobs = spec.jobs(parts)
    backends = {arm: arm_backend(spec, arm, backend) for arm in dict.fromkeys(arm for arm, _ in jobs)}
    return [
        Job(spec, arm, seed, train_command(spec, arm, seed, num_threads, python, backends[arm]))
        for arm, seed in jobs
    ]


def run_job(job: Job) -> Outcome:
    """Train one run (its output in <run_dir>/train_stdout.log) and commit its record."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    with (job.run_dir / RUN_LOG).open("a") as out:
        out.write(f"$ {shlex.join(job.command)}\n")
        out.flush()
        rc = subprocess.run(job.command, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        return Outcome(job, "failed", f"exit status {rc}; see {job.run_dir / RUN_LOG}")
    if not (job.run_dir / SUMMARY).is_file():
        return Outcome(job, "failed", f"exit status 0 but no {SUMMARY} in {job.run_dir}")
    try:
        copy_record(job)
    except (RuntimeError, FileNotFoundError) as err:
        return Outcome(job, "failed", str(err))
    return Outcome(job, "ran", str(job.record_dir))


def run_studies(
    specs: Sequence[StudySpec],
    parts: Sequence[str] | None = None,
    n_jobs: int = 2,
    num_threads: int = 1,
    dry_run: bool = False,
    python: str = sys.executable,
    backend: str = "dense",
) -> list[Outcome]:
    """Check every spec's protocol (nothing runs if one is refused), then run what is not finished."""
    if n_jobs < 1 or num_threads < 1:
        raise ValueError(f"n_jobs={n_jobs}, num_threads={num_threads}; allowed: integers >= 1")
    if parts is not None and len(specs) != 1:
        raise ValueError(f"parts={list(parts)} names parts of one spec; got {len(specs)} specs")
    for spec in specs:
        check_protocol(spec, spec.runs_dir)
    outcomes: list[Outcome] = []
    pending: list[Job] = []
    for spec in specs:
        for job in plan(spec, parts, num_threads, python, backend):
            if (job.record_dir / SUMMARY).is_file():
                outcomes.append(Outcome(job, "committed", str(job.record_dir)))
            elif (job.run_dir / SUMMARY).is_file():
                copy_record(job)
                outcomes.append(Outcome(job, "copied", str(job.record_dir)))
            else:
                pending.append(job)
    if dry_run:
        return outcomes + [Outcome(job, "planned", shlex.join(job.command)) for job in pending]
    log.info("%d run(s) finished before, %d to run, %d at a time", len(outcomes), len(pending), n_jobs)
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        futures = [pool.submit(run_job, job) for job in pending]
        for future in as_completed(futures):
            outcome = future.result()
            log.info("%s: %s %s", outcome.job.name, outcome.status, outcome.detail)
            outcomes.append(outcome)
    return outcomes
