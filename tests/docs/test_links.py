"""Every relative link in README.md, CHANGELOG.md and docs/*.md points at a file that exists (and, with
`#anchor`, at a heading that exists there), so a reader who clicks never lands on a 404."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers.markdown import FENCE, HEADING, REPO

PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
EXTERNAL = ("http://", "https://", "mailto:")


def prose_lines(path: Path) -> list[str]:
    """The lines outside fenced code blocks (a link inside code is code, not a link)."""
    lines, inside = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for line in prose_lines(path):
        heading = HEADING.match(line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(2).lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
    return {slug if n == 0 else f"{slug}-{n}" for slug, count in seen.items() for n in range(count + 1)}


def relative_links(path: Path) -> list[str]:
    return [target for line in prose_lines(path) for target in LINK.findall(line)
            if not target.startswith(EXTERNAL)]  # fmt: skip


def test_the_pages_have_links_to_check():
    assert sum(len(relative_links(page)) for page in PAGES) > 50


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert broken == []


def test_anchor_rule_matches_githubs():
    """Known GitHub ids of headings with numbers, slashes, colons, commas and parentheses."""
    page = REPO / "docs" / "extending.md"
    assert "1-a-new-prunegrow-criterion" in anchors(page)
    assert "beyond-the-paper-timestep-band-masks-and-adaptive-p-issue-14" in anchors(
        REPO / "docs" / "ARCHITECTURE.md"
    )
