"""One error root for the node package, split into "you misused it" and "the peer sent garbage"."""

from __future__ import annotations


class NodeError(Exception):
    """Root of every error the node package raises on purpose."""


class InputError(NodeError):
    """Bad input from a local user or API caller (a usage error: CLI exit code 2)."""


class TopicError(InputError):
    """A topic or subscription pattern breaks the grammar or a limit."""

    def __init__(self, topic: str, reason: str) -> None:
        self.topic = topic
        self.reason = reason
        super().__init__(f"invalid topic {topic!r}: {reason}")


class PayloadTooLarge(InputError):
    """A payload exceeds the node's limit; the message states the limit."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"payload of {size} bytes exceeds the limit of {limit} bytes")


class ConfigError(InputError):
    """A config file or option is invalid; names the file and key so the fix is obvious."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {reason}")


class CodecError(NodeError):
    """Bytes from the network do not form a valid frame (the peer's fault: drop and count)."""
