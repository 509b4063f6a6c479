"""Errors of the public API: one root, split by whose fault it is (CLI exit 2 or 1)."""

from __future__ import annotations

from typing import Any

from node.errors import ConfigError, InputError, NodeError, PayloadTooLarge, TopicError

MeshError = NodeError  # the one root: catch this to catch everything meshctl raises

__all__ = [
    "ConfigError",
    "InputError",
    "MeshError",
    "NoResponders",
    "OperationalError",
    "PayloadTooLarge",
    "RemoteError",
    "Timeout",
    "TopicError",
    "Unreachable",
]


class OperationalError(NodeError):
    """Something failed at run time that is not the caller's input (CLI exit code 1)."""


class Unreachable(OperationalError):
    """No node answered at the address within the timeout."""


class Timeout(OperationalError):
    """Nothing (more) arrived within the timeout; ``replies``: those a request did get
    (fewer than it asked for)."""

    def __init__(self, message: str, *, replies: list[Any] | None = None) -> None:
        self.replies = replies or []
        super().__init__(message)


class NoResponders(OperationalError):
    """Nothing in the mesh subscribes to a request's topic; answered at once by the node."""

    def __init__(self, topic: str, why: str = "") -> None:
        self.topic = topic
        self.why = why  # a bridge's reason, when one said it (MQTT, NATS away, no subject)
        super().__init__(f"no responders for {topic}" + (f" ({why})" if why else ""))


class RemoteError(OperationalError):
    """The node refused an operation and said why; ``ids``: the persistent events it
    concerns (refused by ``confirm``), if any."""

    def __init__(
        self, message: str, code: str = "", ids: tuple[str, ...] = (), reason: str = ""
    ) -> None:
        self.code = code
        self.ids = ids
        self.reason = reason or message  # without the "(and N more)" of a refusal of many
        super().__init__(message)
