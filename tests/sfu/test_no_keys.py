"""The SFU cannot decrypt because nothing under sfu/ (or the SFU tests' clients) imports keys."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("mls", "e2ee_media")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside sfu/ stays inside sfu/
                names.add("sfu." + (node.module or ""))
            elif node.module:
                names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            names.update(a.value for a in node.args if isinstance(a, ast.Constant))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            names.update(a.value for a in node.args if isinstance(a, ast.Constant))
    return names


FILES = sorted((ROOT / "sfu").rglob("*.py")) + sorted((ROOT / "tests" / "sfu").rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_key_material_imports(path: Path) -> None:
    for name in _imports(path):
        top = str(name).split(".")[0]
        assert top not in FORBIDDEN, f"{path.relative_to(ROOT)} imports {name}"


def test_scanner_finds_forbidden_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import mls.group\nfrom e2ee_media import sframe\n__import__('mls')\n")
    assert {"mls.group", "e2ee_media", "mls"} <= _imports(bad)


def test_sfu_package_is_scanned() -> None:
    names = {p.name for p in FILES}
    assert {"forwarding.py", "room.py", "server.py", "aiortc_hooks.py"} <= names
