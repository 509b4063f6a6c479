"""How the MQTT bridge reads the node's log for its persistent exports (edge/bridges.py)."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import zmq
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edge.bridges import SPOOL_BATCH, MqttBridge
from edge.mqtt_export import broker_limits
from edge.port import MeshPort
from node.bridge_config import parse_bridges
from node.codec import F_PERSISTENT
from node.store import open_store


class Broker:
    """paho's client as far as a spool round uses it: each publish gets a message id and
    a message info, and is answered at once (PUBACK) unless ``answering`` is off;
    ``answer`` answers later, as paho does: a refusal's reason code to ``on_publish``,
    then the info marked published."""

    def __init__(self, bridge: MqttBridge, *, answering: bool = True) -> None:
        self.bridge = bridge
        self.answering = answering
        self.topics: list[str] = []
        self.qos: list[int] = []
        self.infos: dict[int, Any] = {}
        self._mids = itertools.count(1)

    def publish(
        self, topic: str, _data: bytes, qos: int = 0, retain: bool = False, properties: Any = None
    ) -> Any:
        self.topics.append(topic)
        self.qos.append(qos)
        info = self.infos[mid] = SimpleNamespace(mid=(mid := next(self._mids)), rc=0)
        info._published = False
        if self.answering:
            self.answer(mid)
        return info

    def answer(self, mid: int, code: int = 0) -> None:
        reason = ReasonCode(PacketTypes.PUBACK, identifier=code)
        if code >= 0x80:
            self.bridge._on_publish(self, None, mid, reason, None)
        self.infos[mid]._published = True


def spool_bridge(tmp_path: Path, qos: int = 0) -> tuple[MqttBridge, Any]:
    """A bridge exporting alerts/>, up, at the head of an empty log; and the store."""
    (cfg,) = parse_bridges(
        [{"kind": "mqtt", "url": "mqtt://h", "export": ["alerts/>"], "qos": qos}], "t"
    )
    store = open_store(tmp_path)
    bridge = MqttBridge(cfg, zmq.Context.instance(), "inproc://unused", b"b", tmp_path)
    bridge._open_spool()
    bridge.state = "up"
    return bridge, store


def log_alerts(store: Any, n: int) -> None:
    port = MeshPort("devices")
    rows = []
    for i in range(n):
        rec = port.raw_record(f"alerts/{i}".encode(), b"x" * 100, b"", F_PERSISTENT)
        rows.append((rec[-16:], f"alerts/{i}", 1, rec))
    store.log_append(rows)
    store.commit()


def test_a_full_round_says_more_may_wait(tmp_path: Path) -> None:
    """Found by an audit: after each round the bridge slept in a 50 ms poll, so it read at
    most 10,000 log entries a second, exports or not; a fleet logging more persistent
    events than that left it behind for good, and the spool grew until it dropped."""
    bridge, store = spool_bridge(tmp_path)  # a new bridge starts at the log's head: empty
    port = MeshPort("devices")
    assert bridge.spool is not None
    rows = []
    for i in range(SPOOL_BATCH + 10):
        topic = "alerts/fire" if i % 100 == 0 else f"devices/{i}/telemetry"
        rec = port.raw_record(topic.encode(), b"x", b"", F_PERSISTENT)
        rows.append((rec[-16:], topic, 1, rec))
    store.log_append(rows)
    store.commit()
    broker = Broker(bridge)
    assert bridge._drain_spool_mqtt(broker) is True  # a full round done: go on at once
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


def test_a_round_the_broker_has_not_answered_is_not_sent_again(tmp_path: Path) -> None:
    """Found by an exploratory test: a broker that hung (SIGSTOP) for 12 s got each
    persistent export three times, for 30 s six: the round went again every 5 s while
    paho still held it, and paho sends what it holds again itself after a reconnect."""
    bridge, store = spool_bridge(tmp_path)
    log_alerts(store, 3)
    broker = Broker(bridge, answering=False)
    try:
        for _ in range(5):
            assert bridge._drain_spool_mqtt(broker) is False
        assert broker.topics == ["alerts/0", "alerts/1", "alerts/2"]
        assert broker.qos == [1, 1, 1]  # persistent: acknowledged, whatever the bridge's qos
        for mid in (1, 2, 3):
            broker.answer(mid)
        bridge._take_answers()
        assert bridge._drain_spool_mqtt(broker) is False
        assert bridge.spool is not None
        assert bridge.spool.cursor == 3
        assert bridge.counters["spooled"] == 3
        assert broker.topics == ["alerts/0", "alerts/1", "alerts/2"]
    finally:
        bridge.spool.close()  # type: ignore[union-attr]
        store.close()


def test_a_refusal_or_a_message_over_the_brokers_limit_is_counted_and_passed(
    tmp_path: Path,
) -> None:
    """Found by an exploratory test: a message over a broker's maximum packet size closed
    the connection; paho sent it again on every reconnect, and the bridge went up and down
    each second for good. The limit the broker announced is kept now. A refusal (an ACL's
    "not authorized") was counted as exported and passed unsaid."""
    bridge, store = spool_bridge(tmp_path)
    bridge._limits = broker_limits(SimpleNamespace(MaximumPacketSize=200))
    log_alerts(store, 3)
    port = MeshPort("devices")
    big = port.raw_record(b"alerts/big", b"x" * 500, b"", F_PERSISTENT)
    store.log_append([(big[-16:], "alerts/big", 1, big)])
    store.commit()
    broker = Broker(bridge, answering=False)
    try:
        assert bridge._drain_spool_mqtt(broker) is False
        assert broker.topics == ["alerts/0", "alerts/1", "alerts/2"]  # not the big one
        assert bridge.counters["refused_too_big"] == 1
        broker.answer(1)
        broker.answer(2, 0x87)  # not authorized
        broker.answer(3)
        bridge._take_answers()
        bridge._drain_spool_mqtt(broker)
        assert bridge.spool is not None
        assert bridge.spool.cursor == 4
        assert bridge.counters["refused"] == 1
        assert bridge.counters["spooled"] == 2
    finally:
        bridge.spool.close()  # type: ignore[union-attr]
        store.close()


def test_a_message_paho_could_not_queue_goes_in_a_later_round(tmp_path: Path) -> None:
    """Found in review: paho refuses a message id still in use (its 65,535 ids wrap while
    a hung broker holds some), with rc MQTT_ERR_QUEUE_SIZE, and sends nothing. The round
    took it for sent, an answer to the live export holding that id settled it, and the
    cursor moved past five events never sent."""
    bridge, store = spool_bridge(tmp_path)
    log_alerts(store, 5)
    broker = Broker(bridge)
    publish = broker.publish

    def third_refused(topic: str, data: bytes, **kwargs: Any) -> Any:
        info = publish(topic, data, **kwargs)
        if topic == "alerts/2" and broker.topics.count("alerts/2") == 1:
            info.rc = 15  # MQTT_ERR_QUEUE_SIZE: not queued, not sent
        return info

    broker.publish = third_refused  # type: ignore[method-assign]
    try:
        assert bridge._drain_spool_mqtt(broker) is True  # two went: more wait
        assert bridge.spool is not None
        assert bridge.spool.cursor == 2
        assert bridge._drain_spool_mqtt(broker) is False  # the rest
        assert bridge.spool.cursor == 5
        assert broker.topics == [
            "alerts/0",
            "alerts/1",
            "alerts/2",
            "alerts/2",
            "alerts/3",
            "alerts/4",
        ]
        assert bridge.counters["spooled"] == 5
    finally:
        bridge.spool.close()  # type: ignore[union-attr]
        store.close()


def test_a_round_with_a_qos_0_message_lost_goes_again(tmp_path: Path) -> None:
    """Found in review: at a broker that takes QoS 0 at most, paho drops the messages it
    had not written when the connection breaks, marks them lost (rc MQTT_ERR_CONN_LOST)
    and never answers them: the round waited for good, and every later persistent export
    with it."""
    bridge, store = spool_bridge(tmp_path)
    bridge._limits = broker_limits(SimpleNamespace(MaximumQoS=0))
    log_alerts(store, 3)
    broker = Broker(bridge, answering=False)
    try:
        assert bridge._drain_spool_mqtt(broker) is False
        assert broker.qos == [0, 0, 0]
        broker.answer(1)
        broker.infos[2].rc = 7  # MQTT_ERR_CONN_LOST
        broker.infos[2]._published = True
        assert bridge._drain_spool_mqtt(broker) is False  # dropped: nothing moves
        assert bridge.spool is not None
        assert bridge.spool.cursor == 0
        broker.answering = True
        assert bridge._drain_spool_mqtt(broker) is False  # again, answered this time
        assert bridge.spool.cursor == 3
        assert broker.topics[3:] == ["alerts/0", "alerts/1", "alerts/2"]
    finally:
        bridge.spool.close()  # type: ignore[union-attr]
        store.close()


def test_a_qos_0_message_paho_could_not_send_is_not_waited_for(tmp_path: Path) -> None:
    """Found in review: at QoS 0 (a broker that takes no more), a message published while
    paho has no connection is gone (rc MQTT_ERR_NO_CONN), and nothing ever marks it done:
    the round waited for it for good, and every later persistent export with it."""
    bridge, store = spool_bridge(tmp_path)
    bridge._limits = broker_limits(SimpleNamespace(MaximumQoS=0))
    log_alerts(store, 3)
    broker = Broker(bridge)
    publish = broker.publish

    def no_connection_from_the_second(topic: str, data: bytes, **kwargs: Any) -> Any:
        info = publish(topic, data, **kwargs)
        if len(broker.topics) == 2:
            info.rc, info._published = 4, False  # MQTT_ERR_NO_CONN: not kept at QoS 0
        return info

    broker.publish = no_connection_from_the_second  # type: ignore[method-assign]
    try:
        assert bridge._drain_spool_mqtt(broker) is True  # the first went: more wait
        assert bridge.spool is not None
        assert bridge.spool.cursor == 1
        assert bridge._drain_spool_mqtt(broker) is False  # the rest, sent again
        assert bridge.spool.cursor == 3
        assert broker.topics == ["alerts/0", "alerts/1", "alerts/1", "alerts/2"]
    finally:
        bridge.spool.close()  # type: ignore[union-attr]
        store.close()


def test_a_refusal_that_comes_as_the_round_is_settled_is_counted_as_one(tmp_path: Path) -> None:
    """Found in review: paho calls on_publish, then marks the message done. A refusal that
    came after the bridge had read the refusals, and before it looked at what was done,
    counted the refused message as delivered (spooled) and the refusal as a live
    export's."""
    bridge, store = spool_bridge(tmp_path, qos=1)
    log_alerts(store, 3)
    broker = Broker(bridge, answering=False)
    take = bridge._take_answers
    late = [2]

    def refusal_right_after() -> None:
        take()
        if late and bridge._round is not None:
            broker.answer(late.pop(), 0x87)  # not authorized, as paho delivers it

    bridge._take_answers = refusal_right_after  # type: ignore[method-assign]
    try:
        assert bridge._drain_spool_mqtt(broker) is False
        broker.answer(1)
        broker.answer(3)
        for _ in range(3):
            bridge._drain_spool_mqtt(broker)
        assert bridge.spool is not None
        assert bridge.spool.cursor == 3
        assert bridge.counters["refused"] == 1
        assert bridge.counters["spooled"] == 2
        assert bridge.counters["exported"] == 2
    finally:
        bridge.spool.close()  # type: ignore[union-attr]
        store.close()
