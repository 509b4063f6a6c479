"""Fixtures for the netns lab: real meshctl nodes inside throwaway network namespaces.

The lab (``../shared/lab``, or ``MESH_LAB_DIR``) gives hosts ``<prefix>-h1..hN`` on a private
bridge with real multicast, addresses 10.250.0.1..N and no default route. Every node and
every client runs inside a lab host; nothing with mDNS on is ever started in the root
namespace. Processes are stopped by their own PID, then ``lab.down()`` removes the hosts.

Without a usable lab (not root, no netns) the tests are skipped with the reason; with
``CI=true`` that is a failure instead, so CI cannot silently lose them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

LAB_DIR = Path(
    os.environ.get("MESH_LAB_DIR", Path(__file__).resolve().parents[3] / "shared" / "lab")
)
if (LAB_DIR / "labhelpers.py").exists():
    sys.path.insert(0, str(LAB_DIR))
    import labhelpers as lh
else:  # pragma: no cover - depends on the machine
    lh = None

CLI = (sys.executable, "-m", "meshctl")
FAST_CONFIG = '[mesh]\nheartbeat = "200ms"\ndead_after = "1s"\nbackoff_max = "1s"\n'
T = TypeVar("T")


def wait_for(condition: Callable[[], T], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"netns lab unavailable under CI=true: {reason}", pytrace=False)
    pytest.skip(f"netns lab unavailable: {reason}")


@pytest.fixture(scope="session")
def lab_ok() -> None:
    """Skip (or, with CI=true, fail) when network-namespace labs cannot be built here."""
    if lh is None:
        _unavailable(f"lab scripts not found at {LAB_DIR} (set MESH_LAB_DIR)")
    ok, why = lh.lab_available()
    if not ok:
        _unavailable(why)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """Remember the call phase's outcome so the fixture can show node logs on failure."""
    report = yield
    if report.when == "call":
        item.lab_call_failed = report.failed  # type: ignore[attr-defined]
    return report


class Bg:
    """A background client inside a lab host; reader threads collect its output with the
    monotonic time each line arrived."""

    def __init__(self, proc: subprocess.Popen[bytes], argv: list[str]) -> None:
        self.proc = proc
        self.argv = argv
        self.pid = proc.pid
        self._cond = threading.Condition()
        self.out: list[tuple[float, str]] = []
        self.err: list[tuple[float, str]] = []
        self._readers = [
            threading.Thread(target=self._read, args=(proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(proc.stderr, self.err), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read(self, pipe: Any, sink: list[tuple[float, str]]) -> None:
        for raw in iter(pipe.readline, b""):
            with self._cond:
                sink.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip("\n")))
                self._cond.notify_all()
        pipe.close()
        with self._cond:
            self._cond.notify_all()

    @property
    def lines(self) -> list[str]:
        with self._cond:
            return [line for _, line in self.out]

    @property
    def stderr(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.err)

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\nexit {self.proc.poll()}\n--- stdout\n"
            + "\n".join(self.lines[-20:])
            + f"\n--- stderr\n{self.stderr}"
        )

    def _wait(self, found: Callable[[], float | None], timeout: float, what: str) -> float:
        deadline = time.monotonic() + timeout
        with self._cond:
            while (at := found()) is None:
                done = self.proc.poll() is not None and not any(t.is_alive() for t in self._readers)
                if done:
                    raise AssertionError(f"exited while waiting for {what}\n{self.describe()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout:g}s waiting for {what}\n{self.describe()}"
                    )
                self._cond.wait(min(left, 0.1))
            return at

    def wait_stderr(self, text: str, timeout: float = 10) -> float:
        """Wait for ``text`` on stderr; returns the monotonic time its line arrived."""
        return self._wait(
            lambda: next((t for t, line in self.err if text in line), None),
            timeout,
            f"{text!r} on stderr",
        )

    def wait_line(self, timeout: float = 10) -> tuple[float, str]:
        """Wait for the first stdout line; returns (arrival time, line)."""
        self._wait(lambda: self.out[0][0] if self.out else None, timeout, "a stdout line")
        with self._cond:
            return self.out[0]

    def wait_exit(self, timeout: float = 10) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not exit within {timeout:g}s\n{self.describe()}") from None
        for t in self._readers:
            t.join(5)
        assert "Traceback" not in self.stderr, self.describe()
        return rc

    def stop(self) -> None:
        lh.stop_pid(self.proc)
        for t in self._readers:
            t.join(2)


