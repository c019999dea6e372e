"""docs/extending.md runs as written: its files in an empty folder, its commands, what they produced.

Each example's section writes the files of the examples up to it (the dataset example trains the model
family of the one before) and runs its own bash blocks line by line through the commands' entry points.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.markdown import REPO, Block, blocks, command_lines, run_python, shell_words

DOC = REPO / "docs" / "extending.md"
SECTIONS = ("1. A new prune/grow criterion", "2. A new model family", "3. A new dataset")


def section_blocks() -> list[Block]:
    return [b for b in blocks(DOC) if b.section in SECTIONS]


def run_section(section: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Write every named file up to `section`, then run that section's commands in `folder`."""
    monkeypatch.chdir(folder)
    upto = SECTIONS[: SECTIONS.index(section) + 1]
    for block in section_blocks():
        if block.file is not None and block.section in upto:
            (folder / block.file).parent.mkdir(parents=True, exist_ok=True)
            (folder / block.file).write_text(block.text)
    commands = [line for b in section_blocks() if b.section == section and b.lang == "bash"
                for line in command_lines(b.text)]  # fmt: skip
    assert commands, f"no commands in {section!r}"
    for line in commands:
        run_python(shell_words(line), folder)


def only_summary(folder: Path) -> dict:
    (path,) = sorted(folder.glob("outputs/train/*/summary.json"))
    return json.loads(path.read_text())


def assert_exact_sparse_run(summary: dict) -> None:
    """The run trained, updated its masks, and every layer holds exactly its target count."""
    assert summary["mask_updates"] >= 1
    assert summary["layers"] and all(layer["nnz"] == layer["target_nnz"] for layer in summary["layers"])
    assert all(layer["nonzero"] <= layer["nnz"] for layer in summary["layers"])
    assert summary["metrics"]["val/loss"] is not None  # None: the final val/loss was not finite


def test_every_example_names_its_files_and_commands():
    found = section_blocks()
    assert {b.section for b in found} == set(SECTIONS)
    for section in SECTIONS:
        assert any(b.section == section and b.lang == "bash" for b in found), section
        assert any(b.section == section and b.file for b in found), section


def test_new_criterion_trains_with_exact_counts(tmp_path, monkeypatch):
    run_section(SECTIONS[0], tmp_path, monkeypatch)
    summary = only_summary(tmp_path)
    assert_exact_sparse_run(summary)
    (config,) = tmp_path.glob("outputs/train/*/config.yaml")
    assert "grow: sampled_gradient" in config.read_text()


def test_new_model_family_trains_samples_and_is_costed(tmp_path, monkeypatch):
    run_section(SECTIONS[1], tmp_path, monkeypatch)
    summary = only_summary(tmp_path)
    assert (summary["model"], summary["dataset"]) == ("pixel_mlp", "kanjivg_images")
    assert_exact_sparse_run(summary)
    assert summary["samples"] and all(Path(p).is_file() for p in summary["samples"])
    (cost,) = tmp_path.glob("outputs/cost/*/cost.json")
    counted = json.loads(cost.read_text())
    # 16x16 pixels, hidden 256: three Linear weights (256x256 each) are what the engine masks
    assert counted["params_prunable"] == 3 * 256 * 256
    assert counted["params_active"] == sum(layer["target_nnz"] for layer in summary["layers"])


def test_new_dataset_trains_the_new_family(tmp_path, monkeypatch):
    run_section(SECTIONS[2], tmp_path, monkeypatch)
    summary = only_summary(tmp_path)
    assert (summary["model"], summary["dataset"]) == ("pixel_mlp", "npy_images")
    assert_exact_sparse_run(summary)
    config = (next(tmp_path.glob("outputs/train/*/config.yaml"))).read_text()
    assert "path: discs.npy" in config
