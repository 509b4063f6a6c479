"""Node config: TOML text -> NodeConfig, sizes, overrides, and the template that parses back."""

from __future__ import annotations

import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
import tomllib
from hypothesis import given, settings
from hypothesis import strategies as st

from node.config import (
    FIELDS,
    NodeConfig,
    as_dict,
    load_config,
    parse_size,
    read_config,
    render_config,
    with_overrides,
)
from node.errors import ConfigError, InputError

# Example counts come from the profile in conftest.py; the central properties get more.
PROPS = settings(deadline=None)
DATA = Path(__file__).parent.parent / "data" / "config"

# ---- data files -----------------------------------------------------------------------------

GOOD = {
    "good-empty.toml": {},
    "good-minimal.toml": {"name": "edge-1"},
    "good-sizes.toml": {"max_payload": 65536},
    "good-full.toml": {
        "name": "plant1-gw",
        "mesh": "factory.eu-1",
        "data_dir": "/var/lib/meshctl",
        "listen": "127.0.0.1",
        "port": 0,
        "ipc": False,
        "max_payload": 512 * 1024,
        "client_queue": 50,
        "max_clients": 8,
        "max_subscriptions": 100,
        "log_level": "debug",
    },
}


def bad_files() -> list[Path]:
    return sorted(DATA.glob("bad-*.toml"))


def expected_error(path: Path) -> str:
    """Each bad file says on its first line what the error must name: ``# error: <key>``."""
    first = path.read_text("utf-8").splitlines()[0]
    assert first.startswith("# error: "), path
    return first.removeprefix("# error: ")


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_config_files(name: str) -> None:
    path = DATA / name
    want = replace(NodeConfig(), **GOOD[name])
    assert read_config(path) == want
    assert load_config(path.read_text("utf-8")) == want


