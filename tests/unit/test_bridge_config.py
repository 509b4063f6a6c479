"""``[[bridge]]`` tables -> BridgeConfig: defaults, TLS settings, and every refusal naming
``bridge[i].key`` (node/bridge_config.py is pure: no files are read here)."""

from __future__ import annotations

from typing import Any

import pytest

from node.bridge_config import BridgeConfig, parse_bridges
from node.errors import ConfigError

MQTT: dict[str, Any] = {"kind": "mqtt", "url": "mqtt://broker", "export": ["a/>"]}
NATS: dict[str, Any] = {"kind": "nats", "url": "nats://server", "import": ["a.>"]}


def one(**item: Any) -> BridgeConfig:
    (bridge,) = parse_bridges([item], "node.toml")
    return bridge


def test_defaults_come_from_the_url() -> None:
    b = one(**MQTT)
    assert (b.kind, b.name, b.host, b.port, b.tls, b.qos) == (
        "mqtt",
        "mqtt",
        "broker",
        1883,
        False,
        0,
    )
    assert one(**MQTT | {"url": "mqtts://broker"}).port == 8883
    assert one(**MQTT | {"url": "mqtts://broker"}).tls is True
    n = one(**NATS | {"url": "tls://server:4443", "name": "cloud"})
    assert (n.port, n.tls, n.name, n.imports) == (4443, True, "cloud", ("a.>",))


def test_tls_files_are_kept_and_turn_tls_on() -> None:
    b = one(**MQTT, ca_file="/etc/ca.pem", cert_file="dev.crt", key_file="dev.key")
    assert (b.tls, b.ca_file, b.cert_file, b.key_file) == (
        True,
        "/etc/ca.pem",
        "dev.crt",
        "dev.key",
    )
    assert one(**NATS, ca_file="ca.pem").tls is True


