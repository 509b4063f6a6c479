"""Shared fixtures: a real node on ephemeral endpoints, always stopped, its log shown on failure."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from helpers import (
    Background,
    NodeFactory,
    NodeProcess,
    remove_sandbox,
    sandbox,
    start_node,
)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """Remember each phase's report on the item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


@pytest.fixture(scope="session", autouse=True)
def _isolated_home() -> Iterator[Path]:
    """One private HOME/XDG tree for every child process of the session, removed afterwards."""
    yield sandbox()
    remove_sandbox()


@pytest.fixture
def make_node(
    tmp_path: Path, request: pytest.FixtureRequest, short_tmp: Path
) -> Iterator[NodeFactory]:
    """Start nodes (optionally with a config or a given data dir); all stopped after the test,
    and their logs printed if it failed.

    It asks for ``short_tmp`` so that the nodes stop before that directory is removed: a
    test that asked for ``make_node`` first had its nodes' data dirs deleted under them
    (an uplink's cursor write failed: the "traceback in the log" teardown error seen once
    in a while since session 8)."""
    del short_tmp  # only its order matters
    started: list[NodeProcess] = []

    def make(
        *,
        config_text: str | None = None,
        name: str = "e2e",
        data_dir: Path | None = None,
        secure: bool = False,
        extra_args: Iterable[str] = (),
        open_files: int | None = None,
    ) -> NodeProcess:
        proc = start_node(
            tmp_path,
            config_text=config_text,
            name=name,
            data_dir=data_dir,
            secure=secure,
            extra_args=extra_args,
            open_files=open_files,
        )
        started.append(proc)
        return proc

    try:
        yield make
    finally:
        for proc in reversed(started):
            proc.stop()
        if _failed(request):
            for proc in started:
                print(f"--- node log ({proc.log_path})\n{proc.log_text()}")
    for proc in started:
        assert "Traceback" not in proc.log_text(), (
            f"the node logged a traceback:\n{proc.log_text()}"
        )


@pytest.fixture
def node(make_node: NodeFactory) -> NodeProcess:
    """A fresh node on 127.0.0.1 port 0 and ipc:// in its data dir; stopped after the test."""
    return make_node()


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for a module's read-mostly tests (bad input, config): saves a start per test."""
    proc = start_node(tmp_path_factory.mktemp("shared"), name="shared")
    try:
        yield proc
    finally:
        proc.stop()
    assert "Traceback" not in proc.log_text(), proc.log_text()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory (ipc socket paths are limited to ~100 characters), removed after."""
    path = Path(tempfile.mkdtemp(prefix="mesh-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def bg() -> Iterator[Background]:
    """Background `sub`/`reply`/`tail` processes, killed by PID after the test."""
    group = Background()
    try:
        yield group
    finally:
        group.stop_all()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI (CI=true, root, everything installed by scripts/test) a skip hides a test that
    stopped running: fail the session instead, naming each skipped test and why."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        for rep in skipped:
            reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else rep.longrepr
            print(f"\nCI forbids skips: {rep.nodeid}: {reason}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
