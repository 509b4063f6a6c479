"""The node's data directory: where it lives, the node id kept there, and the pid file."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from node.errors import ConfigError

NODE_ID_FILE: Final = "node_id"
PID_FILE: Final = "node.pid"
IPC_FILE: Final = "node.sock"
LOG_FILE: Final = "node.log"
EPOCH_FILE: Final = "epoch"
_IPC_PATH_MAX: Final = 100  # sun_path is 108 bytes on Linux; keep a margin


def default_data_dir() -> Path:
    """``$MESHCTL_DATA_DIR``, else ``$XDG_DATA_HOME/meshctl``, else ``~/.local/share/meshctl``."""
    if env := os.environ.get("MESHCTL_DATA_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "meshctl"


def resolve_data_dir(configured: str) -> Path:
    """The configured data dir, or the default when the config leaves it empty; a path
    that is not UTF-8 is refused (its files were made, then the node failed)."""
    path = Path(configured).expanduser() if configured else default_data_dir()
    try:
        str(path).encode()
    except UnicodeEncodeError:
        raise ConfigError(
            str(path).encode(errors="replace").decode(), "node.data_dir", "not valid UTF-8"
        ) from None
    return path


def prepare(data_dir: Path) -> str | None:
    """Create the data dir, private to its owner (the ipc socket inherits that protection).

    One that exists with looser modes is made private too, and the returned note says so:
    its store.db (event payloads) and node.log were readable by every local user
    (exploratory test)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise ConfigError(str(data_dir), "node.data_dir", f"cannot create: {e.strerror}") from None
    if not os.access(data_dir, os.W_OK):
        raise ConfigError(str(data_dir), "node.data_dir", "not writable")
    st = data_dir.stat()
    if not st.st_mode & 0o077:
        return None
    mode = f"{stat.S_IMODE(st.st_mode):04o}"
    # Only a directory that is the node's alone: /tmp (sticky), a home or any directory
    # with other files in it would have been locked for everyone else (review).
    ours = not st.st_mode & stat.S_ISVTX and (
        (data_dir / NODE_ID_FILE).exists() or not any(data_dir.iterdir())
    )
    if not ours or st.st_uid != os.getuid():
        return f"{data_dir} is open to other users (mode {mode}): use a private data dir"
    try:
        data_dir.chmod(0o700)
    except OSError:
        return None
    return f"made {data_dir} private (it was {mode}; now 0700)"


def ipc_endpoint(data_dir: Path) -> str:
    """The ``ipc://`` endpoint in ``data_dir``; refuses paths the kernel would truncate."""
    path = (data_dir / IPC_FILE).resolve()
    if len(str(path)) > _IPC_PATH_MAX:
        raise ConfigError(
            str(data_dir),
            "node.data_dir",
            f"ipc socket path is {len(str(path))} characters, over the "
            f"{_IPC_PATH_MAX} the kernel allows; use a shorter data dir or "
            "set listen.ipc = false",
        )
    return f"ipc://{path}"


def load_or_create_node_id(data_dir: Path) -> str:
    """The node's permanent id: 16 hex digits made once and kept in the data dir."""
    path = data_dir / NODE_ID_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        node_id = secrets.token_hex(8)
        write_whole(path, node_id + "\n")  # an empty file after a power cut: "corrupt"
        return node_id
    if len(text) != 16 or any(c not in "0123456789abcdef" for c in text):
        raise ConfigError(
            str(path), "", f"corrupt node id {text[:40]!r}; delete the file to make a new one"
        )
    return text