@pytest.mark.parametrize(
    ("item", "key", "why"),
    [
        (MQTT | {"kind": "amqp"}, "kind", "not one of"),
        (MQTT | {"url": "nats://x"}, "url", "not a mqtt URL"),
        (NATS | {"url": "mqtt://x"}, "url", "not a nats URL"),
        (MQTT | {"url": "mqtt://x:0"}, "url", "outside"),
        (MQTT | {"name": "a b"}, "name", "letters"),
        (MQTT | {"username": 5}, "username", "string"),
        (MQTT | {"tls": "yes"}, "tls", "true or false"),
        (MQTT | {"qos": 2}, "qos", "0 or 1"),
        (MQTT | {"qos": 1.0}, "qos", "0 or 1"),  # accepted; paho raised in its thread
        (MQTT | {"export": ["a//b"]}, "export", ""),
        # Each would match events and refuse every one (exploratory test of dialects):
        (MQTT | {"export": ["a+b/>"]}, "export", "wildcards in MQTT"),
        (NATS | {"export": ["a.b/>"]}, "export", "a NATS token cannot"),
        (NATS | {"remote_prefix": "a.b/c"}, "remote_prefix", "a NATS token cannot"),
        (MQTT | {"local_prefix": "$mesh"}, "local_prefix", "reserved in the mesh"),
        # MQTT keeps one subscription per filter: the second replaced the first (review).
        (MQTT | {"import": ["dup/#", "dup/#"]}, "import", "'dup/#' is listed twice"),
        (MQTT | {"export": ["a/>", "a/>"]}, "export", "'a/>' is listed twice"),
        (MQTT | {"export": []}, "import", "needs import or export"),
        (MQTT | {"local_prefix": "a//b"}, "local_prefix", ""),
        (MQTT | {"colour": "red"}, "colour", "unknown key"),
        # Import patterns are checked as exports are (exploratory test: a bad one passed,
        # then raised in the client library's thread and the bridge never came up).
        (MQTT | {"import": ["a/#/b"]}, "import", "'#' must be the last level"),
        (MQTT | {"import": ["a/b+"]}, "import", "wildcard inside level 2"),
        (MQTT | {"import": ["a//b"]}, "import", "empty levels"),
        (MQTT | {"import": ["a/*"]}, "import", "'*', '>' or NUL"),
        (MQTT | {"import": ["$SYS/#"]}, "import", "reserved"),
        (MQTT | {"import": ["$share/g/a"]}, "import", "no $share"),
        (NATS | {"import": ["a b"]}, "import", "whitespace"),
        (NATS | {"import": ["a.>.b"]}, "import", "'>' must be the last level"),
        (NATS | {"import": ["a..b"]}, "import", "empty levels"),
        (NATS | {"import": ["a/b.c"]}, "import", "holds '/'"),
        (NATS | {"import": ["_INBOX.>"]}, "import", "reserved"),
        # Accepted, then every message refused at run time (exploratory test):
        (MQTT | {"import": ["sensors/#"], "remote_prefix": "plant"}, "import", "under remote"),
        (NATS | {"import": ["plant.m.>"], "remote_prefix": "plant.n"}, "import", "'plant.n'"),
        (MQTT | {"export": ["other/>"], "local_prefix": "site"}, "export", "under local"),
        (MQTT | {"import": ["x/$SYS/#"], "remote_prefix": "x"}, "import", "reserved"),
        (MQTT | {"import": ["$aws/things"], "remote_prefix": "$aws/things"}, "import", "itself"),
        (NATS | {"remote_prefix": "a.*"}, "remote_prefix", ""),
        (MQTT | {"remote_prefix": "a/+"}, "remote_prefix", "no wildcards"),
        (NATS | {"qos": 1}, "qos", "applies to MQTT"),  # it was accepted and ignored
        (NATS | {"url": "nats://u:p@h", "username": "v"}, "url", "give one"),
        (MQTT | {"ca_file": 1}, "ca_file", "string"),
        (MQTT | {"cert_file": "c.crt"}, "key_file", "go together"),
        (MQTT | {"key_file": "c.key"}, "cert_file", "go together"),
        (MQTT | {"tls": False, "ca_file": "ca.pem"}, "ca_file", "tls = false"),
        (
            MQTT | {"url": "mqtts://x", "tls": False, "cert_file": "c", "key_file": "k"},
            "cert_file",
            "tls = false",
        ),
    ],
)
def test_refusals_name_the_key(item: dict[str, Any], key: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_bridges([item], "node.toml")
    assert info.value.key == f"bridge[0].{key}"
    assert why in info.value.reason


def test_names_are_unique_and_the_array_is_an_array() -> None:
    with pytest.raises(ConfigError, match=r"bridge\[1\]\.name: 'mqtt' is used twice"):
        parse_bridges([MQTT, MQTT], "node.toml")
    with pytest.raises(ConfigError, match="array of tables"):
        parse_bridges({"kind": "mqtt"}, "node.toml")


def test_good_imports_pass_and_a_nats_prefix_is_written_the_nats_way() -> None:
    assert one(**MQTT | {"import": ["#", "a/+/b", "a/#"]}).imports == ("#", "a/+/b", "a/#")
    assert one(**NATS | {"import": [">", "a.*.b"]}).imports == (">", "a.*.b")
    # Found by an exploratory test: "plant.n" was compared with mesh topics as it stood,
    # and every event was refused without a word. It is kept in mesh form; the mesh form
    # it needed before still reads the same.
    plant = {"import": ["plant.n.>"]}
    assert one(**NATS | plant | {"remote_prefix": "plant.n"}).remote_prefix == "plant/n"
    assert one(**NATS | plant | {"remote_prefix": "plant/n"}).remote_prefix == "plant/n"
    assert one(**MQTT | {"remote_prefix": "plant/n"}).remote_prefix == "plant/n"


def test_credentials_may_be_written_in_the_url() -> None:
    """`nats://user:pw@server:4222`, as NATS and MQTT tools take it, was refused as "not a
    nats URL" (exploratory test); %-escapes are decoded, and the URL shown has none."""
    b = one(**NATS | {"url": "nats://svc:p%40ss@server:4223"})
    assert (b.username, b.password, b.host, b.port) == ("svc", "p@ss", "server", 4223)
    assert b.url == "nats://server:4223"
    m = one(**MQTT | {"url": "mqtts://dev1@broker"})
    assert (m.username, m.password, m.host, m.port, m.tls) == ("dev1", "", "broker", 8883, True)


def test_the_local_prefix_of_an_export_needs_no_remote_form() -> None:
    """It is stripped before the rest is mapped: "plant.v1/>" with local prefix "plant.v1"
    exports "line.temp" to NATS, and was refused when every level was checked (review)."""
    (nats,) = parse_bridges([NATS | {"local_prefix": "plant.v1", "export": ["plant.v1/>"]}], "t")
    assert nats.exports == ("plant.v1/>",)
    (mqtt,) = parse_bridges([MQTT | {"local_prefix": "c++", "export": ["c++/>"]}], "t")
    assert mqtt.exports == ("c++/>",)


def test_prefixes_may_take_an_import_out_of_the_reserved_space() -> None:
    """Found by an exploratory test: AWS IoT shadows and a broker's $SYS topics could not
    be imported, though the prefixes take them out of the mesh's reserved space."""
    aws = {"remote_prefix": "$aws/things", "local_prefix": "aws", "export": ["aws/>"]}
    b = one(**MQTT | aws | {"import": ["$aws/things/+/shadow/#"]})
    assert b.imports == ("$aws/things/+/shadow/#",)
    assert one(**MQTT | {"import": ["$SYS/#"], "remote_prefix": "$SYS"}).imports == ("$SYS/#",)
    sys = {"import": ["$SYS/#"], "local_prefix": "sys", "export": ["sys/>"]}  # sys/$SYS/...
    assert one(**MQTT | sys).imports == ("$SYS/#",)
    good = {"export": ["site/>", "*/x", ">"], "local_prefix": "site"}
    assert one(**MQTT | good).exports == ("site/>", "*/x", ">")
