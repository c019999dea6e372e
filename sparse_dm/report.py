"""Report from finished runs: `python -m sparse_dm.report sweep_dir=DIR out=OUT`
(several folders: `sweep_dir=[DIR_A,DIR_B]`; options in conf/report.yaml).

Reads every summary.json below the directories, averages over seeds and writes OUT/report.md
(Table 1/2 layout plus the full grid), OUT/report.csv and OUT/plots/*.png (Fig. 2/3; Fig. 8 when a
sparsity was swept over several prune rates; Table 8 when runs were evaluated at several DDIM steps).

`--config-name study` (conf/study.yaml, layout=study) renders a multi-seed study instead: per-arm
mean ± SD, Welch intervals to dense, learning curves and sample grids (sparse_dm.reporting.study_report).

`--config-name study_results` (conf/study_results.yaml, layout=protocol) renders study protocols
(multirun_sweeps/study_specs/): each spec's pre-declared contrasts with intervals, Holm-adjusted p and
computed verdicts from its committed records, and docs/results.md from all of them
(sparse_dm.reporting.protocol_report).
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sparse_dm.reporting.protocol import load_spec
from sparse_dm.reporting.protocol_report import make_protocol_report, write_results
from sparse_dm.reporting.study_report import make_study_report, study_options
from sparse_dm.reporting.sweep_report import (
    make_report,
)

log = logging.getLogger(__name__)

LAYOUTS = ("paper", "study", "protocol")
























def report(cfg: DictConfig, command: str | None = None) -> Path:
    """The report of `sweep_dir` (one folder or a list) written under `out`, in cfg.layout's format;
    command is the command line that asked for it (recorded in the study report's header)."""
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"invalid config: layout={cfg.layout!r}; allowed: one of {list(LAYOUTS)}")
    if cfg.layout == "protocol":
        return protocol_reports(cfg, command)
    dirs = [Path(d) for d in (cfg.sweep_dir if OmegaConf.is_list(cfg.sweep_dir) else [cfg.sweep_dir])]
    if cfg.layout == "paper":
        return make_report(dirs, Path(cfg.out), cfg.metric)
    if cfg.metric is not None:
        raise ValueError(
            f"invalid config: metric={cfg.metric!r} applies to layout=paper; the study layout reads "
            "study.primary and study.secondary (leave metric null)"
        )
    return make_study_report(dirs, Path(cfg.out), study_options(cfg.study), command)


def protocol_reports(cfg: DictConfig, command: str | None) -> Path:
    """Each spec's contrast report, then (unless results=null) the results page over all of them;
    every spec is read (and checked) before any report is written."""
    paths = cfg.specs if OmegaConf.is_list(cfg.specs) else [cfg.specs]
    specs = [load_spec(Path(p)) for p in paths]
    reports = [make_protocol_report(spec) for spec in specs]
    if cfg.results is None:
        return reports[-1].path
    default = "python -m sparse_dm.report --config-name study_results"
    return write_results(reports, Path(cfg.results), command or default)


def command_line() -> str:
    """This invocation as a command line, rebuilt from Hydra's record of it."""
    hydra_cfg = HydraConfig.get()
    args = ["python -m sparse_dm.report", f"--config-name {hydra_cfg.job.config_name}"]
    return " ".join(args + [shlex.quote(o) for o in hydra_cfg.overrides.task])


@hydra.main(version_base="1.3", config_path="conf", config_name="report")
def main(cfg: DictConfig) -> None:
    log.info("wrote %s", report(cfg, command_line()))


if __name__ == "__main__":
    main()
