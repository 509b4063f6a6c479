"""The Router's values: client sessions, subscriptions, cached routes and counters.

Plain data with no behaviour beyond small helpers; node/router.py and its two sides
(router_mesh.py, router_durable.py) work on them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Final, Protocol

from node.codec import F_PERSISTENT, F_REQUEST, F_RETAIN, RUN_BIT, SID
from node.drops import Drops
from node.durable import LOG_ALL
from node.mesh import NO_PLAN, Plan, Turn
from node.queues import Queue

DURABLE_FLAGS: Final = F_PERSISTENT | F_RETAIN  # records that take the durable path

MAX_GROUP_NAME: Final = 64


class Acl(Protocol):
    """A client's permissions (node/membership.py): each check returns the reason for a
    refusal naming the rule, or None."""

    def check_publish(self, topic: str) -> str | None: ...

    def check_subscribe(self, pattern: str) -> str | None: ...


MAX_VERDICTS: Final = 4096  # publish verdicts remembered per client


def publish_verdict(acl: Acl, seen: dict[bytes, str | None], topic_b: bytes) -> str | None:
    """``acl.check_publish`` for a topic as bytes, remembered in the client's ``seen``: the
    rules are matched once per topic, not once per event (a device publishes to a few
    topics over and over)."""
    if topic_b in seen:
        return seen[topic_b]
    why = acl.check_publish(topic_b.decode(errors="replace"))
    if len(seen) < MAX_VERDICTS:
        seen[topic_b] = why
    return why


class SubRef:
    """One subscription of one client; the trie holds these. Identity equality on purpose."""

    __slots__ = ("client", "group", "live", "patterns", "prefix", "sid")

    def __init__(self, client: bytes, sid: int, patterns: tuple[str, ...], group: str | None):
        self.client = client
        self.sid = sid
        self.patterns = patterns
        self.group = group
        self.prefix = SID.pack(sid)
        self.live = False  # in the trie: not while it replays the log, never for a queue


class _Group:
    """The local members of one queue group that match one topic."""

    __slots__ = ("answering", "members", "name", "request_turn", "turn")

    def __init__(
        self,
        name: str,
        members: list[tuple[bytes, bytes]],
        turn: Turn,
        answering: list[tuple[bytes, bytes]] | None = None,
        request_turn: Turn | None = None,
    ) -> None:
        self.name = name
        self.members = members
        self.turn = turn
        # The members that may answer a request (not MQTT clients' shared subscriptions,
        # which take events only), given when some may and some may not; they take turns
        # of their own (with the events' turns, events between requests decided which
        # responder got every request: review).
        self.answering = answering
        self.request_turn = request_turn or turn

    def pick(self, request: bool = False) -> tuple[bytes, bytes]:
        """The next member, round-robin; for a ``request``, the next that may answer (a
        group mixing an MQTT member and a mesh responder sent some requests to the MQTT
        member, where they were lost)."""
        among = self.answering if request and self.answering else self.members
        turn = self.request_turn if request else self.turn
        i = turn.n
        turn.n = i + 1
        return among[i % len(among)]


class Route:
    """Where events on one topic go: every local plain subscriber, one member per local
    group, and the mesh plan for other nodes; whether the log keeps it and which durable
    queues capture it (when persistent)."""

    __slots__ = (
        "alone",
        "alone_flags",
        "answers",
        "groups",
        "local",
        "log",
        "plain",
        "plan",
        "queues",
        "runs",
        "stored_plan",
        "unwanted",
    )

    def __init__(
        self,
        plain: list[tuple[bytes, bytes]],
        groups: list[_Group],
        plan: Plan = NO_PLAN,
        log: int = 0,
        queues: list[Queue] | None = None,
        stored_plan: Plan | None = None,
        *,
        answers: bool = True,
        readers: Collection[bytes] = (),
    ) -> None:
        self.plain = plain
        self.groups = groups
        self.plan = plan
        self.log = log
        self.queues = queues or []
        # A persistent event's plan: ``plan`` and the nodes whose queues capture the topic.
        self.stored_plan = plan if stored_plan is None else stored_plan
        self.answers = answers
        # What Router._on_pub needs per record, worked out once per topic. A record goes
        # on its own (``alone``, or one of ``alone_flags``) when it is stored first,
        # logged, may be answered "no responders", or needs a choice of node per event;
        # otherwise it goes along ``plan``'s fixed links in a run with its neighbours, to
        # subscribers here (``local``), or nowhere (``unwanted``).
        # A request on a topic that only other nodes hold, some of which may answer, runs
        # along with the rest (``answers``: False when nothing here or in the mesh may
        # answer a request on the topic, only subscribers that take events, MQTT clients).
        self.local = local = bool(plain or groups)
        self.alone = log == LOG_ALL or bool(plan.groups)
        runs_requests = answers and bool(plan.static) and not local and not self.alone
        self.alone_flags = DURABLE_FLAGS if runs_requests else DURABLE_FLAGS | F_REQUEST
        self.unwanted = not local and plan.empty
        self.runs = run_heads(plain, groups, readers)


def run_heads(
    plain: list[tuple[bytes, bytes]], groups: list[_Group], readers: Collection[bytes]
) -> list[tuple[bytes, int]] | None:
    """(client, sid | RUN_BIT) per plain subscriber, when a slice of consecutive records
    may go to each as one run (codec.py): every one reads runs (``readers``: their sids
    are below RUN_BIT, Router._subscribe), none holds two of the subscriptions, and no
    queue group is in the way. Else None, and records go one by one, as every delivery
    did before runs: each event's copies for one client stay together (the MQTT listener
    sends one message per event of overlapping subscriptions), and no group's copy
    overtakes a plain one."""
    if not plain or groups or len({d for d, _ in plain}) != len(plain):
        return None
    if not all(dest in readers for dest, _ in plain):
        return None
    return [(dest, SID.unpack(prefix)[0] | RUN_BIT) for dest, prefix in plain]


NOWHERE: Final = Route([], [])  # where no run of records is being gathered


class _Refused:
    """A cached verdict that a topic cannot be published to."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass
