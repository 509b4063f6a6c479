"""``meshctl queue add|rm|purge|ls|info``: the QUEUE control request, answered by the node.

Changes are written in the pass's transaction and answered only after it commits, so an
operator who saw "created" has a queue that survives a crash; a queue made, changed or
removed in a pass that fails to commit is put back in memory as it was. (A ``purge`` that
fails leaves memory ahead of the disk: its messages come back after a restart.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from node.codec import Kind
from node.config import parse_duration
from node.errors import TopicError
from node.queues import DEFAULT_ACK_WAIT, DEFAULT_MAX_DELIVER, Queue, read_refused
from node.store import StoreError

if TYPE_CHECKING:
    from node.durable import Output
    from node.router import Router

Undo = Callable[["Output", str], None]

Answer = tuple[Kind, dict[str, Any]]
MAX_ACK_WAIT: Final = 86400.0
MAX_DELIVER: Final = 1_000_000


def handle(router: Router, ident: bytes, body: dict[str, Any], now: float) -> Answer | None:
    """Answer now (reads, errors) or return None when the answer waits for the commit."""
    ref = body.get("ref")
    durable = router.durable
    if durable is None:
        return _err(ref, "this node has no store (persistence is off)", "store")
    queues = durable.queues
    op = body.get("op")
    now_ns = router.wall_ns()
    try:
        acl = router.acl.get(ident)
        if op == "ls":  # a client with rules sees the queues it may read, as NATS accounts
            infos = [
                queues.info(q, now_ns)
                for _n, q in sorted(queues.by_name.items())
                if acl is None or read_refused(acl, queues.readable_as(q)) is None
            ]
            return Kind.OK, {"ref": ref, "queues": infos}
        name = body.get("name")
        if acl is not None and op in ("add", "rm", "purge", "info"):
            # A client administers only queues whose events it could read anyway: the ones
            # it holds (a dead-letter queue: its queue's), and for add the new patterns
            # too. Checking only the new ones let a client re-point a queue it was denied
            # and consume what it held (exploratory test).
            old = queues.by_name.get(str(name))
            held = () if old is None else queues.readable_as(old)
            wanted = body.get("patterns") if op == "add" else []  # info: as rm, what it holds
            wanted = [p for p in wanted if isinstance(p, str)] if isinstance(wanted, list) else []
            why = read_refused(acl, None if held is None else [*held, *wanted])
            if why is not None:
                router.counters.dropped["permission"] += 1
                return _err(ref, f"permission denied: queue {name!r}: {why}", "permission")
        if op == "info":
            return Kind.OK, {"ref": ref, "queue": queues.info(queues.get(str(name)), now_ns)}
        if op == "add":
            patterns = body.get("patterns") or []
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise ValueError("patterns must be a list of strings")
            old = queues.by_name.get(str(name))
            old_patterns = old.patterns if old is not None else ()
            old_settings = None if old is None else (old.patterns, old.ack_wait, old.max_deliver)
            # What is not given keeps its value: adding a pattern put a queue's ack wait
            # and max deliver back to their defaults (exploratory test), where `nats
            # stream edit` changes only what it is told.
            q = queues.add(
                str(name),
                patterns,
                ack_wait=_seconds(
                    body.get("ack_wait"), DEFAULT_ACK_WAIT if old is None else old.ack_wait
                ),
                max_deliver=_count(
                    body.get("max_deliver"),
                    DEFAULT_MAX_DELIVER if old is None else old.max_deliver,
                ),
                now_wall=now_ns / 1e9,
            )
            router.queue_interest(old_patterns, q.patterns)
            durable.on_rollback(_undo_add(router, q, old_settings))
            result = {"ref": ref, "queue": queues.info(q, now_ns), "created": old is None}
        elif op == "rm":
            q = queues.remove(str(name))
            router.queue_interest(q.patterns, ())
            bound = {k: v for k, v in durable.consumers.items() if v[0] is q}
            durable.on_rollback(_undo_rm(router, q, bound))
            # Each consumer hears that its queue is gone, as JetStream's "consumer deleted":
            # it waited for ever on an idle subscription (exploratory test).
            for client, sid in durable.drop_consumers(q):
                why = f"queue {q.name!r} was removed"
                durable.notify_after_commit(
                    client, Kind.ERR, {"sid": sid, "error": why, "code": "gone"}
                )
            result = {"ref": ref, "removed": q.name}
        elif op == "purge":
            result = {"ref": ref, "purged": queues.purge(str(name))}
        else:
            return _err(ref, f"unknown queue operation {op!r}", "input")
    except KeyError as e:
        return _err(ref, str(e.args[0]), "input")
    except (ValueError, TypeError, TopicError) as e:
        return _err(ref, str(e), "input")
    except StoreError as e:
        return _err(ref, str(e), "store")
    durable.answer_after_commit(ident, Kind.OK, result)
    return None


def _undo_add(router: Router, q: Queue, old: tuple[tuple[str, ...], float, int] | None) -> Undo:
    """Put memory back as it was before ``add`` when its pass fails to commit. Undos run
    in reverse, so a ``rm`` later in the pass has been undone already (review: the queue
    lingered in the trie, and a made-again one captured every event twice)."""

    def undo(out: Output, error: str) -> None:
        durable = router.durable
        assert durable is not None
        if durable.queues.by_name.get(q.name) is not q:
            return  # not this node's queue of that name any more: nothing of it to undo
        router.queue_interest(q.patterns, () if old is None else old[0])
        if old is not None:
            durable.queues.configure(q, *old)
            return
        # A consumer bound to it in the same pass heard OK: it hears that the queue is
        # not there, or it stayed bound to a queue gone from memory (review).
        why = f"queue {q.name!r} was not created: {error}"
        for client, sid in durable.drop_consumers(q):
            out.answer(client, Kind.ERR, {"sid": sid, "error": why, "code": "gone"})
        q.consumers.clear()
        durable.queues.forget(q)

    return undo


def _undo_rm(router: Router, q: Queue, bound: dict[tuple[bytes, int], Any]) -> Undo:
    """Put a removed queue back, consumers and all, when the pass fails to commit: its
    rows are still on disk, and a queue made again under its name before a restart met
    them ("UNIQUE constraint failed", old messages in the new queue: review)."""

    def undo(_out: Output, _error: str) -> None:
        durable = router.durable
        assert durable is not None
        if q.name in durable.queues.by_name:
            return
        durable.queues.restore(q)
        router.queue_interest((), q.patterns)
        for key, (bq, consumer) in bound.items():
            client = router.clients.get(key[0])
            if client is not None and key[1] in client.subs:
                durable.consumers[key] = (bq, consumer)
                continue
            # It left or unsubscribed in the same pass: bound again, it took every message
            # for a client that was gone until a restart (review).
            try:
                durable.queues.unbind(q, consumer, router.wall_ns())
            except StoreError as e:  # its messages' move to the dead letters: counted
                durable.errors += 1
                durable.last_error = str(e)
        durable.queues.wake(q)

    return undo


def _seconds(value: object, default: float) -> float:
    """An ack wait: a number of seconds or a duration text, 1 ms to a day."""
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value) if -1e12 < value < 1e12 else -1.0
    else:
        seconds = parse_duration(str(value))
    if not 0.001 <= seconds <= MAX_ACK_WAIT:  # NaN fails this too
        raise ValueError(f"ack wait must be from 1ms to {MAX_ACK_WAIT:.0f}s, not {value!r}")
    return seconds


def _count(value: object, default: int) -> int:
    """A max deliver count: 1 to a million."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DELIVER:
        raise ValueError(f"max deliver must be a whole number from 1 to {MAX_DELIVER}")
    return value


def _err(ref: object, error: str, code: str) -> Answer:
    return Kind.ERR, {"ref": ref, "error": error, "code": code}
