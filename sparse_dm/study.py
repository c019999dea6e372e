"""`python -m sparse_dm.study specs=<spec.yaml>` (or `specs=[a.yaml,b.yaml]`, `parts=[p1]`): run a study
protocol (multirun_sweeps/study_specs/). Every spec is checked first (arms' configs, the recovery
window W) and nothing runs if one is refused; then each (arm, seed) not yet finished trains as its own
`sparse_dm.train` process and its record is committed to <out>/runs/ as it finishes
(sparse_dm.reporting.study_runner). `dry_run=true` lists what would run. Options: conf/study_run.yaml.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sparse_dm.reporting.protocol import ProtocolError, load_spec
from sparse_dm.reporting.study_runner import run_studies

log = logging.getLogger(__name__)


def _paths(value: object) -> list[Path]:
    return [Path(v) for v in (value if OmegaConf.is_list(value) else [value])]


@hydra.main(version_base="1.3", config_path="conf", config_name="study_run")
def main(cfg: DictConfig) -> None:
    parts = None if cfg.parts is None else [str(p) for p in cfg.parts]
    try:
        specs = [load_spec(p) for p in _paths(cfg.specs)]
        outcomes = run_studies(
            specs, parts, int(cfg.n_jobs), int(cfg.num_threads), bool(cfg.dry_run), backend=str(cfg.backend)
        )
    except ProtocolError as err:  # a refused spec: the message names the key or steps; nothing ran
        log.error("%s", err)
        sys.exit(2)
    for o in outcomes:
        log.info("%-60s %-9s %s", o.job.name, o.status, o.detail)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        log.error("%d run(s) failed: %s", len(failed), ", ".join(o.job.name for o in failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
