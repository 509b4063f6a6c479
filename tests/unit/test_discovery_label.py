"""The mDNS instance label made from a node's name (node/discovery.py)."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zeroconf import ServiceInfo

from node.discovery import SERVICE_TYPE, instance_label, pick_address


@given(st.text(max_size=100))
def test_every_name_makes_a_label_zeroconf_takes(name: str) -> None:
    """Found in an exploratory test: a name of 55-63 characters, multi-byte ones sooner,
    or one with a control character (a host name is not checked) ended `meshctl up` with
    BadTypeInNameException: the label with "-" and 8 hex digits is held to 63 bytes."""
    label = instance_label(name)
    assert 0 < len(label.encode()) <= 54
    ServiceInfo(SERVICE_TYPE, f"{label}-0123abcd.{SERVICE_TYPE}", port=1)


@pytest.mark.parametrize(
    ("name", "label"), [("plant-7", "plant-7"), ("a\x01b", "ab"), ("", "node")]
)
def test_ordinary_names_are_kept(name: str, label: str) -> None:
    assert instance_label(name) == label


def test_a_peer_is_dialed_at_an_address_that_is_not_this_nodes_own() -> None:
    """Found in a lab test: two gateways with the same address on a second card (both
    10.0.0.1, port 4850) dialed the first advertised address: themselves."""
    own = {"127.0.0.1", "10.0.0.1", "10.250.0.1"}
    nets = [IPv4Network("10.0.0.0/24"), IPv4Network("10.250.0.0/24")]
    peer = ["10.0.0.1", "10.250.0.2"]
    assert pick_address(peer, True, own, nets) == "10.250.0.2"
    assert pick_address(["10.0.0.1"], True, own, nets) is None  # all ours: not dialed
    # Another node on this host, on another port: its address is ours, and that is fine.
    assert pick_address(["127.0.0.1"], False, own, nets) == "127.0.0.1"
    # Off our networks only: the first it gives.
    assert pick_address(["192.168.9.9", "172.16.0.1"], True, own, nets) == "192.168.9.9"
    assert pick_address(["192.168.9.9", "10.250.0.7"], True, own, nets) == "10.250.0.7"