def read_pid(data_dir: Path) -> int | None:
    """The pid of the node running in ``data_dir``, or None.

    The pid file is also the node's lock: the node holds an exclusive ``flock`` on it
    while it runs, and the kernel drops the lock when the process dies, however it dies.
    A live pid alone proved nothing: after a ``kill -9`` the file stayed, its pid was
    reused (a reboot, a wrap), ``up`` refused to start and ``down`` sent SIGTERM to that
    other process (exploratory test)."""
    try:
        fd = os.open(data_dir / PID_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a node runs here
            for _ in range(50):  # it writes its pid right after it locks (a tiny window)
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                if text.isdigit():
                    return int(text)
                time.sleep(0.01)
            return None
        return None  # nobody holds it: what it says is stale
    finally:
        os.close(fd)


_claimed: dict[Path, int] = {}  # data dir -> the locked pid file's descriptor


def write_pid(data_dir: Path) -> None:
    """Claim the data dir for this process (lock the pid file, then write our pid);
    refuses when another live node holds it."""
    fd = os.open(data_dir / PID_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    for _ in range(100):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        try:  # a shared lock too? then only read_pid's probe holds it, for microseconds
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # a node holds it
            os.close(fd)
            other = read_pid(data_dir)
            raise ConfigError(
                str(data_dir),
                "node.data_dir",
                f"a node is already running here (pid {other or '?'}); stop it with "
                "`meshctl down` or pick another --data-dir",
            ) from None
        fcntl.flock(fd, fcntl.LOCK_UN)  # a probe refused a starting node (review): again
        time.sleep(0.005)
    else:
        os.close(fd)
        raise ConfigError(str(data_dir), "node.data_dir", "its pid file stays locked")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _claimed[data_dir] = fd


def remove_pid(data_dir: Path) -> None:
    """Release the data dir: empty the pid file, then unlock it. The file stays: one
    unlinked while another process waited on it would let two nodes lock two files."""
    fd = _claimed.pop(data_dir, None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)


def next_epoch(data_dir: Path, wall_ns: int) -> int:
    """This run's epoch: the wall clock, but always above the last run's, so a node whose
    clock went back (no RTC, before NTP) still supersedes its old announcements."""
    path = data_dir / EPOCH_FILE
    try:
        last = int(path.read_text().strip())
    except (OSError, ValueError):
        last = 0
    epoch = max(wall_ns, last + 1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{epoch}\n")
    tmp.replace(path)
    return epoch


def uplink_cursor_path(data_dir: Path) -> Path:
    """Where the uplink records the last log sequence the cloud acknowledged."""
    return data_dir / "uplink.cursor"


def bridge_cursor_path(data_dir: Path, name: str) -> Path:
    """Where a bridge records the last log sequence its broker acknowledged."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return data_dir / f"bridge-{safe}.cursor"


def read_cursor(path: Path) -> int | None:
    """The sequence in a cursor file; None when there is none (or it is unreadable)."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def write_cursor(path: Path, seq: int) -> None:
    """Atomically: a crash leaves the old cursor or the new one, never half of one.

    The new file's bytes reach the disk before the rename: after a power cut a renamed but
    empty cursor would read as none, and a bridge would start at the log's head, skipping
    what it had not sent yet. (The rename itself may be lost: then the old cursor stands
    and the far side gets some events again, which it drops as duplicates.)"""
    write_whole(path, f"{seq}\n", sync_dir=False)


def write_whole(path: Path, text: str, *, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``text`` whole, 0600 from its first byte (no window with
    looser modes), its bytes and the rename on the disk before it returns: after a crash or
    a power cut the old file or the new one, never a truncated one that stops the node at
    every start. The data dir's one writer of state files (ids, cursors, membership).

    The temporary file's name is the writer's own: the node and a `meshctl` command both
    write revoked.json, and with one shared ``NAME.tmp`` each could rename the other's
    half-written file into place. ``sync_dir=False`` skips the directory's sync, for a
    cursor written at every acknowledgement: a rename lost to a power cut there only
    sends a few events again, and at-least-once allows that."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp: 0600 from the first byte
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable: without it a power cut may undo it."""
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # a directory that cannot be opened for reading: the rename stands as is
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the file itself is synced
    finally:
        os.close(dfd)


@contextlib.contextmanager
def locked(path: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock for a read-modify-write of ``path`` (the node and `meshctl
    revoke` both add to revoked.json; unlocked, one of two additions could be lost).

    ``timeout``: give up after that long with TimeoutError. The node's loop passes one:
    a command stopped inside the lock (Ctrl-Z) froze the whole node (review)."""
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"{path.name} is locked by another command") from None
                    time.sleep(0.005)
        yield
    finally:
        os.close(fd)  # closing releases the lock