@pytest.mark.parametrize("path", bad_files(), ids=lambda p: p.name)
def test_bad_config_files_name_the_file_and_key(path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        read_config(path)
    assert str(info.value).startswith(f"{path}: {expected_error(path)}")
    assert info.value.source == str(path)
    with pytest.raises(ConfigError, match="^" + re.escape(f"mesh.toml: {expected_error(path)}")):
        load_config(path.read_text("utf-8"), source="mesh.toml")


def test_data_files_are_all_covered() -> None:
    assert {p.name for p in DATA.glob("good-*.toml")} == set(GOOD)
    assert len(bad_files()) >= 10
    assert {p.name for p in DATA.glob("*.toml")} == set(GOOD) | {p.name for p in bad_files()}


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read") as info:
        read_config(path)
    assert str(path) in str(info.value)


def test_a_byte_order_mark_is_skipped(tmp_path: Path) -> None:
    """Notepad saves UTF-8 with a BOM; tomllib refused it at "line 1, column 1"."""
    path = tmp_path / "bom.toml"
    path.write_bytes('\ufeff[node]\nname = "café"\n'.encode())
    assert read_config(path).name == "café"


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[node]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_config(path)


# ---- inline tables of values ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "attr", "value"),
    [
        ('[node]\nname = ""', "name", ""),
        ('[node]\nname = "é-1.x_y"', "name", "é-1.x_y"),
        ('[node]\nname = "' + "n" * 63 + '"', "name", "n" * 63),
        ('[node]\nmesh = "a"', "mesh", "a"),
        ('[node]\nmesh = "' + "m" * 63 + '"', "mesh", "m" * 63),
        ('[node]\nmesh = "0a.b_c-d"', "mesh", "0a.b_c-d"),
        ('[node]\ndata_dir = "~/x"', "data_dir", "~/x"),
        ("[listen]\nport = 65535", "port", 65535),
        ("[listen]\nport = 0", "port", 0),
        ("[listen]\nipc = true", "ipc", True),
        ('[listen]\naddress = "::"', "listen", "::"),
        ("[limits]\nmax_payload = 1", "max_payload", 1),
        ('[limits]\nmax_payload = "64MiB"', "max_payload", 64 * 1024 * 1024),
        ('[limits]\nmax_payload = "1 KB"', "max_payload", 1000),
        ("[limits]\nclient_queue = 1_000_000", "client_queue", 1_000_000),
        ("[limits]\nmax_subscriptions = 10_000_000", "max_subscriptions", 10_000_000),
        ('[log]\nlevel = "error"', "log_level", "error"),
        ('[mqtt]\nlisten = "127.0.0.1:1883"', "mqtt_listen", "127.0.0.1:1883"),
        ('[mqtt]\nlisten = "[::1]:0"', "mqtt_listen", "[::1]:0"),
        ('[mqtt]\nlisten = ""', "mqtt_listen", ""),
        ("[mqtt]\nmax_inflight = 65535", "mqtt_max_inflight", 65535),
        ("[mqtt]\nmax_queued = 1", "mqtt_max_queued", 1),
        ("[mqtt]\nmax_sessions = 5", "mqtt_max_sessions", 5),
        ('[tuning]\nheap_keep = "64MiB"', "heap_keep", 64 * 1024 * 1024),
        ("[tuning]\nheap_keep = 0", "heap_keep", 0),
        ('[tuning]\nheap_keep = "1GiB"', "heap_keep", 1024**3),
    ],
)
def test_valid_values(text: str, attr: str, value: object) -> None:
    assert getattr(load_config(text), attr) == value


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[node]\nname = "' + "n" * 64 + '"', "node.name"),
        ('[node]\nname = "a b"', "node.name"),
        ('[node]\nname = "a*"', "node.name"),
        ("[node]\nname = 1", "node.name"),
        ('[node]\nmesh = ""', "node.mesh"),
        ('[node]\nmesh = "-a"', "node.mesh"),
        ('[node]\nmesh = "' + "m" * 64 + '"', "node.mesh"),
        ('[node]\nmesh = "a/b"', "node.mesh"),
        ("[node]\ndata_dir = 5", "node.data_dir"),
        ("[node]\nid = 5", "node.id"),
        ("[listen]\nport = -1", "listen.port"),
        ("[listen]\nport = true", "listen.port"),
        ("[listen]\nport = 1.0", "listen.port"),
        ("[listen]\nipc = 1", "listen.ipc"),
        ("[listen]\naddress = []", "listen.address"),
        ("[limits]\nmax_payload = -5", "limits.max_payload"),
        ('[limits]\nmax_payload = "65MiB"', "limits.max_payload"),
        ('[limits]\nmax_payload = "1.5MiB"', "limits.max_payload"),
        ("[limits]\nmax_payload = true", "limits.max_payload"),
        ("[limits]\nclient_queue = 0", "limits.client_queue"),
        ("[limits]\nclient_queue = 1_000_001", "limits.client_queue"),
        ("[limits]\nmax_clients = false", "limits.max_clients"),
        ('[limits]\nmax_subscriptions = "10"', "limits.max_subscriptions"),
        ('[log]\nlevel = "INFO"', "log.level"),
        ('[mqtt]\nlisten = "1883"', "mqtt.listen"),
        ('[mqtt]\nlisten = "host:http"', "mqtt.listen"),
        ('[mqtt]\nlisten = "host:70000"', "mqtt.listen"),
        ('[mqtt]\nlisten = ":1883"', "mqtt.listen"),
        ("[mqtt]\nmax_inflight = 0", "mqtt.max_inflight"),
        ("[mqtt]\nmax_queued = true", "mqtt.max_queued"),
        ("[mqtt]\nport = 1883", "mqtt.port"),
        ('[tuning]\nheap_keep = "2GiB"', "tuning.heap_keep"),
        ("[tuning]\nheap_keep = -1", "tuning.heap_keep"),
        ("[tuning]\nheap_keep = true", "tuning.heap_keep"),
        ("[log.level]\nx = 1", "log.level"),
        ("[[node]]\nname = 'x'", "node"),
        ("name = 'x'", "name"),
    ],
)
def test_invalid_values_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(text, source="mesh.toml")
    assert str(info.value).startswith(f"mesh.toml: {key}: ")
    assert info.value.key == key
    assert isinstance(info.value, InputError)


