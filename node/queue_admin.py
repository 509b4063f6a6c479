"""``meshctl queue add|rm|purge|ls|info``: the QUEUE control request, answered by the node.

Changes are written in the pass's transaction and answered only after it commits, so an
operator who saw "created" has a queue that survives a crash.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from node.codec import Kind
from node.config import parse_duration
from node.errors import TopicError
from node.queues import DEFAULT_ACK_WAIT, DEFAULT_MAX_DELIVER
from node.store import StoreError

if TYPE_CHECKING:
    from node.router import Router

Answer = tuple[Kind, dict[str, Any]]


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
        if op == "ls":
            infos = [queues.info(q, now_ns) for _n, q in sorted(queues.by_name.items())]
            return Kind.OK, {"ref": ref, "queues": infos}
        name = body.get("name")
        if op == "info":
            return Kind.OK, {"ref": ref, "queue": queues.info(queues.get(str(name)), now_ns)}
        if op == "add":
            patterns = body.get("patterns") or []
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise ValueError("patterns must be a list of strings")
            old = queues.by_name.get(str(name))
            old_patterns = old.patterns if old is not None else ()
            q = queues.add(
                str(name),
                patterns,
                ack_wait=_seconds(body.get("ack_wait"), DEFAULT_ACK_WAIT),
                max_deliver=int(body.get("max_deliver") or DEFAULT_MAX_DELIVER),
                now_wall=now_ns / 1e9,
            )
            router.queue_interest(old_patterns, q.patterns)
            result = {"ref": ref, "queue": queues.info(q, now_ns), "created": old is None}
        elif op == "rm":
            q = queues.remove(str(name))
            router.queue_interest(q.patterns, ())
            durable.drop_consumers(q)
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


def _seconds(value: object, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return parse_duration(str(value))


def _err(ref: object, error: str, code: str) -> Answer:
    return Kind.ERR, {"ref": ref, "error": error, "code": code}
