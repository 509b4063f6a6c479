"""Which node a client talks to: ``-s/--server``, ``$MESHCTL_SERVER``, or the local node."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Final

from node.config import DEFAULT_PORT
from node.datadir import IPC_FILE, NODE_ID_FILE, default_data_dir
from node.errors import InputError

_HOST_PORT: Final = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+)(?::(?P<port>\d+))?$")


def default_server() -> str:
    """The local node: its ipc socket when the default data dir has one, else TCP loopback."""
    sock = default_data_dir() / IPC_FILE
    if sock.exists():
        return f"ipc://{sock}"
    return f"tcp://127.0.0.1:{DEFAULT_PORT}"


def resolve_server(url: str | None) -> str:
    """A ZeroMQ endpoint from what the user typed; InputError (exit 2) if it is not one.

    Accepted: ``tcp://host:port``, ``host:port``, ``host`` (default port), ``ipc:///path``,
    and a node's data directory (its ``node.sock`` is used).
    """
    text = (url or os.environ.get("MESHCTL_SERVER") or "").strip()
    if not text:
        return default_server()
    try:
        text.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8 (argv keeps them as surrogates)
        raise InputError(f"server {text!r} is not valid UTF-8") from None
    if text.startswith("ipc://"):
        if len(text) <= len("ipc://"):
            raise InputError(f"server {text!r}: ipc:// needs a socket path")
        return text
    if text.startswith("tcp://"):
        rest = text[len("tcp://") :]
    elif "://" in text:
        raise InputError(f"server {text!r}: use tcp://host:port, host:port or ipc:///path")
    else:
        # A bare name that is a node's data dir here (it holds a node socket): "-s edge"
        # after "meshctl up --data-dir edge" meant it, not a host called edge (session 9);
        # any directory named like a host (review: ./localhost) stays a host.
        if text.startswith(("/", ".", "~")) or (":" not in text and _holds_socket(text)):
            try:
                path = Path(text).expanduser()
            except RuntimeError as e:  # ~user that does not exist
                raise InputError(f"server {text!r}: {e}") from None
            return f"ipc://{(path / IPC_FILE) if path.is_dir() else path}"
        rest = text
    m = _HOST_PORT.match(rest)
    if not m:
        raise InputError(
            f"server {text!r} is not host:port (example: tcp://127.0.0.1:{DEFAULT_PORT})"
        )
    port = int(m.group("port") or DEFAULT_PORT)
    if not 0 < port < 65536:
        raise InputError(f"server {text!r}: port {port} is outside 1-65535")
    return f"tcp://{m.group('host')}:{port}"


def _holds_socket(text: str) -> bool:
    """Whether ``text`` names a node's data dir: one with a node socket, or with a node id
    (its node is stopped: the socket goes with it, and "-s edge" then meant a host called
    edge). A name too long for a path is none ("internal error: File name too long")."""
    try:
        return Path(text, IPC_FILE).exists() or Path(text, NODE_ID_FILE).exists()
    except (OSError, ValueError):
        return False