@pytest.mark.parametrize(
    ("link", "hint"),
    [
        ("10.0.0.2:4850", " (did you mean 'tcp://10.0.0.2:4850'?)"),
        ("udp://h:80", " (did you mean 'tcp://h:80'?)"),
        ("tcp:/h:80", " (did you mean 'tcp://h:80'?)"),
        ("tcp://host", ""),  # suggested 'tcp://host', the input itself (exploratory test)
        ("tcp://h:99999", ""),  # and no fix that fails again
    ],
)
def test_a_bad_link_suggests_only_a_fix_that_holds(link: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(f'[mesh]\nlinks = ["{link}"]', source="mesh.toml")
    assert str(info.value).endswith(f"is not a tcp://host:port URL{hint}")


@pytest.mark.parametrize("key", ["", "short", "x" * 41])
def test_a_bad_key_in_a_link_is_named_as_the_key(key: str) -> None:
    """``tcp://host:port#KEY`` with a key of the wrong length was "not a tcp://host:port
    URL", which sent the operator looking at the address (noted in session 9)."""
    with pytest.raises(ConfigError, match=r"the key after '#' must be .* 40 Z85") as info:
        load_config(f'[mesh]\nlinks = ["tcp://10.0.0.2:4850#{key}"]', source="mesh.toml")
    assert str(info.value).endswith(f"got {len(key)}")
    load_config(f'[mesh]\nlinks = ["tcp://10.0.0.2:4850#{"k" * 40}"]')  # fine


@pytest.mark.parametrize(
    "text", ['[mesh]\nheartbeat = "5s"', '[mesh]\nheartbeat = "1s"\ndead_after = "1s"']
)
def test_a_dead_after_no_longer_than_the_heartbeat_is_refused(text: str) -> None:
    """Such a node declares live links dead between two beats (found in review)."""
    with pytest.raises(ConfigError, match=r"must be longer than mesh\.heartbeat") as info:
        load_config(text, source="mesh.toml")
    assert info.value.key == "mesh.dead_after"
    load_config('[mesh]\nheartbeat = "5s"\ndead_after = "12s"')  # fine


def test_unknown_key_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown key \(known: address, port, ipc"):
        load_config("[listen]\nhost = 'x'")


def test_invalid_toml_names_the_source() -> None:
    with pytest.raises(ConfigError, match=r"^x\.toml: not valid TOML"):
        load_config("[", source="x.toml")


def test_mesh_name_with_trailing_newline_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"node\.mesh"):
        load_config('[node]\nmesh = "abc\\n"')


# ---- parse_size -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (1024, 1024),
        ("0", 0),
        ("17", 17),
        ("17B", 17),
        ("1KiB", 1024),
        ("512KiB", 512 * 1024),
        ("1MiB", 1024**2),
        ("2GiB", 2 * 1024**3),
        ("1KB", 1000),
        ("3MB", 3_000_000),
        ("1GB", 10**9),
        (" 1 MiB ", 1024**2),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    "value",
    [-1, True, False, 1.5, None, "", "MiB", "-1", "1.5MiB", "1kib", "1 TB", "1MiBs", "0x10", [1]],
)
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(value)


