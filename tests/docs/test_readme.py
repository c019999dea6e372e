"""README.md as a newcomer uses it: short, its install and test commands are CI's, and every
`python -m sparse_dm...` line in it (and in docs/*.md) runs as written.

Every command line composes through its command's Hydra entry config with the checks the command runs
first. The README's quick ones - the `debug=tiny` run, then each command on that run's folder `<run>`,
and the cost report - really run, in this process, through the command's own `__main__` (sampling with
fixed CSR thresholds, see FIXED_THRESHOLDS); full-length training runs are composed and checked only.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from helpers.markdown import (
    REPO,
    blocks,
    command_lines,
    compose_as_cli,
    run_python,
    shell_words,
    simple_commands,
    sparse_dm_command,
    table_rows,
)

from sparse_dm.run import checks

README = REPO / "README.md"
MAX_LINES = 200
RUN = "<run>"  # the README's name for a run folder
# extending.md's commands need the files it writes first: tests/docs/test_extending.py runs them.
PAGES = [README, *(p for p in sorted((REPO / "docs").glob("*.md")) if p.name != "extending.md")]
VALIDATED = {"train", "cost"}  # commands that run checks.validate on their config before anything else
# The one addition to a README line: `sample` gets fixed CSR thresholds, because `auto` times candidate
# forms (minutes on two busy cores); tests/inference/test_inference_calibrate.py tests `auto` itself.
FIXED_THRESHOLDS = ["inference.threshold_linear=1.0", "inference.threshold_gru=1.0"]


def sparse_dm_lines(page: Path) -> list[str]:
    return [line for b in blocks(page) if b.lang == "bash" for line in command_lines(b.text)
            if line.startswith("python -m sparse_dm.")]  # fmt: skip


def section_commands(title: str) -> list[list[str]]:
    (block,) = [b for b in blocks(README) if b.section == title and b.lang == "bash"]
    return [c for line in command_lines(block.text) for c in simple_commands(line)]


def ci_commands() -> list[list[str]]:
    """The argv of each line of .ci/run (a script, so redirections stay as words)."""
    argvs = [shlex.split(line, comments=True) for line in command_lines((REPO / ".ci" / "run").read_text())]
    return [argv for argv in argvs if argv]


def test_readme_fits_in_200_lines():
    assert len(README.read_text().splitlines()) <= MAX_LINES


def test_ci_runs_the_readme_install_and_test_commands():
    """`.ci/run` must install and test exactly as the README tells a newcomer to."""
    (pip,) = [c for c in section_commands("Install") if Path(c[0]).name == "pip"]
    (make,) = section_commands("Test")
    ci = ci_commands()
    assert [Path(pip[0]).name, *pip[1:]] in [[Path(c[0]).name, *c[1:]] for c in ci]
    assert any(c[: len(make)] == make for c in ci), f"{make} not in .ci/run"


def test_the_results_table_is_copied_from_docs_results():
    """Each README result row is a row of the generated docs/results.md, cell for cell (no hand-typed or
    stale verdict)."""
    readme = table_rows(README, "Results")
    generated = table_rows(REPO / "docs" / "results.md")
    assert readme
    for row in readme:
        assert any(all(other.get(key) == value for key, value in row.items()) for other in generated), row


def test_the_pages_show_commands():
    assert len(sparse_dm_lines(README)) >= 8
    assert sum(len(sparse_dm_lines(page)) for page in PAGES) >= 20


@pytest.mark.parametrize(
    "line", [line for page in PAGES for line in sparse_dm_lines(page)], ids=lambda line: line[:90]
)
def test_every_command_line_composes_and_passes_its_checks(line):
    argv = shell_words(line.replace(RUN, "/nonexistent/run"))
    command = sparse_dm_command(argv)
    cfg = compose_as_cli(command, argv[3:], REPO)
    if command in VALIDATED:
        checks.validate(cfg)


def test_the_readme_quick_commands_run_as_written(tmp_path, monkeypatch):
    """The smoke run, then every README command that names `<run>` (on that run), then the cost report."""
    monkeypatch.chdir(tmp_path)
    lines = sparse_dm_lines(README)
    (tiny,) = [line for line in lines if RUN not in line and "debug=tiny" in shell_words(line)]
    run_python(shell_words(tiny), tmp_path)
    (run_dir,) = tmp_path.glob("outputs/train/*")
    first = json.loads((run_dir / "summary.json").read_text())
    on_run = [line.replace(RUN, str(run_dir)) for line in lines if RUN in line]
    cost = [line for line in lines if line.startswith("python -m sparse_dm.cost ")]
    assert on_run and cost
    for line in on_run + cost:
        argv = shell_words(line)
        if sparse_dm_command(argv) == "sample":
            argv += FIXED_THRESHOLDS
        run_python(argv, tmp_path)
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["steps_completed"] == first["steps_completed"]  # a finished run continued: same end
    assert list((run_dir / "samples").glob("*.npz")), "sparse_dm.sample wrote no samples"
    assert {p.name for p in (run_dir / "export").iterdir()} >= {"model.safetensors", "README.md"}
    (cost_json,) = tmp_path.glob("outputs/cost/*/cost.json")
    assert json.loads(cost_json.read_text())["params_total"] > 0
