"""How the MQTT bridge reads the node's log for its persistent exports (edge/bridges.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import zmq

from edge.bridges import SPOOL_BATCH, MqttBridge
from edge.port import MeshPort
from node.bridge_config import parse_bridges
from node.codec import F_PERSISTENT
from node.store import open_store


class Broker:
    """paho's client as far as a spool round uses it: everything is published at once."""

    def __init__(self) -> None:
        self.topics: list[str] = []

    def publish(
        self, topic: str, _data: bytes, qos: int = 0, retain: bool = False, properties: Any = None
    ) -> Any:
        self.topics.append(topic)
        return self

    def wait_for_publish(self, _timeout: float) -> None:
        return None

    def is_published(self) -> bool:
        return True


def test_a_full_round_says_more_may_wait(tmp_path: Path) -> None:
    """Found by an audit: after each round the bridge slept in a 50 ms poll, so it read at
    most 10,000 log entries a second, exports or not; a fleet logging more persistent
    events than that left it behind for good, and the spool grew until it dropped."""
    (cfg,) = parse_bridges([{"kind": "mqtt", "url": "mqtt://h", "export": ["alerts/>"]}], "t")
    store, port = open_store(tmp_path), MeshPort("devices")
    bridge = MqttBridge(cfg, zmq.Context.instance(), "inproc://unused", b"b", tmp_path)
    bridge._open_spool()  # a new bridge starts at the log's head: here, empty
    assert bridge.spool is not None
    rows = []
    for i in range(SPOOL_BATCH + 10):
        topic = "alerts/fire" if i % 100 == 0 else f"devices/{i}/telemetry"
        rec = port.raw_record(topic.encode(), b"x", b"", F_PERSISTENT)
        rows.append((rec[-16:], topic, 1, rec))
    store.log_append(rows)
    store.commit()
    broker = Broker()
    assert bridge._drain_spool_mqtt(broker) is True  # a full round: go on at once
    assert bridge._drain_spool_mqtt(broker) is False  # the rest
    assert bridge._drain_spool_mqtt(broker) is False  # nothing new
    assert broker.topics == ["alerts/fire"] * 6
    assert bridge.spool.cursor == SPOOL_BATCH + 10
    bridge.spool.close()
    store.close()


def test_a_round_cut_by_a_disconnect_goes_again_instead_of_ending_the_bridge(
    tmp_path: Path,
) -> None:
    """Found in review: paho's "not connected" (the broker gone between the bridge's
    state check and the publish, or mid-round) raised out of ``is_published`` and ended
    the bridge's thread: no more imports, exports or spool rounds until a restart."""
    (cfg,) = parse_bridges(
        [{"kind": "mqtt", "url": "mqtt://127.0.0.1:1", "export": ["alerts/>"], "qos": 1}], "t"
    )
    store, port = open_store(tmp_path), MeshPort("devices")
    bridge = MqttBridge(cfg, zmq.Context.instance(), "inproc://unused", b"b", tmp_path)
    bridge._open_spool()
    assert bridge.spool is not None
    rec = port.raw_record(b"alerts/fire", b"x", b"", F_PERSISTENT)
    store.log_append([(rec[-16:], "alerts/fire", 1, rec)])
    store.commit()
    # The real paho client, never connected: what it is once its socket has gone.
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    bridge.state = "up"
    try:
        assert bridge._drain_spool_mqtt(client) is False  # the round goes again later
        assert bridge.spool.cursor == 0
    finally:
        bridge.spool.close()
        store.close()
