"""The code in the project's markdown, as a reader would copy it: blocks, files, command lines.

Docs tests use this to run what README.md and docs/*.md show exactly as written: a command line is split
into arguments by bash itself (quotes, brace expansion and comments behave as in a terminal), and a
`python -m sparse_dm.<command> ...` line is composed or run through the command's own Hydra entry point.
"""

from __future__ import annotations

import ast
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from sparse_dm import CONFIG_DIR

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "sparse_dm"
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
FILE_LINE = re.compile(r"[Ff]ile `([^`]+)`:\s*$")  # "File `path`:" right above a block names its file
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    section: str  # the nearest "## " heading above it ("" before the first)
    lead: str  # the non-blank line right above it
    file: str | None  # the file name of a "File `name`:" lead


def blocks(path: Path) -> list[Block]:
    """Every fenced code block of a markdown file, in order (indented fences, as in lists, too)."""
    found: list[Block] = []
    section, previous, lines = "", "", path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence is None:
            heading = HEADING.match(line)
            if heading and len(heading.group(1)) == 2:
                section = heading.group(2)
            if line.strip():
                previous = line
            i += 1
            continue
        indent, body = len(fence.group(1)), []
        i += 1
        while not FENCE.match(lines[i]):
            body.append(lines[i][indent:])
            i += 1
        named = FILE_LINE.search(previous)
        name = named.group(1) if named else None
        found.append(Block(fence.group(2), "\n".join(body) + "\n", section, previous, name))
        previous, i = "", i + 1
    return found


def table_rows(path: Path, section: str | None = None) -> list[dict[str, str]]:
    """The body rows of the markdown tables of a file (of one "## " section), each as {header: cell}."""
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    current = ""
    for line in path.read_text().splitlines():
        heading = HEADING.match(line)
        if heading and len(heading.group(1)) == 2:
            current = heading.group(2)
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("-: ") and (section is None or current == section):
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def command_lines(text: str) -> list[str]:
    """The logical lines of a shell block (backslash continuations joined), blank lines dropped."""
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a line joined by `&&` (shlex words, comments dropped); other control
    operators (`;`, `|`, redirections) are refused: docs commands stay copy-pasteable one by one."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token == "&&":
            commands.append([])
        elif token and set(token) <= set(lexer.punctuation_chars):
            raise ValueError(f"{line!r}: {token!r} is not allowed in a docs command (one command, or a && b)")
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def shell_words(line: str) -> list[str]:
    """The argv bash makes of one simple command: quotes, brace expansion, variables and comments as in
    a terminal (pathname expansion off, so the result does not depend on the current folder). The line
    is parsed by bash's `set --`, never executed, so it must be one simple command."""
    if len(simple_commands(line)) != 1 or "$(" in line or "`" in line:
        raise ValueError(f"{line!r} is not one simple command without command substitution")
    script = 'set -f; eval "set -- $1"; printf "%s\\0" "$@"'
    out = subprocess.run(["bash", "-c", script, "_", line], capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def sparse_dm_command(argv: list[str]) -> str | None:
    """The command name of `python -m sparse_dm.<command> ...`, else None."""
    if len(argv) >= 3 and argv[0] == "python" and argv[1] == "-m" and argv[2].startswith("sparse_dm."):
        return argv[2].removeprefix("sparse_dm.")
    return None


def default_config_name(command: str) -> str:
    """The config_name of the command's @hydra.main (read from its source, nothing imported)."""
    tree = ast.parse((PACKAGE / f"{command}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "main":
            for keyword in node.keywords:
                if keyword.arg == "config_name":
                    return ast.literal_eval(keyword.value)
    raise LookupError(f"sparse_dm/{command}.py has no @hydra.main(config_name=...)")


def compose_as_cli(command: str, args: list[str], cwd: Path) -> DictConfig:
    """The config `python -m sparse_dm.<command> *args` would run with (Hydra's flags -m, --config-dir
    and --config-name honoured the way the CLI does; relative config dirs from `cwd`)."""
    config_name, config_dir, overrides, rest = default_config_name(command), None, [], iter(args)
    for arg in rest:
        if arg in ("-m", "--multirun"):
            continue
        if arg in ("--config-dir", "-cd"):
            config_dir = (cwd / next(rest)).resolve()
        elif arg in ("--config-name", "-cn"):
            config_name = next(rest)
        else:
            overrides.append(arg)
    primary = CONFIG_DIR
    if config_dir is not None:  # the CLI puts --config-dir first in the search path
        primary, extra = (config_dir, CONFIG_DIR) if (config_dir / f"{config_name}.yaml").exists() else (
            CONFIG_DIR, config_dir)
        overrides.append(f"hydra.searchpath=[file://{extra}]")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(primary), version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=True)


@contextmanager
def _argv_and_path(argv: list[str], path0: Path) -> Iterator[None]:
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv, sys.path[:0] = argv, [str(path0)]
    try:
        yield
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def run_python(argv: list[str], cwd: Path) -> None:
    """Run `python -m module ...` or `python file.py ...` in this process, as the interpreter would:
    the module or file as __main__ with that argv, the folder it imports from first on sys.path.
    (Faster than a new interpreter per command; the caller has chdir'd to `cwd`.)"""
    if argv[0] != "python":
        raise ValueError(f"not a python command line: {argv}")
    GlobalHydra.instance().clear()
    if argv[1] == "-m":
        with _argv_and_path([argv[2], *argv[3:]], cwd), warnings.catch_warnings():
            # runpy notes that the command module was imported before (by an earlier test): harmless,
            # its code runs again as __main__ exactly as `python -m` would run it.
            warnings.filterwarnings("ignore", "'sparse_dm.* found in sys.modules", RuntimeWarning)
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    else:
        script = cwd / argv[1]
        with _argv_and_path([str(script), *argv[2:]], script.parent):
            runpy.run_path(str(script), run_name="__main__")
