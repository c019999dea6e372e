"""The maps a newcomer reads first match the code: README's package tree names every package and
command, and ARCHITECTURE.md's layer diagram is the layering test's LAYERS."""

from __future__ import annotations

import re

from helpers.markdown import PACKAGE, REPO, blocks

from tests.test_layering import COMMANDS, LAYERS, NOT_CODE

LAYER_ROW = re.compile(r"^ ([a-z_]+(?:, [a-z_]+)*)(?:\s{2,}|$)")  # " name[, name...]" then 2+ spaces


def packages() -> set[str]:
    return {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def commands() -> set[str]:
    return {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}


def test_readme_tree_names_every_package_and_command():
    (tree,) = [b.text for b in blocks(REPO / "README.md") if b.section == "Layout" and b.lang == ""]
    listed = set(re.findall(r"^  ([a-z_]+)/", tree, flags=re.MULTILINE))
    assert listed == packages() | NOT_CODE
    assert set(re.findall(r"\b([a-z_]+)\.py\b", tree)) == commands()


def test_architecture_diagram_is_the_layering_tests_layers():
    diagram = blocks(REPO / "docs" / "ARCHITECTURE.md")[0].text
    rows = [set(m.group(1).split(", ")) for line in diagram.splitlines() if (m := LAYER_ROW.match(line))]
    assert rows == [{COMMANDS}, *(set(layer) for layer in reversed(LAYERS))]