class Node:
    """One ``meshctl up`` inside lab host ``index``."""

    def __init__(
        self, index: int, name: str, data_dir: Path, log_path: Path, proc: subprocess.Popen[bytes]
    ) -> None:
        self.index, self.name, self.data_dir, self.log_path, self.proc = (
            index,
            name,
            data_dir,
            log_path,
            proc,
        )

    @property
    def sock(self) -> Path:
        return self.data_dir / "node.sock"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class MeshLab:
    """A netns lab of ``n`` hosts plus the meshctl processes a test starts in it."""

    def __init__(self, n: int) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="meshlab-", dir="/tmp"))
        self.config = self.root / "fast.toml"
        self.config.write_text(FAST_CONFIG)
        (self.root / "home").mkdir()
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("MESHCTL_", "XDG_", "PYTEST_"))
        }
        self.env.update(
            {
                "HOME": str(self.root / "home"),
                "NO_COLOR": "1",
                "COLUMNS": "200",
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.nodes: dict[int, Node] = {}
        self.clients: list[Bg] = []
        self.lab = lh.Lab(n=n, prefix="t" + uuid.uuid4().hex[:8])

    # ---- nodes -----------------------------------------------------------------------------

    def start(
        self,
        i: int,
        *,
        mesh: str,
        name: str | None = None,
        secure: bool = False,
        extra: tuple[str, ...] = (),
        data_dir: Path | None = None,
    ) -> Node:
        """``meshctl up`` in host i with only a name, data dir, mesh and the fast config;
        open mode (--insecure) unless ``secure``: the mesh tests are about routing."""
        name = name or f"h{i}"
        data_dir = data_dir or self.root / f"h{i}"
        log_path = self.root / f"h{i}.log"
        argv = [
            *CLI,
            "up",
            "--name",
            name,
            "--data-dir",
            str(data_dir),
            "--mesh",
            mesh,
            "--config",
            str(self.config),
            *([] if secure else ["--insecure"]),
            *extra,
        ]
        with log_path.open("wb") as log:
            proc = self.lab.popen(
                i,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        node = Node(i, name, data_dir, log_path, proc)
        self.nodes[i] = node
        return node

    def wait_ready(self, i: int, timeout: float = 10) -> Node:
        node = self.nodes[i]

        def ready() -> bool:
            assert node.proc.poll() is None, f"node h{i} exited:\n{node.log()}"
            return "listening on" in node.log() and node.sock.exists()

        wait_for(ready, timeout=timeout, what=f"node h{i} to listen", interval=0.02)
        return node

    # ---- clients (always inside the host, over the node's ipc socket) --------------------

    def cli(self, i: int, *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
        argv = [*CLI, *args, "-s", str(self.nodes[i].data_dir)]
        done = self.lab.run(
            i,
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert "Traceback" not in done.stderr, done.stderr
        return done

    def view(self, i: int, *args: str) -> Any:
        """``meshctl ARGS --json`` in host i: the parsed NDJSON lines or JSON object."""
        import json

        done = self.cli(i, *args, "--json")
        assert done.returncode == 0, f"h{i}: meshctl {' '.join(args)}: {done.stderr}"
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        return lines if args[0] == "peers" else lines[0]

    def peers_up(self, i: int) -> set[str]:
        return {p["name"] for p in self.view(i, "peers") if p["state"] == "up"}

    def reachable(self, i: int) -> set[str]:
        return {
            n["name"] for n in self.view(i, "mesh")["nodes"] if n["reachable"] and not n["self"]
        }

    def wait_links(self, i: int, names: set[str], timeout: float) -> None:
        wait_for(
            lambda: self.peers_up(i) == names,
            timeout=timeout,
            interval=0.1,
            what=f"h{i} to have links up to exactly {sorted(names)} (log:\n{self.nodes[i].log()})",
        )

    def wait_interest(self, i: int, topic: str, node_name: str, timeout: float = 5) -> None:
        """Until host i routes ``topic`` to ``node_name`` (the subscriber's interest arrived):
        ``subscribed:`` is confirmed by the subscriber's own node only."""

        def arrived() -> bool:
            remote = self.view(i, "routes", topic)["remote"]
            return any(r["name"] == node_name and r["reachable"] for r in remote)

        wait_for(
            arrived, timeout=timeout, interval=0.05, what=f"h{i} to route {topic} to {node_name}"
        )

    def spawn(self, i: int, *args: str) -> Bg:
        bg = self.spawn_raw(i, [*CLI, *args, "-s", str(self.nodes[i].data_dir)])
        bg.argv = bg.argv[2:]
        return bg

    def spawn_raw(self, i: int, argv: list[str]) -> Bg:
        """Any program in host i (not meshctl), watched like a client and stopped by PID."""
        proc = self.lab.popen(
            i,
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        bg = Bg(proc, argv)
        self.clients.append(bg)
        return bg

    def ctl(self, *args: str) -> str:
        return self.lab.ctl(*args)

    # ---- teardown --------------------------------------------------------------------------

    def close(self, failed: bool) -> list[str]:
        """Stop everything by PID, remove the lab; returns node logs holding a traceback."""
        try:
            for bg in reversed(self.clients):
                bg.stop()
            for node in reversed(self.nodes.values()):
                lh.stop_pid(node.proc, timeout=5)
        finally:
            self.lab.down()
        bad = []
        for node in self.nodes.values():
            text = node.log()
            if failed:
                print(f"--- node h{node.index} log ({node.log_path})\n{text}")
            if "Traceback" in text:
                bad.append(f"h{node.index}:\n{text}")
        shutil.rmtree(self.root, ignore_errors=True)
        return bad


@pytest.fixture
def make_lab(lab_ok: None, request: pytest.FixtureRequest) -> Iterator[Callable[[int], MeshLab]]:
    """``make_lab(n)``: a fresh lab of n hosts for this test, always torn down."""
    labs: list[MeshLab] = []

    def make(n: int) -> MeshLab:
        labs.append(MeshLab(n))
        return labs[-1]

    try:
        yield make
    finally:
        failed = getattr(request.node, "lab_call_failed", True)
        bad = [log for lab in labs for log in lab.close(failed)]
    assert not bad, "a node logged a traceback:\n" + "\n".join(bad)


@pytest.fixture
def mesh_name() -> str:
    """A mesh name of this test only, so no other lab's node can join by accident."""
    return f"lab-{uuid.uuid4().hex[:10]}"
