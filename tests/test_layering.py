"""The architecture, enforced: node <- edge <- meshctl, and pure cores import no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = [
    "edge/mapping.py",
    "node/topics.py",
    "node/codec.py",
    "node/events.py",
    "node/mesh.py",
    "node/routing.py",
    "node/dedup.py",
    "node/views.py",
    "node/framing.py",
    "node/router.py",
    "node/config.py",
    "node/errors.py",
    "node/membership.py",
]
IO_MODULES = {
    "zmq",
    "zeroconf",
    "sqlite3",
    "threading",
    "socket",
    "time",
    "select",
    "asyncio",
    "subprocess",
    "os",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "node").rglob("*.py")), ids=lambda p: p.name)
def test_node_imports_neither_edge_nor_meshctl(path: Path) -> None:
    bad = {m for m in _imports(path) if m.split(".")[0] in {"edge", "meshctl"}}
    assert not bad, f"{path.name} imports {bad}: node must not depend on edge or meshctl"


@pytest.mark.parametrize("path", sorted((ROOT / "edge").rglob("*.py")), ids=lambda p: p.name)
def test_edge_does_not_import_meshctl(path: Path) -> None:
    bad = {m for m in _imports(path) if m.split(".")[0] == "meshctl"}
    assert not bad, f"{path.name} imports {bad}: edge must not depend on meshctl"


@pytest.mark.parametrize("rel", PURE)
def test_pure_cores_import_no_io(rel: str) -> None:
    bad = {m for m in _imports(ROOT / rel) if m.split(".")[0] in IO_MODULES}
    assert not bad, f"{rel} is a pure core but imports {bad}"


def test_every_module_starts_with_a_docstring_and_future_import() -> None:
    missing = []
    for pkg in ("node", "meshctl", "edge"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text())
            if ast.get_docstring(tree) is None:
                missing.append(f"{path.relative_to(ROOT)}: no module docstring")
    assert not missing, "\n".join(missing)
