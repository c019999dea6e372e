"""Packages only import from the layers below them (parsed with `ast`, nothing is imported)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparse_dm"
STDLIB = sys.stdlib_module_names

# package -> sparse_dm packages it must never import
FORBIDDEN = {
    "data": {"metrics", "lightning", "models", "inference"},
    "models": {"data", "lightning", "metrics", "inference"},
    "sketch": {"data", "models", "metrics", "lightning", "inference", "sparsity", "diffusion"},
    "metrics": {"lightning", "inference"},
    "diffusion": {"data", "models", "metrics", "lightning", "inference", "sparsity"},
}
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


def is_forbidden(package: str, module: str, allowed_top: set[str] | None) -> bool:
    """A forbidden sparse_dm layer; with `allowed_top`, also any other package or any other layer."""
    layer = sparse_dm_layer(module)
    if layer in FORBIDDEN.get(package, set()):
        return True
    if allowed_top is None:
        return False
    top = module.split(".")[0]
    return layer != package if top == "sparse_dm" else top not in STDLIB | allowed_top


def violations(package: str, allowed_top: set[str] | None = None) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE.parent)} imports {module}"
        for path in sorted((PACKAGE / package).rglob("*.py"))
        for module in sorted(imported_modules(path))
        if is_forbidden(package, module, allowed_top)
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_from_layers_below(package):
    assert (PACKAGE / package).is_dir()
    assert violations(package) == []


def test_sparsity_imports_only_torch_the_standard_library_and_itself():
    assert violations("sparsity", allowed_top=SPARSITY_THIRD_PARTY) == []


def test_the_checker_sees_a_forbidden_import(tmp_path, monkeypatch):
    """Guards the guard: a data module importing metrics, and sparsity importing lightning, are found."""
    fake = tmp_path / "sparse_dm"
    (fake / "data").mkdir(parents=True)
    (fake / "sparsity").mkdir()
    (fake / "data" / "bad.py").write_text("from sparse_dm.metrics.fidelity import to_uint8\n")
    (fake / "sparsity" / "bad.py").write_text("import lightning\nfrom ..data import bad\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations("data") == ["sparse_dm/data/bad.py imports sparse_dm.metrics.fidelity"]
    assert sorted(violations("sparsity", allowed_top=SPARSITY_THIRD_PARTY)) == [
        "sparse_dm/sparsity/bad.py imports lightning",
        "sparse_dm/sparsity/bad.py imports sparse_dm.data",
    ]


BLOCKED_IMPORT = """
import sys
for name in ("lightning", "pytorch_lightning", "lightning_fabric", "hydra", "omegaconf"):
    sys.modules[name] = None  # any import of them now raises ImportError
import torch
from torch import nn
import sparse_dm.sparsity as sparsity
engine = sparsity.SparseEngine(nn.Linear(8, 8), 0.5, grow="gradient", update_interval=1)
print(sorted(m for m in sys.modules if m.startswith("sparse_dm")))
"""


def test_sparsity_works_without_lightning_or_hydra():
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert all(name == "sparse_dm" or name.startswith("sparse_dm.sparsity") for name in loaded), loaded
