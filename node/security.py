"""CurveZMQ credentials in the data dir, the ZAP handler, and the membership checks a node
makes on links, clients, enrollment and revocation.

Files (all in the node's data dir, secrets 0600):
  curve.key / curve.key_secret   this node's CurveZMQ key pair (zmq.auth certificate files)
  mesh.json                      the mesh name and the mesh's public signing key (trust root)
  member.json                    this node's membership record, signed by the mesh key
  mesh_signing.key               the mesh's private signing key: only where `meshctl init` ran
  tokens.json                    join tokens issued here (hashes, expiry, uses left)
  revoked.json                   signed revocations this node knows
  join_links.json                the node that enrolled us (url + CurveZMQ key), a static link
  members.json                   members this authority enrolled (to revoke them by name)

ZAP (pyzmq's ``zmq.auth.thread.ThreadAuthenticator``, domain ``meshctl`` enforced, so a
missing handler refuses every connection) lets through CURVE keys that are neither revoked
nor blocked after a failed proof; the first frame of a connection must then prove membership
for the key CURVE authenticated (LINK, HELLO) or redeem a join token (ENROLL). Anything else
is refused, counted and listed, and the key is blocked for BLOCK_SECONDS, which makes a
flood of attempts from one rogue key cheap to turn away. An address that fails again and
again with fresh keys has its first frames dropped unread for a while (failed_proofs.py).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import zmq
import zmq.auth

from node import datadir
from node import membership as ms
from node.clock import clock_is_set, unset_clock_error
from node.drops import worth_a_line
from node.errors import ConfigError
from node.failed_proofs import FailedProofs

log = logging.getLogger("meshctl.node")

ZAP_DOMAIN: Final = "meshctl"
AUTHORITYS: Final = "the authority's"  # whose clock an enrollment refusal blames
CURVE_FILE: Final = "curve"
MESH_FILE: Final = "mesh.json"
MEMBER_FILE: Final = "member.json"
SIGNING_FILE: Final = "mesh_signing.key"
TOKENS_FILE: Final = "tokens.json"
REVOKED_FILE: Final = "revoked.json"
JOIN_LINKS_FILE: Final = "join_links.json"
MEMBERS_FILE: Final = "members.json"  # what an authority issued: id/name -> key, for revoke
BLOCK_SECONDS: Final = 30.0
NODE_RECORD_DAYS: Final = 365
RENEW_WITHIN: Final = 31 * 86400  # an authority renews records expiring within this
MAX_REJECTED: Final = 256  # rejected peers listed by `meshctl peers`
LOCK_WAIT: Final = 0.2  # seconds the node's loop waits for a state file's lock
SAVE_RETRY: Final = 5.0  # seconds between attempts to save revocations while it is locked
TELL_EACH: Final = 3  # revocations learnt at once that are logged one by one; more: one line
REVOKED_SELF: Final = "this node's membership was revoked: it no longer dials other nodes"


# Membership files are state files of the data dir: written whole, 0600, synced. Plain
# write_text calls left truncated JSON after a crash, which stopped every start.
_write_private = datadir.write_whole


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        raise ConfigError(str(path), "", f"unreadable: {e}") from None


def curve_keys(data_dir: Path) -> tuple[bytes, bytes]:
    """This node's CurveZMQ key pair (Z85), made on first use; the secret file is 0600."""
    secret = data_dir / f"{CURVE_FILE}.key_secret"
    if not secret.exists():
        _, sec_path = zmq.auth.create_certificates(data_dir, CURVE_FILE)
        Path(sec_path).chmod(0o600)
    else:
        mode = secret.stat().st_mode & 0o077
        if mode:
            secret.chmod(0o600)  # tighten a copied file rather than serve with it readable
    try:
        public, private = zmq.auth.load_certificate(secret)
    except (OSError, ValueError) as e:  # an empty file ended `up` in an internal error
        raise ConfigError(str(secret), "", f"unreadable: {e}") from None
    if private is None:
        raise ConfigError(str(secret), "", "holds no secret key")
    return public, private


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a secured node holds: the trust root, its keys and its own signed record."""

    mesh: str
    mesh_pk: bytes
    public: bytes  # Z85
    secret: bytes  # Z85
    member: dict[str, Any]
    signing_key: bytes | None  # only on the node where the mesh was created

    @property
    def public_text(self) -> str:
        return self.public.decode()


def load_credentials(data_dir: Path) -> Credentials | None:
    """The data dir's credentials, or None if it has none (a never-initialised node)."""
    mesh = _read_json(data_dir / MESH_FILE, None)
    member = _read_json(data_dir / MEMBER_FILE, None)
    if mesh is None or member is None:
        return None
    public, private = curve_keys(data_dir)
    signing = data_dir / SIGNING_FILE
    # Files of another shape name themselves: member.json = {} ended `up` in "internal
    # error: KeyError: 'rec'" after the node had said it was listening (exploratory test).
    if not isinstance(member, dict) or not isinstance(member.get("rec"), dict):
        raise ConfigError(str(data_dir / MEMBER_FILE), "", "not a signed membership record")
    try:
        return Credentials(
            mesh=str(mesh["mesh"]),
            mesh_pk=bytes.fromhex(mesh["mesh_pk"]),
            public=public,
            secret=private,
            member=member,
            signing_key=bytes.fromhex(signing.read_text().strip()) if signing.exists() else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(str(data_dir), "", f"mesh.json or {SIGNING_FILE}: {e!r}") from None


def init_mesh(data_dir: Path, *, mesh: str, node_id: str, name: str, now: float) -> Credentials:
    """Create a mesh: a signing key, this node's CurveZMQ keys and its membership record."""
    if (data_dir / MESH_FILE).exists():
        raise ConfigError(
            str(data_dir / MESH_FILE),
            "",
            "this data dir already belongs to a mesh; use another --data-dir for a new mesh",
        )
    private, public_key = ms.new_signing_key()
    _write_private(data_dir / SIGNING_FILE, private.hex() + "\n")
    pub, _ = curve_keys(data_dir)
    rec = ms.member_record(
        mesh=mesh,
        node=node_id,
        key=pub.decode(),
        name=name,
        role="node",
        expires=int(now + NODE_RECORD_DAYS * 86400),
    )
    _write_private(data_dir / MEMBER_FILE, json.dumps(ms.sign(private, rec)))
    # mesh.json last: a crash before it leaves a data dir that starts a mesh afresh, not
    # one that "already belongs to a mesh" and has no record.
    _write_private(data_dir / MESH_FILE, json.dumps({"mesh": mesh, "mesh_pk": public_key.hex()}))
    creds = load_credentials(data_dir)
    assert creds is not None
    return creds


def save_enrollment(data_dir: Path, token: ms.Token, answer: dict[str, Any]) -> None:
    """Keep what the enrolling node sent: trust root, our record, and a link back to it."""
    _write_private(
        data_dir / JOIN_LINKS_FILE, json.dumps([{"url": token.url, "key": token.server_key}])
    )
    revs = answer.get("revocations")
    if isinstance(revs, list):
        _write_private(data_dir / REVOKED_FILE, json.dumps(revs))
    _write_private(data_dir / MEMBER_FILE, json.dumps(answer["member"]))
    _write_private(data_dir / MESH_FILE, json.dumps({"mesh": token.mesh, "mesh_pk": token.mesh_pk}))


def remember_member(
    data_dir: Path, *, node: str, name: str, key: str, role: str, timeout: float | None = None
) -> None:
    """Note a member this authority signed, so `meshctl revoke NAME` can find its key;
    TimeoutError if the file stays locked for ``timeout`` seconds."""
    path = data_dir / MEMBERS_FILE
    entry = {"node": node, "name": name, "key": key, "role": role}
    with datadir.locked(path, timeout):  # the node (enrollments) and `meshctl invite` add
        members = _read_json(path, [])
        if entry in members:
            return  # enrolled again with the same keys: once is enough to revoke it
        members.append(entry)
        _write_private(path, json.dumps(members))


def join_links(data_dir: Path) -> list[tuple[str, str]]:
    """Static links learnt at enrollment: (url, CurveZMQ server key). ConfigError names
    a file of another shape (it ended in 'internal error: TypeError', exploratory test)."""
    path = data_dir / JOIN_LINKS_FILE
    links = _read_json(path, [])
    ok = isinstance(links, list) and all(
        isinstance(d, dict) and isinstance(d.get("url"), str) and isinstance(d.get("key"), str)
        for d in links
    )
    if not ok:
        raise ConfigError(str(path), "", 'expected [{"url": "tcp://...", "key": "..."}]')
    return [(d["url"], d["key"]) for d in links]


def issue_token(data_dir: Path, *, url: str, ttl: float, uses: int, now: float) -> ms.Token:
    """Record a new join token here (its hash) and return it; needs the mesh signing key."""
    creds = load_credentials(data_dir)
    if creds is None or creds.signing_key is None:
        raise ConfigError(
            str(data_dir),
            "",
            "no mesh signing key here: run `meshctl invite` on the node "
            "where `meshctl init` ran (or pass its --data-dir)",
        )
    token = ms.Token(
        mesh=creds.mesh,
        mesh_pk=creds.mesh_pk.hex(),
        url=url,
        server_key=creds.public_text,
        token_id=secrets.token_hex(6),
        secret=secrets.token_hex(16),
        expires=int(now + ttl),
    )
    path = data_dir / TOKENS_FILE
    with datadir.locked(path):  # the running node counts a token's uses in this file
        tokens = {
            k: v for k, v in _read_json(path, {}).items() if int(v.get("exp", 0)) > now
        }  # expired ones are forgotten as new ones are made
        tokens[token.token_id] = {
            "hash": ms.secret_hash(token.secret),
            "exp": token.expires,
            "uses": uses,
        }
        _write_private(path, json.dumps(tokens))
    return token


def revoke_token(data_dir: Path, token_id: str) -> bool:
    """Forget an unused join token, so it can no longer enroll anyone (the running node
    reads the file at each enrollment); False if there is no such token here."""
    path = data_dir / TOKENS_FILE
    with datadir.locked(path):  # else an enrollment at this moment could write it back
        tokens = _read_json(path, {})
        if token_id not in tokens:
            return False
        del tokens[token_id]
        _write_private(path, json.dumps(tokens))
    return True


def client_credentials(
    data_dir: Path, *, name: str, perms: ms.Permissions, days: float, now: float
) -> dict[str, Any]:
    """A client credentials document (its own key pair and signed record), like a NATS
    creds file: whoever holds it is that client, so it is written 0600."""
    creds = load_credentials(data_dir)
    if creds is None or creds.signing_key is None:
        raise ConfigError(str(data_dir), "", "no mesh signing key here (see `meshctl init`)")
    public, secret = zmq.curve_keypair()
    rec = ms.member_record(
        mesh=creds.mesh,
        node=name,
        key=public.decode(),
        name=name,
        role="client",
        expires=int(now + days * 86400),
        perms=perms,
    )
    return {
        "mesh": creds.mesh,
        "public": public.decode(),
        "secret": secret.decode(),
        "member": ms.sign(creds.signing_key, rec),
        "server_key": creds.public_text,
    }


def revoke(
    data_dir: Path, *, node: str, key: str, now: float, role: str = "node"
) -> dict[str, Any]:
    """Sign a revocation of ``node`` and add it to revoked.json; a running node floods it."""
    creds = load_credentials(data_dir)
    if creds is None or creds.signing_key is None:
        raise ConfigError(str(data_dir), "", "no mesh signing key here (see `meshctl init`)")
    signed = ms.sign(
        creds.signing_key,
        ms.revocation_record(mesh=creds.mesh, node=node, key=key, at=int(now), role=role),
    )
    path = data_dir / REVOKED_FILE
    with datadir.locked(path):  # a running node may be adding a flooded one right now
        revs = _read_json(path, [])
        revs.append(signed)
        _write_private(path, json.dumps(revs))
    return signed


class _KeyPolicy:
    """The ZAP callback: refuses revoked keys and keys blocked after a failed proof.
    Runs on the authenticator's thread, hence the lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.revoked: set[bytes] = set()
        self.blocked: dict[bytes, float] = {}
        self.denied = 0

    def callback(self, domain: str, key: bytes) -> bool:
        with self.lock:
            until = self.blocked.get(key)
            if key in self.revoked or (until is not None and until > time.monotonic()):
                self.denied += 1
                return False
            return True


class Security:
    """A secured node's checks; the loop calls these with the key each connection proved."""

    def __init__(
        self, creds: Credentials, data_dir: Path, node_id: str, log: Callable[[str], None]
    ) -> None:
        self.creds = creds
        self.data_dir = data_dir
        self.node_id = node_id
        self.log = log
        self.policy = _KeyPolicy()
        self.auth: Any = None  # zmq.auth.thread.ThreadAuthenticator once started
        self.revoked: set[str] = set()  # curve keys and "node:<id>"
        self.revocations: list[dict[str, Any]] = []
        self.rejected: dict[str, dict[str, Any]] = {}
        self.counters = {
            "links_rejected": 0,
            "clients_rejected": 0,
            "enrolled": 0,
            "enroll_refused": 0,
            "renewed": 0,  # other nodes' records this authority renewed
            "renew_refused": 0,
            "revocations": 0,
            "address_blocks": 0,  # blocks started (node/failed_proofs.py)
            "handshakes_dropped": 0,  # first frames from a blocked address, dropped unread
        }
        self.proofs = FailedProofs()
        self._refusals: dict[str, int] = {}  # refusals logged, by kind (_log_some)
        self._member_unsaved = False
        self._member_save_failed = False
        self._bad_proof = False  # the last renewal asked was refused for its proof
        self._revoked_mtime = 0.0
        self._revocations_unsaved = False  # known here, not yet in revoked.json
        self._save_retry_at = 0.0  # when to try saving them again (0: not failing)
        self.poll_revocations_file()

    # ---- sockets -----------------------------------------------------------------------

    def start(self, ctx: zmq.Context[Any]) -> None:
        # Imported here: it brings asyncio (~15 ms), which every `meshctl` command paid.
        from zmq.auth.thread import ThreadAuthenticator  # noqa: PLC0415

        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("meshctl.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self.policy)

    def stop(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None

    def serve_curve(self, sock: zmq.Socket[Any]) -> None:
        """Make the next binds of ``sock`` CURVE servers that ZAP must approve."""
        sock.curve_secretkey = self.creds.secret
        sock.curve_publickey = self.creds.public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def dial_curve(self, sock: zmq.Socket[Any], server_key: str) -> None:
        sock.curve_secretkey = self.creds.secret
        sock.curve_publickey = self.creds.public
        sock.curve_serverkey = server_key.encode()

    # ---- checks ------------------------------------------------------------------------

    def _check(self, signed: object, key: str, role: str, node: str | None = None) -> ms.Member:
        return ms.check_member(
            signed,
            mesh=self.creds.mesh,
            mesh_pk=self.creds.mesh_pk,
            now=time.time(),
            curve_key=key,
            revoked=self.revoked,
            node=node,
            role=role,
        )

    def check_link(self, body: dict[str, Any], key: str, address: str) -> str | None:
        """None if a LINK (or, for a node we dialed, a LINK_OK) proves that the holder of
        ``key``, the key CURVE authenticated, is a member under the node id it claims;
        else the reason, after counting and listing the peer as rejected."""
        node = body.get("node")
        claimed = node.get("id") if isinstance(node, dict) else None
        try:
            self._check(body.get("member"), key, "node", str(claimed))
        except ms.MembershipError as e:
            why = f"not a member of mesh {self.creds.mesh!r}: {e}"
            name = node.get("name") if isinstance(node, dict) else None
            # An expired member is no impostor; blocking its key for 30 s made the
            # `up --join` its log advises fail with "no answer" (found in session 10).
            expired = isinstance(e, ms.MembershipExpired)
            self.reject(str(claimed), name, address, "" if expired else key, why)
            return why
        # A node refused before (its record expired, say) and now proven: its "rejected"
        # row went on showing in `meshctl peers` beside its live link (noted in session 9).
        for where, row in list(self.rejected.items()):
            if row["id"] == claimed:
                del self.rejected[where]
        return None

    def check_hello(self, body: dict[str, Any], key: str) -> tuple[ms.Member | None, str]:
        """A remote client's membership (with its permissions), or why it is refused."""
        try:
            return self._check(body.get("member"), key, "client"), ""
        except ms.MembershipError as e:
            self.counters["clients_rejected"] += 1
            self.block(key)
            why = f"client not authorised for mesh {self.creds.mesh!r}: {e}"
            self._log_some("client", f"refused client {key[:8]}…: {why}")  # was only counted
            return None, why

    def reject(self, node: str | None, name: object, address: str, key: str, why: str) -> None:
        """Count and list a refused peer; block its key (if given) for a while."""
        self.counters["links_rejected"] += 1
        if key:
            self.block(key)
        if len(self.rejected) >= MAX_REJECTED:
            self.rejected.pop(next(iter(self.rejected)))
        self.rejected[address] = {
            "id": node,
            "name": str(name) if name else None,
            "address": address,
            "found": "rejected",
            "state": "rejected",
            "error": why,
            "rtt_ms": None,
        }
        if worth_a_line(self.counters["links_rejected"], 20):
            self.log(f"rejected {name or node or '?'} at {address}: {why}")

    def block(self, key: str) -> None:
        with self.policy.lock:
            if len(self.policy.blocked) > 10_000:
                self.policy.blocked.clear()
            self.policy.blocked[key.encode()] = time.monotonic() + BLOCK_SECONDS

    # ---- enrollment --------------------------------------------------------------------

    def enroll(self, body: dict[str, Any], key: str) -> tuple[bool, dict[str, Any]]:
        """Redeem a join token for the holder of ``key``, or renew the record it proves
        (node/renewal.py): (ok, answer body)."""
        renew = bool(body.get("renew"))
        self._bad_proof = False
        ok, answer = self._enroll(body, key, renew)
        if renew:
            self.counters["renewed" if ok else "renew_refused"] += 1
        else:
            self.counters["enrolled" if ok else "enroll_refused"] += 1
        if not ok:
            what = "renewal" if renew else "enrollment"
            self._log_some(f"{what}_refused", f"refused {what} of {key[:8]}…: {answer['error']}")
            # Not for a refused token: a joiner keeps its key across attempts, and one typo
            # in a token then made the right one fail for 30 s as "no answer" (exploratory
            # test). Guessing a token's 128-bit secret gains nothing from retries. Nor for
            # a good record asked early ("not due yet": a member whose clock is ahead) or
            # while our clock is not set: that cut a member off for 30 s (secured scenario).
            if self._bad_proof:
                self.block(key)
        return ok, answer

    def _log_some(self, what: str, line: str) -> None:
        """Log a refusal: the first 20 of a kind, then one in 1,000 (they may be a flood)."""
        n = self._refusals[what] = self._refusals.get(what, 0) + 1
        if worth_a_line(n, 20):
            self.log(line if n <= 20 else f"{line} ({n} so far)")

    def _enroll(self, body: dict[str, Any], key: str, renew: bool) -> tuple[bool, dict[str, Any]]:
        if self.creds.signing_key is None:
            return False, {"error": "this node cannot enroll: it has no mesh signing key"}
        if renew:
            return self._renew(body, key, self.creds.signing_key)
        node, name = body.get("node"), body.get("name")
        if not isinstance(node, str) or len(node) != 16 or not isinstance(name, str):
            return False, {"error": "enrollment needs a node id and a name"}
        path = self.data_dir / TOKENS_FILE
        token_id = str(body.get("token", ""))
        # Locked: `meshctl invite` and `meshctl token revoke` write this file too, and
        # either change would be undone by writing back what was read before it.
        try:
            with datadir.locked(path, timeout=LOCK_WAIT):
                return self._use_token(path, body, node, name, key, token_id)
        except TimeoutError:  # a command holds a file the enrollment changes
            return False, {"error": "the authority is busy (a state file is locked): try again"}

    def _use_token(
        self, path: Path, body: dict[str, Any], node: str, name: str, key: str, token_id: str
    ) -> tuple[bool, dict[str, Any]]:
        """The enrollment itself, under the token file's lock: the token is spent only
        once the new member is noted (for `meshctl revoke NAME`)."""
        signing = self.creds.signing_key
        assert signing is not None  # checked by _enroll
        if not clock_is_set():  # its record would be valid for the wrong year (clock faults)
            self.log(f"refused to enroll {name} ({node}): {unset_clock_error()}")
            return False, {"error": f"cannot enroll now: {unset_clock_error(AUTHORITYS)}"}
        tokens = _read_json(path, {})
        why = ms.check_token_use(tokens.get(token_id), str(body.get("secret", "")), time.time())
        if why is None:
            why = self._id_taken(node, key)
        if why is not None:
            return False, {"error": why}
        remember_member(
            self.data_dir, node=node, name=name[:63], key=key, role="node", timeout=LOCK_WAIT
        )
        tokens[token_id]["uses"] -= 1
        if tokens[token_id]["uses"] <= 0:
            del tokens[token_id]
        _write_private(path, json.dumps(tokens))
        rec = ms.member_record(
            mesh=self.creds.mesh,
            node=node,
            key=key,
            name=name[:63],
            role="node",
            expires=int(time.time() + NODE_RECORD_DAYS * 86400),
        )
        self.log(f"enrolled node {name} ({node}) with join token {token_id}")
        return True, {"member": ms.sign(signing, rec), "revocations": self.revocations}

    def _id_taken(self, node: str, key: str) -> str | None:
        """Why ``node`` cannot be enrolled for ``key``: its id is revoked, or a member with
        another key holds it. A copied node_id file took over a member's id, cut the
        member off as a duplicate link, and revoking the copy revoked it too (exploratory
        test). Checked after the token (no probing ids without one), before its use."""
        fresh = "start the node with a fresh data dir (a new node id) and a new token"
        if node == self.node_id:
            return f"node id {node} is this node's own: {fresh}"
        if self.is_revoked(node):
            return f"node id {node} is revoked: {fresh}"
        for m in _read_json(self.data_dir / MEMBERS_FILE, []):
            if m.get("node") == node and m.get("role") == "node" and m.get("key") != key:
                held = f"already a member with another key ({m.get('name')})"
                return f"node id {node} is {held}: {fresh}"
        return None

    def _renew(self, body: dict[str, Any], key: str, signing: bytes) -> tuple[bool, dict[str, Any]]:
        """A node's record for another period: the record it holds, checked as a LINK's
        is (for the key CURVE proved, not expired, not revoked), is the proof."""
        try:
            member = self._check(body.get("member"), key, "node", str(body.get("node")))
        except ms.MembershipError as e:
            self._bad_proof = True  # the record does not prove: its key is blocked a while
            return False, {"error": f"cannot renew: {e}"}
        rec = body["member"]["rec"]
        if not clock_is_set():
            return False, {"error": f"cannot renew now: {unset_clock_error(AUTHORITYS)}"}
        if rec["exp"] - time.time() > RENEW_WITHIN:  # not due: a member asking in a loop
            return False, {"error": "cannot renew: not due yet"}  # costs one check
        renewed = ms.member_record(
            mesh=self.creds.mesh,
            node=member.node,
            key=key,
            name=member.name,
            role="node",
            expires=int(time.time() + NODE_RECORD_DAYS * 86400),
        )
        self.log(f"renewed the membership of node {member.name} ({member.node})")
        return True, {"member": ms.sign(signing, renewed)}

    def install_member(self, signed: dict[str, Any]) -> None:
        """Take a renewed record of this node, and keep it in member.json for restarts."""
        self.creds = replace(self.creds, member=signed)
        self._member_unsaved = True
        self.save_member()

    def save_member(self) -> None:
        """Write a renewed record that is not saved yet. A failure (disk full, read-only)
        is logged once and tried again at the next tick; the node goes on with the
        record in memory. Raised, it stopped the node (found in review)."""
        if not self._member_unsaved:
            return
        try:
            _write_private(self.data_dir / MEMBER_FILE, json.dumps(self.creds.member))
        except OSError as e:
            if not self._member_save_failed:
                self.log(f"cannot save the renewed membership in {MEMBER_FILE} (retrying): {e}")
            self._member_save_failed = True
            return
        self._member_unsaved = self._member_save_failed = False

    # ---- revocation --------------------------------------------------------------------

    def accept_revocations(self, items: object) -> list[dict[str, Any]]:
        """The valid revocations in ``items`` that are new here (kept and persisted).

        No cap on how many: a cap of 1,000 left a longer revoked.json partly unread (a
        later ``meshctl revoke`` never applied). A frame from the network is bounded by
        its size; one already known is skipped before its signature is checked (a
        neighbour's list at every link-up is mostly known: 28 ms for 244)."""
        if not isinstance(items, list):
            return []
        fresh = []
        told: list[str] = []  # "client NAME" or "node ID", for the log
        for signed in items:
            if _revoked_key(signed) in self.revoked:
                continue  # known: whatever it claims, it adds nothing
            try:
                rec = ms.check_revocation(signed, mesh=self.creds.mesh, mesh_pk=self.creds.mesh_pk)
            except ms.MembershipError:
                continue
            if rec["key"] in self.revoked:
                continue
            self.revoked.add(rec["key"])
            if rec.get("role", "node") == "node":
                # A client's "node" is its name: revoked by name, new credentials issued
                # under it were refused for ever, and a client named like a node id
                # revoked that node (exploratory test). A client is revoked by its key.
                self.revoked.add(f"node:{rec['node']}")
            with self.policy.lock:
                self.policy.revoked.add(rec["key"].encode())
            self.revocations.append(signed)
            fresh.append(signed)
            self.counters["revocations"] += 1
            if rec["node"] == self.node_id:
                log.error(
                    "this node's membership of mesh %r was revoked: it no longer dials other "
                    "nodes (local clients still work); to rejoin, start afresh (a new data "
                    "dir) with a new join token",
                    self.creds.mesh,
                )
            else:
                told.append(f"{rec.get('role', 'node')} {rec['node']}")
        if len(told) > TELL_EACH:
            # A node that joins learns the mesh's whole list: it told each as if it had
            # just closed that member's sessions (a secured plant's review).
            some = ", ".join(told[:TELL_EACH])
            self.log(f"learnt {len(told)} revocations ({some}, ...): those members are refused")
        for who in told if len(told) <= TELL_EACH else ():
            what = "sessions" if who.startswith("client ") else "links and sessions"
            self.log(f"{who} revoked: its {what} are closed")
        if fresh:
            self._save_revocations()
        return fresh

    def _save_revocations(self, wait: float = LOCK_WAIT) -> None:
        """Write what this node knows to revoked.json, keeping what `meshctl revoke` added
        there since the node last looked (under the file's lock, which the command also
        takes): written over, that revocation would never have reached the mesh."""
        path = self.data_dir / REVOKED_FILE
        self._revocations_unsaved = True
        try:
            with datadir.locked(path, timeout=wait):
                try:
                    on_disk = json.loads(path.read_text())
                except (OSError, ValueError):
                    on_disk = []
                # By the key each names, as accept_revocations skips known ones: a list
                # scan per entry took 1.3 s at 5,000 on the loop (review).
                unseen = [
                    r
                    for r in on_disk
                    if isinstance(r, dict) and _revoked_key(r) not in self.revoked
                ]
                _write_private(path, json.dumps(self.revocations + unseen))
                # With unseen entries, the next look at the file (each tick) accepts them.
                self._revoked_mtime = 0.0 if unseen else path.stat().st_mtime
            self._revocations_unsaved = False
            self._save_retry_at = 0.0
        except OSError as e:  # TimeoutError too: tried again every SAVE_RETRY seconds,
            # without waiting: each tick waited LOCK_WAIT, and the loop crawled (review)
            if not self._save_retry_at:
                self.log(f"cannot save revocations (retrying): {e}")
            self._save_retry_at = time.monotonic() + SAVE_RETRY

    def poll_revocations_file(self) -> list[dict[str, Any]]:
        """New revocations `meshctl revoke` wrote to the data dir since the last look."""
        if self._revocations_unsaved and time.monotonic() >= self._save_retry_at:
            self._save_revocations(wait=0.0)
        path = self.data_dir / REVOKED_FILE
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return []
        if mtime == self._revoked_mtime:
            return []
        self._revoked_mtime = mtime
        try:
            items = json.loads(path.read_text())
        except (OSError, ValueError):
            return []
        return self.accept_revocations(items)

    def is_revoked(self, node_id: str) -> bool:
        return f"node:{node_id}" in self.revoked

    @property
    def self_revoked(self) -> bool:
        """This node's own membership was revoked (told by a neighbour, or at start-up
        from revoked.json): it stops dialing, since every member refuses it."""
        return f"node:{self.node_id}" in self.revoked

    def view(self) -> dict[str, Any]:
        with self.policy.lock:
            denied = self.policy.denied
        return {
            "mode": "curve",
            "mesh_key": self.creds.mesh_pk.hex(),
            "public_key": self.creds.public_text,
            "authority": self.creds.signing_key is not None,
            "member_expires": self.creds.member.get("rec", {}).get("exp"),
            "zap_denied": denied,
            "revoked": self.self_revoked,
            "blocked_addresses": self.proofs.listing(time.monotonic()),
            **self.counters,
        }


def _revoked_key(signed: object) -> str | None:
    """The key a signed revocation names, unchecked (None if it has no such shape)."""
    rec = signed.get("rec") if isinstance(signed, dict) else None
    key = rec.get("key") if isinstance(rec, dict) else None
    return key if isinstance(key, str) else None
