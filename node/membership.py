"""Mesh membership, sans-IO: signed member and revocation records, join tokens, permissions.

A mesh has one Ed25519 signing key (made by ``meshctl init``). Membership is a record the
mesh key signs: ``{mesh, node, key, name, role, exp, perm}`` where ``key`` is the holder's
CurveZMQ public key (Z85). A record is worth nothing without the CURVE secret key that
matches ``key``: the checks here always compare ``key`` with the key the CURVE handshake
proved, so a copied record cannot be replayed by anyone else, and a node id is pinned to
one key by the signature itself. Revocations are records of the same shape, signed by the
same key, and are flooded mesh-wide.

Permissions (clients only): publish/subscribe allow and deny patterns; deny wins; an empty
allow list allows everything not denied; replies to an inbox (``_INBOX/...``) are always
allowed so that a responder needs no rule for its requesters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from node.errors import NodeError
from node.topics import INBOX_PREFIX, is_reserved, matches

TOKEN_PREFIX: Final = "mtk1."  # noqa: S105 - a format marker, not a secret
ROLES: Final = ("node", "client")
_WILD: Final = ("*", ">")
MAX_RECORD_BYTES: Final = 8192


class MembershipError(NodeError):
    """A record, token or proof does not hold; the message says which check failed."""


class MembershipExpired(MembershipError):
    """The holder's own record, valid in every way but its expiry: a member that has to
    join again, not an impostor (its key is not blocked, so it can)."""


def canonical(obj: Any) -> bytes:
    """The bytes a signature covers: sorted keys, no spaces, so every node agrees."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def new_signing_key() -> tuple[bytes, bytes]:
    """A fresh mesh signing key: (private 32 bytes, public 32 bytes)."""
    key = Ed25519PrivateKey.generate()
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def sign(private: bytes, record: dict[str, Any]) -> dict[str, Any]:
    """Wrap ``record`` with the mesh key's signature."""
    sig = Ed25519PrivateKey.from_private_bytes(private).sign(canonical(record))
    return {"rec": record, "sig": sig.hex()}


def verify(public: bytes, signed: object) -> dict[str, Any]:
    """The record inside ``signed`` if the mesh key signed it; MembershipError otherwise."""
    if not isinstance(signed, dict) or not isinstance(signed.get("rec"), dict):
        raise MembershipError("no signed record")
    record: dict[str, Any] = signed["rec"]
    try:
        sig = bytes.fromhex(str(signed.get("sig", "")))
        Ed25519PublicKey.from_public_bytes(public).verify(sig, canonical(record))
    except (ValueError, InvalidSignature):
        raise MembershipError("signature is not the mesh key's") from None
    return record


@dataclass(frozen=True, slots=True)
class Permissions:
    """Publish/subscribe rules of one client identity; deny overrides allow."""

    pub_allow: tuple[str, ...] = ()
    pub_deny: tuple[str, ...] = ()
    sub_allow: tuple[str, ...] = ()
    sub_deny: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, obj: object) -> Permissions:
        if obj is None:
            return cls()
        if not isinstance(obj, dict):
            raise MembershipError("permissions must be an object")
        out = {}
        for k in ("pub_allow", "pub_deny", "sub_allow", "sub_deny"):
            v = obj.get(k, [])
            if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
                raise MembershipError(f"permissions.{k} must be a list of patterns")
            out[k] = tuple(v)
        return cls(**out)

    def to_json(self) -> dict[str, list[str]]:
        return {
            "pub_allow": list(self.pub_allow),
            "pub_deny": list(self.pub_deny),
            "sub_allow": list(self.sub_allow),
            "sub_deny": list(self.sub_deny),
        }

    @property
    def unrestricted(self) -> bool:
        return not (self.pub_allow or self.pub_deny or self.sub_allow or self.sub_deny)

    def check_publish(self, topic: str) -> str | None:
        """None if ``topic`` may be published, else the reason naming the rule."""
        if topic.startswith(INBOX_PREFIX + "/"):
            return None  # replies to a requester's inbox
        for p in self.pub_deny:
            if matches(p, topic):
                return f"publish to {topic!r} denied by rule pub_deny {p!r}"
        if self.pub_allow and not any(matches(p, topic) for p in self.pub_allow):
            return f"publish to {topic!r} not allowed by pub_allow {', '.join(self.pub_allow)}"
        return None

    def check_subscribe(self, pattern: str) -> str | None:
        """None if ``pattern`` may be subscribed: covered by an allow rule and overlapping no
        deny rule (a pattern that could receive a denied topic is refused whole, so nothing
        denied is ever delivered and no per-event filter is needed)."""
        for p in self.sub_deny:
            if overlaps(p, pattern):
                return f"subscribe to {pattern!r} denied by rule sub_deny {p!r}"
        if self.sub_allow and not any(covers(p, pattern) for p in self.sub_allow):
            return f"subscribe to {pattern!r} not allowed by sub_allow {', '.join(self.sub_allow)}"
        return None


