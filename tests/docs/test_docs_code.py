"""The Python snippets of docs/*.md that say they run as written do (interface sketches, such as
CONTRACTS.md's, do not say so; extending.md's files are run by test_extending)."""

from __future__ import annotations

import pytest
from helpers.markdown import REPO, blocks

SNIPPETS = [
    (page, block)
    for page in sorted((REPO / "docs").glob("*.md"))
    for block in blocks(page)
    if block.lang == "python" and block.file is None and "runs as written" in block.lead
]


def test_there_are_snippets():
    assert any(page.name == "engine.md" for page, _ in SNIPPETS)


@pytest.mark.parametrize("page, block", SNIPPETS, ids=lambda x: getattr(x, "name", ""))
def test_snippet_runs(page, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block.text, str(page), "exec"), {"__name__": "__main__"})  # its own asserts check it