UNITS = {
    "": 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


@PROPS
@given(n=st.integers(0, 10**6), unit=st.sampled_from(sorted(UNITS)))
def test_parse_size_units(n: int, unit: str) -> None:
    factor = UNITS[unit]
    assert parse_size(f"{n}{unit}") == n * factor
    assert parse_size(f" {n} {unit} ") == n * factor
    assert parse_size(n) == n


# ---- overrides -------------------------------------------------------------------------------


def test_with_overrides_applies_and_checks() -> None:
    base = NodeConfig()
    got = with_overrides(base, {"port": 0, "max_payload": "1KiB", "name": None}, source="args")
    assert got == replace(base, port=0, max_payload=1024)
    assert with_overrides(base, {}, source="args") == base


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"port": 70000}, "--port"),
        ({"max_payload": "huge"}, "--max-payload"),
        ({"log_level": "loud"}, "--log-level"),
        ({"mesh": "a b"}, "--mesh"),
        ({"links": ["tcp://h:0"]}, "--link"),  # it said --links (exploratory test)
    ],
)
def test_with_overrides_names_the_option(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        with_overrides(NodeConfig(), overrides, source="command line")
    assert str(info.value).startswith(f"command line: {key}: ")


# ---- render_config and as_dict ---------------------------------------------------------------


def test_template_parses_back_to_the_defaults() -> None:
    text = render_config(NodeConfig(), comments=True)
    assert load_config(text) == NodeConfig()
    assert load_config(render_config(NodeConfig(), comments=False)) == NodeConfig()


def test_template_documents_every_key() -> None:
    text = render_config(NodeConfig(), comments=True)
    for f in FIELDS:
        assert f"[{f.section}]" in text
        assert f"\n{f.key} = " in text
        assert f"# {f.help}" in text
    assert "#" not in render_config(NodeConfig(), comments=False)


def test_fields_cover_node_config() -> None:
    # [[bridge]] tables are the one part not in FIELDS (an array of tables, bridge_config.py)
    assert {f.attr for f in FIELDS} | {"bridges"} == {f.name for f in fields(NodeConfig)}
    assert len({(f.section, f.key) for f in FIELDS}) == len(FIELDS)


def test_as_dict_is_the_toml_shape() -> None:
    cfg = replace(NodeConfig(), name="n1", port=1, ipc=False)
    d = as_dict(cfg)
    assert d["node"]["name"] == "n1"
    assert d["listen"] == {"address": "0.0.0.0", "port": 1, "ipc": False}
    assert d["log"] == {"level": "info"}
    assert sum(len(v) for v in d.values()) == len(FIELDS)
    assert tomllib.loads(render_config(cfg, comments=True)) == d


# Values the checks accept, including characters that need escaping in TOML.
safe_text = st.text(alphabet=st.sampled_from("abz09_.-\"\\'é€😀#[]= "), max_size=20)
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "name": st.text(alphabet=st.sampled_from("abz09_.-\"\\'é€#[]="), max_size=63),
    "mesh": st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z"),
    "data_dir": safe_text,
    "listen": safe_text,
    "port": st.integers(0, 65535),
    "ipc": st.booleans(),
    "max_payload": st.integers(1, 64 * 1024 * 1024),
    "client_queue": st.integers(1, 1_000_000),
    "max_clients": st.integers(1, 1_000_000),
    "max_subscriptions": st.integers(1, 10_000_000),
    "log_level": st.sampled_from(["debug", "info", "warning", "error"]),
    "mqtt_listen": st.sampled_from(["", "127.0.0.1:1883", "[::1]:0", "broker.local:8883"]),
    "mqtt_max_inflight": st.integers(1, 65535),
    "mqtt_max_queued": st.integers(1, 1_000_000),
    "mqtt_max_sessions": st.integers(1, 1_000_000),
}


@st.composite
def configs(draw: st.DrawFn) -> NodeConfig:
    changes = {
        attr: draw(strategy)
        for attr, strategy in VALUES.items()
        if attr in {f.attr for f in FIELDS} and draw(st.booleans())
    }
    return replace(NodeConfig(), **changes)


@PROPS
@given(cfg=configs(), comments=st.booleans())
def test_render_round_trips(cfg: NodeConfig, comments: bool) -> None:
    text = render_config(cfg, comments=comments)
    assert load_config(text) == cfg
    assert tomllib.loads(text) == as_dict(cfg)


@pytest.mark.parametrize("text", ['[node]\ndata_dir = "a\\u0001b"', '[listen]\naddress = "a\\nb"'])
def test_render_round_trips_control_characters(text: str) -> None:
    cfg = load_config(text)
    assert load_config(render_config(cfg, comments=False)) == cfg
