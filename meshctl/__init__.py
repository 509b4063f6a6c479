"""meshctl: an event mesh for single hosts and edge networks.

The public API is the client library; ``meshctl`` on the command line is built on it.
"""

from __future__ import annotations

from meshctl.client import Client, Subscription, connect
from meshctl.errors import MeshError
from node import __version__
from node.events import Event

__all__ = ["Client", "Event", "MeshError", "Subscription", "__version__", "connect"]
