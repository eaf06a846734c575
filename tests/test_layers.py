"""DESIGN.md's layering: each top-level package imports only the packages below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Top to bottom; a package may import only those after it in this list.
LAYERS = ["conclave", "delivery_service", "sfu", "e2ee_media", "mls"]
FORBIDDEN_EXTRA = {
    # The SFU must not be able to decrypt: no MLS and no SFrame code, whatever the order says.
    "sfu": {"mls", "e2ee_media"},
}


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", LAYERS)
def test_package_imports_only_lower_layers(package: str) -> None:
    allowed = set(LAYERS[LAYERS.index(package) + 1 :]) - FORBIDDEN_EXTRA.get(package, set())
    forbidden = set(LAYERS) - allowed - {package}
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_top_levels(path) & forbidden
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "layering broken:\n" + "\n".join(offenders)


def test_layer_check_detects_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom mls.group import Group\nimport e2ee_media.sframe as s\n")
    assert imported_top_levels(module) == {"os", "mls", "e2ee_media"}