class Client:
    """One connected client session."""

    ident: bytes
    name: str
    connected_at: float
    last_seen: float
    subs: dict[int, SubRef] = field(default_factory=dict)
    patterns: int = 0  # held by its subscriptions: the per-client limit, without a walk
    events_in: int = 0
    events_out: int = 0
    drops: Drops = field(default_factory=Drops)  # events its full queue refused
    # An operator's session in a place beyond limits.max_clients: it may look (views,
    # queue commands) but neither publish nor subscribe, so those places stay for looking.
    looker: bool = False
    # Its routing id in hex after this run's tag (Router._run_tag): libzmq numbers a
    # ROUTER's peers the same way every run, so a client's id alone named another client
    # after a restart, and replies to a request made before it went to that one.
    run_tag: str = ""

    @property
    def client_id(self) -> str:
        return self.run_tag + self.ident.hex()


@dataclass
class Counters:
    """Node-wide counters shown by ``meshctl status``."""

    events_in: int = 0
    events_out: int = 0
    no_interest: int = 0
    no_responders_withheld: int = 0  # a bridge's "no responders" while others may answer
    clients_refused: int = 0  # HELLOs over limits.max_clients
    bad_frames: int = 0
    bad_handshakes: int = 0
    forwarded_in: int = 0
    forwarded_out: int = 0
    relayed_frames: int = 0
    internal_errors: int = 0
    duplicates: int = 0
    dropped: dict[str, int] = field(
        default_factory=lambda: {
            "slow_consumer": 0,
            "payload_too_large": 0,
            "bad_topic": 0,
            "bad_headers": 0,
            "no_session": 0,
            "link_full": 0,  # events a link's full queue refused
            "control_full": 0,  # other frames a full queue refused (a link's or a client's)
            "permission": 0,
        }
    )


def _valid_group(group: object) -> bool:
    """1-64 UTF-8 bytes (the mesh's routing headers carry them) without separators, and
    no lone surrogates (JSON carries them; UTF-8 cannot, so other nodes refuse them)."""
    return (
        isinstance(group, str)
        and 0 < len(group.encode("utf-8", "replace")) <= MAX_GROUP_NAME
        and not any(ch in group for ch in " \t\r\n/*>")
        and not any("\ud800" <= ch <= "\udfff" for ch in group)
    )
