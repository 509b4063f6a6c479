"""Helpers for end-to-end tests: real ``meshctl`` processes, clean environments, deadlines.

Every wait here polls a condition against a deadline and fails loudly with what it saw;
nothing sleeps as a means of synchronisation. Processes are stopped by their own PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

CLI: Final = (sys.executable, "-m", "meshctl")
POLL_INTERVAL: Final = 0.02
IPC_PATH_MAX: Final = 90  # the node refuses ipc paths over 100 characters; keep a margin
T = TypeVar("T")

_sandbox: Path | None = None


def sandbox() -> Path:
    """A private HOME/XDG tree for every child process, so no user config or node is used."""
    global _sandbox  # noqa: PLW0603 - one sandbox per test session, removed by conftest
    if _sandbox is None:
        _sandbox = Path(tempfile.mkdtemp(prefix="meshctl-e2e-"))
        for sub in ("home", "config", "data", "state"):
            (_sandbox / sub).mkdir()
    return _sandbox


def remove_sandbox() -> None:
    """Delete the sandbox made by ``sandbox()`` (called once at the end of the session)."""
    global _sandbox  # noqa: PLW0603
    if _sandbox is not None:
        shutil.rmtree(_sandbox, ignore_errors=True)
        _sandbox = None


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: no MESHCTL_* from outside, HOME/XDG in the sandbox."""
    box = sandbox()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MESHCTL_", "XDG_", "PYTEST_", "COV_"))
    }
    env.update(
        {
            "HOME": str(box / "home"),
            "XDG_CONFIG_HOME": str(box / "config"),
            "XDG_DATA_HOME": str(box / "data"),
            "XDG_STATE_HOME": str(box / "state"),
            "MESHCTL_DATA_DIR": str(box / "data" / "meshctl"),
            "NO_COLOR": "1",
            "COLUMNS": "200",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    env.update(extra or {})
    return env


def wait_for(
    condition: Callable[[], T], *, timeout: float, what: str, interval: float = POLL_INTERVAL
) -> T:
    """Poll ``condition`` until it returns something truthy; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def free_tcp_port() -> int:
    """A TCP port that nothing listens on right now (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clip(text: str, width: int = 200) -> str:
    return text if len(text) <= width else f"{text[:width]}... ({len(text)} chars)"


def assert_no_traceback(stderr: str, what: str) -> None:
    """The CLI contract: errors are one line, never a Python traceback."""
    assert "Traceback" not in stderr, f"{what} printed a traceback:\n{stderr}"


def unavailable(why: str) -> None:
    """Skip the test with the reason; in CI (CI=true) fail instead: there everything a test
    needs is installed or created by scripts/test, so a skip would hide a gap."""
    import pytest

    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(why)
    pytest.skip(why)


def need_binary(binary: str) -> None:
    """Skip (CI: fail) a test whose program is missing, with the reason."""
    if shutil.which(binary) is None:
        unavailable(f"{binary} is not installed (scripts/test installs it as root)")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def kill_pid(pid: int) -> None:
    """SIGKILL one process by id, ignoring one that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ---- one-shot CLI runs ----------------------------------------------------------------------


class CliResult(subprocess.CompletedProcess[str]):
    """A finished ``meshctl`` run: text stdout/stderr, the raw stdout bytes and wall time."""

    def __init__(
        self, args: Sequence[str], returncode: int, stdout: bytes, stderr: bytes, elapsed: float
    ) -> None:
        super().__init__(
            list(args),
            returncode,
            stdout.decode("utf-8", "replace"),
            stderr.decode("utf-8", "replace"),
        )
        self.stdout_bytes = stdout
        self.elapsed = elapsed

    @property
    def err_lines(self) -> list[str]:
        """Non-empty stderr lines."""
        return [line for line in self.stderr.splitlines() if line.strip()]

    @property
    def out_lines(self) -> list[str]:
        """stdout lines (without line ends)."""
        return self.stdout.splitlines()

    def json_lines(self) -> list[dict[str, Any]]:
        """stdout parsed as NDJSON."""
        return [json.loads(line) for line in self.out_lines if line.strip()]

    def describe(self) -> str:
        """Everything about the run, for assertion messages."""
        return (
            f"$ {' '.join(self.args[2:])}\nexit {self.returncode} after {self.elapsed:.2f}s\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


def assert_one_line_error(result: CliResult, code: int) -> None:
    """Exit ``code``, exactly one 'error: ...' line on stderr."""
    assert result.returncode == code, result.describe()
    assert len(result.err_lines) == 1, result.describe()
    assert result.err_lines[0].startswith("error: "), result.describe()
    assert "internal error" not in result.stderr, result.describe()


def run_cli(
    *args: str,
    server: str | None = None,
    input: bytes | str | None = None,
    timeout: float = 15,
    env: Mapping[str, str] | None = None,
) -> CliResult:
    """Run ``python -m meshctl ARGS [--server URL]`` in a clean environment and wait for it."""
    argv = [*CLI, *args]
    if server is not None:
        argv += ["--server", server]
    data = input.encode() if isinstance(input, str) else input
    start = time.monotonic()
    done = subprocess.run(
        argv,
        input=data,
        capture_output=True,
        timeout=timeout,
        check=False,
        env=cli_env(env),
        stdin=None if data is not None else subprocess.DEVNULL,
    )
    result = CliResult(argv, done.returncode, done.stdout, done.stderr, time.monotonic() - start)
    assert_no_traceback(result.stderr, result.describe())
    return result


# ---- background CLI processes ---------------------------------------------------------------


def run_up_refused(config: Path, data_dir: Path) -> CliResult:
    """`meshctl up` on loopback with ``config``, for tests of what it refuses at start."""
    return run_cli(
        "up", "--no-discovery", "--port", "0", "--listen", "127.0.0.1",
        "--data-dir", str(data_dir), "--config", str(config), timeout=30,
    )  # fmt: skip


class SubProcess:
    """A background ``meshctl sub``/``reply``/``tail``: collects its output in reader threads.

    ``start`` returns once the process has printed its ready line (``subscribed:``) on
    stderr, so a test may publish right away. ``stop`` kills it by PID and joins the readers.
    """

    def __init__(self, argv: list[str], env: Mapping[str, str] | None = None) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(env),
        )
        self.pid = self.proc.pid
        self._cond = threading.Condition()
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self._readers = [
            threading.Thread(
                target=self._read,
                args=(self.proc.stdout, self._out),
                name=f"sub-{self.pid}-out",
                daemon=True,
            ),
            threading.Thread(
                target=self._read,
                args=(self.proc.stderr, self._err),
                name=f"sub-{self.pid}-err",
                daemon=True,
            ),
        ]
        for t in self._readers:
            t.start()

    @classmethod
    def start(
        cls,
        *args: str,
        server: str | None,
        ready: str | None = "subscribed:",
        timeout: float = 10,
        env: Mapping[str, str] | None = None,
    ) -> SubProcess:
        """Spawn ``meshctl ARGS --server URL`` and wait for ``ready`` on its stderr."""
        argv = [*CLI, *args]
        if server is not None:
            argv += ["--server", server]
        proc = cls(argv, env)
        if ready is not None:
            try:
                proc.wait_stderr(ready, timeout=timeout)
            except BaseException:
                proc.stop()
                raise
        return proc

    def _read(self, pipe: Any, sink: list[bytes]) -> None:
        for line in iter(pipe.readline, b""):
            with self._cond:
                sink.append(line)
                self._cond.notify_all()
        pipe.close()
        with self._cond:
            self._cond.notify_all()

    # ---- what it printed

    @property
    def raw_lines(self) -> list[bytes]:
        """stdout lines as bytes, without the line end."""
        with self._cond:
            return [line.rstrip(b"\n") for line in self._out]

    @property
    def lines(self) -> list[str]:
        """stdout lines as text."""
        return [line.decode("utf-8", "replace") for line in self.raw_lines]

    @property
    def stderr(self) -> str:
        """Everything printed on stderr so far."""
        with self._cond:
            return b"".join(self._err).decode("utf-8", "replace")

    def json_lines(self) -> list[dict[str, Any]]:
        """stdout parsed as NDJSON (``--json``)."""
        return [json.loads(line) for line in self.lines if line.strip()]

    def describe(self) -> str:
        """Command, state and output, for assertion messages."""
        rc = self.proc.poll()
        out = "\n".join(_clip(line) for line in self.lines[-20:])
        return (
            f"$ {' '.join(self.argv[2:])}\nexit {rc}\n--- stdout (last 20 of "
            f"{len(self.raw_lines)})\n{out}\n--- stderr\n{self.stderr}"
        )

    # ---- waiting

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait on the reader threads' condition until ``predicate`` holds; fail at the
        deadline, or at once when the process has exited and all its output is read."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                if self.proc.poll() is not None and not self._readers_alive():
                    raise AssertionError(
                        f"process exited while waiting for {what}\n{self.describe()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout:g}s waiting for {what}\n{self.describe()}"
                    )
                self._cond.wait(min(left, 0.1))  # 0.1: also notice the process exiting

    def wait_stderr(self, text: str, *, timeout: float = 10) -> None:
        """Wait until ``text`` appears on stderr; fail early if the process exits first."""
        needle = text.encode()
        self._wait(lambda: needle in b"".join(self._err), timeout, f"{text!r} on stderr")

    def wait_lines(self, count: int, *, timeout: float = 10) -> list[str]:
        """Wait until at least ``count`` stdout lines have arrived; return all lines."""
        self._wait(lambda: len(self._out) >= count, timeout, f"{count} stdout lines")
        return self.lines

    def wait_line(
        self,
        predicate: Callable[[str], bool],
        *,
        timeout: float = 10,
        what: str = "a matching line",
    ) -> str:
        """Wait for a stdout line satisfying ``predicate`` and return it."""

        def find() -> bool:
            return any(predicate(line.decode("utf-8", "replace")) for line in self._out)

        self._wait(find, timeout, what)
        return next(line for line in self.lines if predicate(line))

    def wait_exit(self, timeout: float = 10) -> int:
        """Wait for the process to exit by itself; return its code after reading all output."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"process did not exit within {timeout:g}s\n{self.describe()}"
            ) from None
        self._join_readers(timeout=5)
        assert_no_traceback(self.stderr, self.describe())
        return rc

    def _readers_alive(self) -> bool:
        return any(t.is_alive() for t in self._readers)

    def _join_readers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._readers:
            t.join(max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        """Kill the process by PID (it may be stopped with SIGSTOP) and reap it."""
        if self.proc.poll() is None:
            kill_pid(self.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be ignored
                self.proc.wait(5)
        self._join_readers(timeout=5)
        assert_no_traceback(self.stderr, self.describe())


# ---- a node -----------------------------------------------------------------------------


def short_dir(base: Path, name: str) -> tuple[Path, bool]:
    """``base/name`` when an ipc socket path inside it fits the kernel's limit, else a short
    temporary directory; the flag says whether the caller must delete it."""
    wanted = base / name
    if len(str(wanted.resolve() / "node.sock")) <= IPC_PATH_MAX:
        return wanted, False
    return Path(tempfile.mkdtemp(prefix="mesh-")), True


class NodeProcess:
    """A ``meshctl up`` process on 127.0.0.1 port 0 plus an ipc socket in its data dir."""

    def __init__(
        self, proc: subprocess.Popen[bytes], data_dir: Path, log_path: Path, cleanup_dir: bool
    ) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.data_dir = data_dir
        self.log_path = log_path
        self._cleanup_dir = cleanup_dir
        self.endpoints: list[str] = []
        self.node_id = ""

    @classmethod
    def start(
        cls,
        tmp_path: Path,
        *,
        config_text: str | None = None,
        name: str = "e2e",
        data_dir: Path | None = None,
        discovery: bool = False,
        extra_args: Iterable[str] = (),
        secure: bool = False,
        open_files: int | None = None,
    ) -> NodeProcess:
        """Spawn a node whose data dir is ``data_dir`` or a fresh one under ``tmp_path``
        (``open_files``: its limit on open files, soft and hard).

        mDNS discovery is off unless asked for: a test node must not link up with other
        nodes that happen to run on this host (nor they with it). Nodes run ``--insecure``
        unless ``secure``: most tests are about routing, not membership, and open mode keeps
        them free of credentials; the security tests ask for secured nodes explicitly.
        """
        tmp_path.mkdir(parents=True, exist_ok=True)
        cleanup = False
        if data_dir is None:  # the first node of a test gets `node`, later ones `node-2`, ...
            base, i = "node", 1
            while (tmp_path / base).exists():
                i += 1
                base = f"node-{i}"
            data_dir, cleanup = short_dir(tmp_path, base)
        argv = [
            *CLI,
            "up",
            "--port",
            "0",
            "--listen",
            "127.0.0.1",
            "--data-dir",
            str(data_dir),
            "--name",
            name,
            *([] if discovery else ["--no-discovery"]),
            *([] if secure else ["--insecure"]),
            *extra_args,
        ]
        if config_text is not None:
            config_path = tmp_path / f"{name}.toml"
            config_path.write_text(config_text)
            argv += ["--config", str(config_path)]
        if open_files is not None:  # set, then exec'd: the node keeps this PID
            limit = (
                "import os, resource, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({open_files}, {open_files})); "
                "os.execv(sys.executable, sys.argv[1:])"
            )
            argv = [sys.executable, "-c", limit, *argv]
        log_path = tmp_path / f"{name}-{time.monotonic_ns()}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=cli_env(),
            )
        return cls(proc, data_dir, log_path, cleanup)

    @property
    def ipc(self) -> str:
        """The node's ``ipc://`` endpoint, as its status reports it."""
        return next(e for e in self._ready_endpoints() if e.startswith("ipc://"))

    @property
    def tcp(self) -> str:
        """The node's ``tcp://127.0.0.1:PORT`` endpoint, as its status reports it."""
        return next(e for e in self._ready_endpoints() if e.startswith("tcp://"))

    @property
    def tcp_port(self) -> int:
        """The TCP port the node picked."""
        return int(self.tcp.rsplit(":", 1)[1])

    def _ready_endpoints(self) -> list[str]:
        assert self.endpoints, "call wait_ready() first"
        return self.endpoints

    def wait_ready(self, timeout: float = 10) -> NodeProcess:
        """Poll the node over its ipc socket until it answers STATUS; fail if it exits."""
        sock = self.data_dir / "node.sock"

        def answered() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"node exited with code {self.proc.returncode} before "
                    f"it was ready\n{self.log_text()}"
                )
            if not sock.exists():
                return None
            try:
                return self.status(f"ipc://{sock}", timeout=0.5)
            except Exception:  # still starting: any failure just means "ask again"
                return None

        status = wait_for(answered, timeout=timeout, what=f"node in {self.data_dir} to answer")
        self.endpoints = list(status["endpoints"])
        self.node_id = str(status["id"])
        return self

    def status(self, server: str | None = None, timeout: float = 2.0) -> dict[str, Any]:
        """The node's status, read in-process with the client library (as `status --json`)."""
        from meshctl import connect  # the node's own client: quick, and needs no extra process

        with connect(server or self.ipc, name="e2e probe", timeout=timeout) as client:
            return client.status(timeout=timeout)

    def wait_status(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        timeout: float = 10,
        what: str = "a status condition",
    ) -> dict[str, Any]:
        """Poll the status until ``predicate`` holds; return that status."""
        last: dict[str, Any] = {}

        def check() -> dict[str, Any] | None:
            nonlocal last
            last = self.status()
            return last if predicate(last) else None

        try:
            return wait_for(check, timeout=timeout, what=what, interval=0.05)
        except AssertionError as e:
            raise AssertionError(
                f"{e}\nlast status: {json.dumps(last.get('counters'))}\n{self.log_text()}"
            ) from None

    def log_text(self) -> str:
        """Everything the node logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        """True until the process has exited."""
        return self.proc.poll() is None

    def stop(self, timeout: float = 5) -> int:
        """SIGTERM, wait ``timeout`` s, then SIGKILL by PID; returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                kill_pid(self.pid)
                self.proc.wait(5)
        if self._cleanup_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self._cleanup_dir = False
        return int(self.proc.returncode)


class Background:
    """Background CLI processes of one test; ``stop_all`` kills each by PID."""

    def __init__(self) -> None:
        self.procs: list[SubProcess] = []

    def start(
        self,
        *args: str,
        server: str | None,
        ready: str | None = "subscribed:",
        timeout: float = 10,
        env: Mapping[str, str] | None = None,
    ) -> SubProcess:
        """Start ``meshctl ARGS`` and wait for its ready line (see ``SubProcess.start``)."""
        proc = SubProcess.start(*args, server=server, ready=ready, timeout=timeout, env=env)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        """Kill every process started here, newest first."""
        errors: list[AssertionError] = []
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except AssertionError as e:
                errors.append(e)
        self.procs.clear()
        if errors:
            raise errors[0]


def publish(
    server: str,
    events: Iterable[tuple[str, bytes | str]],
    *,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Publish many events quickly with the client library and wait until the node has them."""
    from meshctl import connect

    with connect(server, name="e2e publisher", timeout=5) as client:
        for topic, data in events:
            client.publish(topic, data, headers)
        client.flush(5)


def start_node(
    tmp_path: Path,
    *,
    config_text: str | None = None,
    name: str = "e2e",
    data_dir: Path | None = None,
    secure: bool = False,
    extra_args: Iterable[str] = (),
    open_files: int | None = None,
) -> NodeProcess:
    """Start a node and wait until it answers; stop it again if it never does."""
    proc = NodeProcess.start(
        tmp_path,
        config_text=config_text,
        name=name,
        data_dir=data_dir,
        secure=secure,
        extra_args=extra_args,
        open_files=open_files,
    )
    try:
        return proc.wait_ready(timeout=10)
    except BaseException:
        proc.stop()
        raise


class NodeFactory(Protocol):
    """The ``make_node`` fixture: start one more node for the current test."""

    def __call__(
        self,
        *,
        config_text: str | None = ...,
        name: str = ...,
        data_dir: Path | None = ...,
        secure: bool = ...,
        extra_args: Iterable[str] = ...,
        open_files: int | None = ...,
    ) -> NodeProcess: ...
