"""The architecture, enforced: node <- client library <- edge <- CLI, and pure cores import
no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = [
    "edge/mapping.py",
    "edge/bridge_headers.py",
    "edge/mqtt_codec.py",
    "edge/mqtt_commit.py",
    "edge/mqtt_session.py",
    "edge/mqtt_retain.py",
    "node/topics.py",
    "node/codec.py",
    "node/events.py",
    "node/mesh.py",
    "node/routing.py",
    "node/dedup.py",
    "node/drops.py",
    "node/views.py",
    "node/framing.py",
    "node/router.py",
    "node/router_mesh.py",
    "node/router_durable.py",
    "node/sessions.py",
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


# An edge actor may be a client of a node like any application (the uplink is one): the
# public client library is open to it. The CLI and everything else in meshctl are not.
CLIENT_LIBRARY = {"meshctl.client", "meshctl.errors"}


@pytest.mark.parametrize("path", sorted((ROOT / "edge").rglob("*.py")), ids=lambda p: p.name)
def test_edge_uses_at_most_the_client_library_of_meshctl(path: Path) -> None:
    bad = {m for m in _imports(path) if m.split(".")[0] == "meshctl" and m not in CLIENT_LIBRARY}
    assert not bad, f"{path.name} imports {bad}: edge may use only meshctl's client library"


def test_the_client_library_does_not_import_the_cli_or_edge() -> None:
    for rel in ("meshctl/client.py", "meshctl/errors.py", "meshctl/url.py"):
        bad = {m for m in _imports(ROOT / rel) if m.startswith(("meshctl.cli", "edge"))}
        assert not bad, f"{rel} imports {bad}: the client library sits below edge and the CLI"


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