def covers(rule: str, pattern: str) -> bool:
    """True if every topic ``pattern`` matches is matched by ``rule`` too."""
    r, p = rule.split("/"), pattern.split("/")
    for i, level in enumerate(r):
        if level == ">":
            return len(p) > i
        if i >= len(p) or p[i] == ">":
            return False
        if level != "*" and (p[i] == "*" or level != p[i]):
            return False
    return len(r) == len(p)


def overlaps(rule: str, pattern: str) -> bool:
    """True if some topic is matched by both: ``pattern`` as a subscription matches it,
    ``rule`` as a deny rule does. A wildcard first level of a subscription matches no
    reserved topic (node/topics.py): ``sub_deny '_INBOX/>'`` refused ``>`` and ``*/temp``,
    which can receive nothing it denies (exploratory test). A rule's covers them still:
    ``sub_deny '>'`` meant as "nothing" keeps refusing ``_INBOX/>`` (review)."""
    x, y = rule.split("/"), pattern.split("/")
    if y[0] in _WILD and is_reserved(x[0]):
        return False
    for i in range(max(len(x), len(y))):
        if i < len(x) and x[i] == ">":
            return len(y) > i
        if i < len(y) and y[i] == ">":
            return len(x) > i
        if i >= len(x) or i >= len(y):
            return False
        if x[i] != "*" and y[i] != "*" and x[i] != y[i]:
            return False
    return True


@dataclass(frozen=True, slots=True)
class Member:
    """A verified membership record."""

    mesh: str
    node: str  # node id (nodes) or client name (clients)
    key: str  # CurveZMQ public key, Z85
    name: str
    role: str
    expires: int
    perms: Permissions = field(default_factory=Permissions)


def member_record(
    *,
    mesh: str,
    node: str,
    key: str,
    name: str,
    role: str,
    expires: int,
    perms: Permissions | None = None,
) -> dict[str, Any]:
    """The unsigned record ``sign`` wraps."""
    rec: dict[str, Any] = {
        "t": "member",
        "mesh": mesh,
        "node": node,
        "key": key,
        "name": name,
        "role": role,
        "exp": expires,
    }
    if perms is not None and not perms.unrestricted:
        rec["perm"] = perms.to_json()
    return rec


