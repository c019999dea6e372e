"""Packages only import from the layers below them (parsed with `ast`, nothing is imported)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparse_dm"
STDLIB = sys.stdlib_module_names

# The layers, bottom first. A package imports only packages of lower layers (never one of its own
# layer but itself); the commands (the modules at the top of sparse_dm/) import any package, and nothing
# imports a command. A new package must be placed here, or the test below fails.
LAYERS = (
    ("files", "kernels", "sketch", "diffusion", "sparsity"),
    ("models", "data"),
    ("metrics", "sparse_backend"),
    ("training",),
    ("inference",),
    ("planning",),
    ("run",),
    ("reporting",),
)
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}
COMMANDS = "commands"  # the top-level modules: python -m sparse_dm.<command>
NOT_CODE = {"conf"}
SPARSITY_THIRD_PARTY = {"torch"}  # sparsity: torch, the standard library and itself, nothing else


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                names.add(node.module)
    return names


def sparse_dm_layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "sparse_dm" and len(parts) > 1 else None


def layer_of(path: Path) -> str:
    """The package a file belongs to, or COMMANDS for a module at the top of sparse_dm/."""
    parts = path.relative_to(PACKAGE).parts
    return COMMANDS if len(parts) == 1 else parts[0]


def is_forbidden(package: str, module: str, allowed_top: set[str] | None) -> bool:
    """An import `package` may not make: a command, a package of its own or a higher layer; with
    `allowed_top`, also any third-party package outside it."""
    top = module.split(".")[0]
    if top != "sparse_dm":
        return allowed_top is not None and top not in STDLIB | allowed_top
    target = sparse_dm_layer(module)
    if target is None or target == package:
        return False
    if target not in RANK:  # sparse_dm.<command>
        return True
    return package != COMMANDS and RANK[target] >= RANK[package]


def violations(package: str, allowed_top: set[str] | None = None) -> list[str]:
    files = sorted(PACKAGE.glob("*.py")) if package == COMMANDS else sorted((PACKAGE / package).rglob("*.py"))
    return [
        f"{path.relative_to(PACKAGE.parent)} imports {module}"
        for path in files
        for module in sorted(imported_modules(path))
        if is_forbidden(package, module, allowed_top)
    ]


def local_imports(path: Path) -> list[str]:
    """sparse_dm imports inside functions: the way a cycle hides from a module-level check."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                names = (
                    [alias.name for alias in inner.names] if isinstance(inner, ast.Import)
                    else [inner.module or ""] if isinstance(inner, ast.ImportFrom) else []
                )  # fmt: skip
                found += [
                    f"{path.relative_to(PACKAGE.parent)}:{inner.lineno} imports {name}"
                    for name in names
                    if name.startswith("sparse_dm") or getattr(inner, "level", 0)
                ]
    return found


def test_every_package_has_a_layer():
    code = {p.parent.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE}
    assert code - set(RANK) == set(), "packages without a layer in LAYERS"


@pytest.mark.parametrize("package", [*sorted(RANK), COMMANDS])
def test_packages_import_only_from_layers_below(package):
    assert package == COMMANDS or (PACKAGE / package).is_dir()
    assert violations(package) == []


def test_no_function_local_imports_of_sparse_dm():
    assert [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in local_imports(path)] == []


def test_sparsity_imports_only_torch_the_standard_library_and_itself():
    assert violations("sparsity", allowed_top=SPARSITY_THIRD_PARTY) == []


def test_the_checker_sees_a_forbidden_import(tmp_path, monkeypatch):
    """Guards the guard: upward, sideways and command imports, and a hidden local import, are found."""
    fake = tmp_path / "sparse_dm"
    for package in ("data", "sparsity", "run"):
        (fake / package).mkdir(parents=True)
    (fake / "data" / "bad.py").write_text("from sparse_dm.metrics.fidelity import to_uint8\n")
    (fake / "sparsity" / "bad.py").write_text("import lightning\nfrom ..data import bad\n")
    (fake / "run" / "bad.py").write_text(
        "from sparse_dm.train import run\ndef f():\n    from sparse_dm import x\n"
    )
    (fake / "train.py").write_text("from sparse_dm.sample import sample\nfrom sparse_dm.run import bad\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations("data") == ["sparse_dm/data/bad.py imports sparse_dm.metrics.fidelity"]
    assert sorted(violations("sparsity", allowed_top=SPARSITY_THIRD_PARTY)) == [
        "sparse_dm/sparsity/bad.py imports lightning",
        "sparse_dm/sparsity/bad.py imports sparse_dm.data",
    ]
    assert violations("run") == ["sparse_dm/run/bad.py imports sparse_dm.train"]
    assert violations(COMMANDS) == ["sparse_dm/train.py imports sparse_dm.sample"]
    assert local_imports(fake / "run" / "bad.py") == ["sparse_dm/run/bad.py:3 imports sparse_dm"]


BLOCKED_IMPORT = """
import sys
for name in ("lightning", "pytorch_lightning", "lightning_fabric", "hydra", "omegaconf"):
    sys.modules[name] = None  # any import of them now raises ImportError
import torch
from torch import nn
import sparse_dm.sparsity as sparsity
engine = sparsity.SparseEngine(nn.Linear(8, 8), 0.5, grow="random", update_interval=1)
print(sorted(m for m in sys.modules if m.startswith("sparse_dm")))
"""


def test_sparsity_works_without_lightning_or_hydra():
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert all(name == "sparse_dm" or name.startswith("sparse_dm.sparsity") for name in loaded), loaded
