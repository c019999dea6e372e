"""`make bench-train` runs and reports what it claims to (speed is measured there, never asserted here):
both backends step, mask-update steps happen, memory is measured from real tensors, and the markdown
names the CPU, compiler, flags and threads."""

from __future__ import annotations

import json

import pytest

from benchmarks import train_backend

TINY = {
    "sparsities": [0.9],
    "threads": [1],
    "pairs": 1,
    "update_pairs": 1,
    "batch": 4,
    "momentum": [[0.9, 1]],
}


@pytest.fixture(scope="module")
def results() -> dict:
    return train_backend.run(TINY)


def test_rows_hold_paired_times_and_measured_memory(results):
    row, momentum = results["rows"]
    assert (row["grow"], momentum["grow"]) == ("gradient", "momentum")
    assert row["sparsity"] == 0.9 and row["threads"] == 1 and 0.05 < row["density"] < 0.15
    for kind in ("normal", "update", "amortised"):
        assert row[kind]["dense_ms_cpu"] > 0 and row[kind]["sparse_ms_cpu"] > 0
    memory = row["memory_bytes"]
    dense, sparse = memory["dense"], memory["sparse"]
    # AdamW holds two moments per value on both sides, the gradients one: the parts follow the weights
    assert dense["grads"] == dense["weights"] and sparse["grads"] == sparse["weights"]
    assert (
        dense["optimizer_state"] > 2 * dense["weights"] and sparse["optimizer_state"] > 2 * sparse["weights"]
    )
    assert memory["ratio"] == sparse["total"] / dense["total"] < 1
    assert sparse["indices"] > 0 and dense["indices"] == 0 and dense["masks"] == sparse["masks"]


def test_markdown_names_machine_and_targets(results):
    text = train_backend.render(results)
    machine = results["machine"]
    for fact in (machine["cpu"], machine["compiler"], machine["flags"], "threads"):
        assert fact in text
    assert "S = 0.9, 1 thread: amortised step" in text and "S = 0.9, memory" in text


def test_the_committed_report_is_rendered_from_its_json():
    """docs/benchmarks_train.md is the committed JSON rendered: no figure was typed by hand."""
    committed = json.loads(train_backend.JSON_PATH.read_text())
    assert train_backend.MARKDOWN_PATH.read_text() == train_backend.render(committed)
