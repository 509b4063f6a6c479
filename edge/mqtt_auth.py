"""MQTT users: names, password hashes and permissions for the node's MQTT listener.

An MQTT 3.1.1 client brings a username and a password in CONNECT and nothing else we
could verify, so on a secured node the listener asks for them, as mosquitto 2 does
(``allow_anonymous false`` unless said otherwise). Each user has the same publish and
subscribe rules as a mesh client identity (node/membership.Permissions), enforced by
the listener before anything reaches the node.

The users live in DATA_DIR/mqtt_users.json (0600), written by ``meshctl mqtt passwd``.
The listener looks at the file's mtime at each CONNECT and re-reads it when it changed,
so adding or removing a user needs no restart. Passwords are hashed with scrypt
(stdlib ``hashlib``; 16 MiB and ~40 ms a check, which is the point), in a worker thread
of the listener so that a flood of wrong passwords delays only other CONNECTs. A password
that verified is remembered in memory by its SHA-256, so a device that reconnects often
costs a dictionary lookup, not a fresh scrypt.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from edge.mqtt_codec import CONNACK_BAD_CREDENTIALS, CONNACK_NOT_AUTHORIZED
from node.errors import InputError
from node.membership import MembershipError, Permissions

USERS_FILE: Final = "mqtt_users.json"
_SCRYPT: Final = {"n": 1 << 14, "r": 8, "p": 1}
_MAXMEM: Final = 64 * 1024 * 1024
MAX_NAME: Final = 256
_REMEMBERED: Final = 10_000  # verified (user, password digest) pairs kept in memory


class UsersFileError(InputError):
    """The users file cannot be read or makes no sense (one line, names the file)."""


@dataclass(frozen=True, slots=True)
class User:
    name: str
    hash: str  # "scrypt$N$r$p$salt$digest", hex
    perms: Permissions


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A storable scrypt hash of ``password`` with a fresh random salt."""
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, maxmem=_MAXMEM, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def verify_password(password: bytes, stored: str) -> bool:
    """True if ``password`` hashes to ``stored``; False for any malformed hash."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        want = bytes.fromhex(digest)
        if kind != "scrypt" or not 0 < len(want) <= 64:
            return False
        got = hashlib.scrypt(
            password,
            salt=bytes.fromhex(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(want),
            maxmem=_MAXMEM,
        )
    except (ValueError, OverflowError, MemoryError):
        return False
    return hmac.compare_digest(got, want)


def check_name(name: str) -> str:
    """``name`` if it can be an MQTT username here; InputError naming the problem."""
    if not name or len(name) > MAX_NAME:
        raise InputError(f"MQTT user name must be 1 to {MAX_NAME} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InputError("MQTT user name must not hold control characters")
    return name


def load_users(path: Path) -> dict[str, User]:
    """The users in ``path`` (none if the file does not exist)."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UsersFileError(f"cannot read MQTT users from {path}: {e}") from None
    users = doc.get("users") if isinstance(doc, dict) else None
    if not isinstance(users, dict):
        raise UsersFileError(f"{path}: no 'users' object")
    out = {}
    for name, entry in users.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("hash"), str):
            raise UsersFileError(f"{path}: user {name!r} has no password hash")
        try:
            perms = Permissions.from_json(entry.get("perms"))
        except MembershipError as e:
            raise UsersFileError(f"{path}: user {name!r}: {e}") from None
        out[name] = User(name, entry["hash"], perms)
    return out


def save_users(path: Path, users: dict[str, User]) -> None:
    """Write ``users`` to ``path`` (0600) atomically: the listener never reads half a file."""
    doc: dict[str, Any] = {
        "users": {u.name: {"hash": u.hash, "perms": u.perms.to_json()} for u in users.values()}
    }
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class Authenticator:
    """The listener's question at CONNECT: may this client in, and with which rules?"""

    def __init__(self, path: Path | None, *, anonymous: bool) -> None:
        self.path = path
        self.anonymous = anonymous
        self.users: dict[str, User] = {}
        self.error = ""  # why the users file was not read (the last users stay in force)
        self._mtime: int | None = None
        # Verified (user, password digest) -> the hash it verified against, least recently
        # used first: clearing it all when full sent a fleet over 10,000 devices back to
        # scrypt (44 ms each, on one worker) at every reconnect.
        self._verified: OrderedDict[tuple[str, bytes], str] = OrderedDict()
        self._decoy: str | None = None  # what an unknown user's password is checked against

    def check(self, username: str | None, password: bytes | None) -> Permissions | int:
        """The client's permissions, or the CONNACK return code that refuses it."""
        verdict = self.quick(username, password)
        return self.verify(username, password) if verdict is None else verdict

    def quick(self, username: str | None, password: bytes | None) -> Permissions | int | None:
        """The verdict if it needs no password hashing (anonymous, unknown user, a password
        that verified before), else None: then ``verify``, which takes tens of ms."""
        if username is None:
            return Permissions() if self.anonymous else CONNACK_NOT_AUTHORIZED
        if password is None:
            return CONNACK_BAD_CREDENTIALS
        self._reload()
        user = self.users.get(username)
        if user is None:
            return None  # hashed all the same: timing must not tell which names exist
        key = (username, hashlib.sha256(password).digest())
        if self._verified.get(key) == user.hash:
            with contextlib.suppress(KeyError):  # the worker may have just dropped it
                self._verified.move_to_end(key)
            return user.perms
        return None

    def names_checked(self) -> bool:
        """False where anonymous clients may connect and there are no users: as mosquitto
        without a password file, a client's user name is then not checked, and the client
        is anonymous. Devices that brought one were refused by an open node (conformance
        review), though nothing could have let them in but making that user."""
        self._reload()
        return not (self.anonymous and not self.users)

    def verify(self, username: str | None, password: bytes | None) -> Permissions | int:
        """Hash ``password`` against the user's; safe in a worker thread (scrypt releases
        the GIL; the users and the memory of verified passwords change atomically)."""
        user = self.users.get(username or "")
        if user is None or password is None:
            if self._decoy is None:
                self._decoy = hash_password(os.urandom(16).hex())
            verify_password(password or b"", self._decoy)  # as long as a real check
            return CONNACK_BAD_CREDENTIALS
        if not verify_password(password, user.hash):
            return CONNACK_BAD_CREDENTIALS
        key = (user.name, hashlib.sha256(password).digest())
        self._verified[key] = user.hash
        self._verified.move_to_end(key)  # verified again: the most recently used
        limit = max(_REMEMBERED, 2 * len(self.users))  # every user's, however many
        while len(self._verified) > limit:
            with contextlib.suppress(KeyError):
                self._verified.popitem(last=False)
        return user.perms

    def _reload(self) -> None:
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        except OSError as e:
            self.error = str(e)
            return
        if mtime == self._mtime:
            return
        try:
            self.users = load_users(self.path)
            self.error = ""
        except UsersFileError as e:
            self.error = str(e)
            return
        self._mtime = mtime
