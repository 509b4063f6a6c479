"""The mDNS instance label made from a node's name (node/discovery.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zeroconf import ServiceInfo

from node.discovery import SERVICE_TYPE, instance_label


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