def check_member(
    signed: object,
    *,
    mesh: str,
    mesh_pk: bytes,
    now: float,
    curve_key: str,
    revoked: frozenset[str] | set[str] = frozenset(),
    node: str | None = None,
    role: str = "node",
) -> Member:
    """A Member if ``signed`` proves that the holder of ``curve_key`` belongs to ``mesh``.

    Checks, in order: size, the mesh key's signature, record type and mesh, role, that
    the record's key is the key the CURVE handshake proved (no replay of someone else's
    record), the node id (pinning), revocation, and expiry.
    """
    if len(canonical(signed)) > MAX_RECORD_BYTES:
        raise MembershipError("membership record too large")
    rec = verify(mesh_pk, signed)
    if rec.get("t") != "member":
        raise MembershipError("not a membership record")
    if rec.get("mesh") != mesh:
        raise MembershipError(f"record is for mesh {rec.get('mesh')!r}, not {mesh!r}")
    if rec.get("role") != role:
        raise MembershipError(f"record is for a {rec.get('role')!r}, not a {role}")
    if rec.get("key") != curve_key:
        raise MembershipError("record belongs to another key (a copied record)")
    if node is not None and rec.get("node") != node:
        raise MembershipError(f"record is for node {rec.get('node')!r}, not {node!r}")
    if curve_key in revoked or (role == "node" and f"node:{rec.get('node')}" in revoked):
        raise MembershipError("membership revoked")
    exp = rec.get("exp")
    if not isinstance(exp, int) or exp <= now:  # last: only the holder's own record says so
        raise MembershipExpired("membership expired")
    return Member(
        mesh=mesh,
        node=str(rec.get("node")),
        key=curve_key,
        name=str(rec.get("name", ""))[:64],
        role=role,
        expires=exp,
        perms=Permissions.from_json(rec.get("perm")),
    )


def revocation_record(
    *, mesh: str, node: str, key: str, at: int, role: str = "node"
) -> dict[str, Any]:
    """The unsigned revocation of one member (node id or client name, and curve key).
    ``role`` only words the log line; records from before it carry none (read as a node)."""
    return {"t": "revoke", "mesh": mesh, "node": node, "key": key, "at": at, "role": role}


def check_revocation(signed: object, *, mesh: str, mesh_pk: bytes) -> dict[str, Any]:
    """The revocation record if the mesh key signed it for this mesh."""
    if len(canonical(signed)) > MAX_RECORD_BYTES:
        raise MembershipError("revocation record too large")
    rec = verify(mesh_pk, signed)
    if rec.get("t") != "revoke" or rec.get("mesh") != mesh:
        raise MembershipError("not a revocation of this mesh")
    if not isinstance(rec.get("key"), str) or not isinstance(rec.get("node"), str):
        raise MembershipError("revocation without node and key")
    return rec


# ---- join tokens -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    """What ``meshctl invite`` prints: where to enroll, whom to trust, and a secret."""

    mesh: str
    mesh_pk: str  # hex
    url: str  # the enrolling node's tcp endpoint
    server_key: str  # its CurveZMQ public key (Z85)
    token_id: str
    secret: str  # hex; the enrolling node keeps only its hash
    expires: int

    def encode(self) -> str:
        body = {
            "m": self.mesh,
            "mpk": self.mesh_pk,
            "u": self.url,
            "sk": self.server_key,
            "id": self.token_id,
            "s": self.secret,
            "exp": self.expires,
        }
        return TOKEN_PREFIX + base64.urlsafe_b64encode(canonical(body)).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Token:
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            raise MembershipError(f"a join token starts with {TOKEN_PREFIX!r}")
        raw = text[len(TOKEN_PREFIX) :]
        try:
            body = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
            token = cls(
                mesh=str(body["m"]),
                mesh_pk=str(body["mpk"]),
                url=str(body["u"]),
                server_key=str(body["sk"]),
                token_id=str(body["id"]),
                secret=str(body["s"]),
                expires=int(body["exp"]),
            )
            bytes.fromhex(token.mesh_pk)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise MembershipError("join token is corrupt (copy it whole)") from None
        return token


def secret_hash(secret: str) -> str:
    """What the enrolling node stores instead of the token secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def check_token_use(entry: object, secret: str, now: float) -> str | None:
    """None if a stored token ``entry`` accepts ``secret`` now, else why not."""
    if not isinstance(entry, dict) or not hmac.compare_digest(
        str(entry.get("hash", "")), secret_hash(secret)
    ):
        # One answer for both: "secret does not match" told whoever held a token's id
        # that the id was live (a secured plant's review).
        return "unknown or already used join token"
    if int(entry.get("exp", 0)) <= now:
        return "join token expired"
    if int(entry.get("uses", 0)) <= 0:
        return "join token already used"
    return None
