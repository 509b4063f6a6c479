"""MQTT users: password hashes, the users file, the CONNECT verdict and subscribe rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge.mqtt_auth import (
    Authenticator,
    User,
    UsersFileError,
    check_name,
    hash_password,
    load_users,
    save_users,
    verify_password,
)
from edge.mqtt_codec import CONNACK_BAD_CREDENTIALS, CONNACK_NOT_AUTHORIZED
from edge.mqtt_connect import allowed
from edge.mqtt_session import SessionTable
from node.errors import InputError
from node.membership import Permissions

SENSOR = Permissions(pub_allow=("sensors/>",), sub_allow=("cmd/>",))


def test_hash_verifies_only_its_password() -> None:
    stored = hash_password("right horse")
    assert stored.startswith("scrypt$")
    assert verify_password(b"right horse", stored)
    assert not verify_password(b"right hors", stored)
    assert hash_password("right horse") != stored  # a fresh salt each time


@pytest.mark.parametrize(
    "stored",
    ["", "plain", "md5$1$2$3$00$00", "scrypt$x$8$1$00$00", "scrypt$16384$8$1$zz$00",
     "scrypt$3$8$1$00$00", f"scrypt$16384$8$1$00${'00' * 65}", "scrypt$1099511627776$8$1$00$00"],
)  # fmt: skip
def test_malformed_hashes_never_verify(stored: str) -> None:
    assert not verify_password(b"x", stored)


@pytest.mark.parametrize("name", ["", "a" * 257, "tab\there", "del\x7f"])
def test_bad_user_names(name: str) -> None:
    with pytest.raises(InputError):
        check_name(name)


def test_users_file_round_trip_is_private(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    users = {"dev": User("dev", hash_password("pw"), SENSOR)}
    save_users(path, users)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_users(path) == users
    assert load_users(tmp_path / "none.json") == {}


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[]",
        '{"users": []}',
        '{"users": {"a": {}}}',
        '{"users": {"a": {"hash": "h", "perms": {"pub_allow": "x"}}}}',
    ],
)
def test_broken_users_files_are_one_clear_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "users.json"
    path.write_text(text)
    with pytest.raises(UsersFileError, match=r"users\.json"):
        load_users(path)


def test_connect_verdicts(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    auth = Authenticator(path, anonymous=False)
    assert auth.check(None, None) == CONNACK_NOT_AUTHORIZED
    assert auth.check("dev", b"pw") == CONNACK_BAD_CREDENTIALS  # no file yet
    save_users(path, {"dev": User("dev", hash_password("pw"), SENSOR)})
    assert auth.check("dev", b"pw") == SENSOR  # the new file is read at the next CONNECT
    assert auth.check("dev", b"pw") == SENSOR  # (remembered: no second scrypt)
    assert auth.check("dev", b"nope") == CONNACK_BAD_CREDENTIALS
    assert auth.check("dev", None) == CONNACK_BAD_CREDENTIALS
    assert auth.check("other", b"pw") == CONNACK_BAD_CREDENTIALS
    assert Authenticator(path, anonymous=True).check(None, None) == Permissions()


def test_an_open_listener_without_users_takes_any_user_name(tmp_path: Path) -> None:
    """As mosquitto with anonymous clients and no password file (conformance review: a
    device that brought a user name was refused by an open node). Once there are users,
    names are checked."""
    path = tmp_path / "users.json"
    auth = Authenticator(path, anonymous=True)
    assert not auth.names_checked()  # the listener takes such a client as anonymous
    save_users(path, {"dev": User("dev", hash_password("pw"), SENSOR)})
    assert auth.names_checked()
    assert auth.check("dev", b"pw") == SENSOR
    assert auth.check("other", b"pw") == CONNACK_BAD_CREDENTIALS
    assert auth.check(None, None) == Permissions()
    assert Authenticator(tmp_path / "none.json", anonymous=False).names_checked()


def test_a_changed_or_removed_user_takes_effect_at_once(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    save_users(path, {"dev": User("dev", hash_password("old"), SENSOR)})
    auth = Authenticator(path, anonymous=False)
    assert auth.check("dev", b"old") == SENSOR
    save_users(path, {"dev": User("dev", hash_password("new"), Permissions())})
    os.utime(path, ns=(1, 1))  # mtime changes even on a coarse clock
    assert auth.check("dev", b"old") == CONNACK_BAD_CREDENTIALS  # the remembered one too
    assert auth.check("dev", b"new") == Permissions()
    path.unlink()
    assert auth.check("dev", b"new") == CONNACK_BAD_CREDENTIALS


def test_a_broken_file_keeps_the_last_users_and_says_why(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    save_users(path, {"dev": User("dev", hash_password("pw"), SENSOR)})
    auth = Authenticator(path, anonymous=False)
    assert auth.check("dev", b"pw") == SENSOR
    path.write_text("{")
    os.utime(path, ns=(2, 2))
    assert auth.check("dev", b"pw") == SENSOR
    assert "users.json" in auth.error


@pytest.mark.parametrize(
    ("patterns", "kept", "refused"),
    [
        (("cmd", "cmd/>"), ("cmd/>",), False),  # cmd/# with sub_allow cmd/>: cmd is left out
        (("cmd/a",), ("cmd/a",), False),
        (("secrets/>",), None, True),
        ((">",), None, True),
        (("cmd/*", "cmd/*/>"), ("cmd/*", "cmd/*/>"), False),
    ],
)
def test_subscribe_filters_keep_only_what_the_rules_allow(
    patterns: tuple[str, ...], kept: tuple[str, ...] | None, refused: bool
) -> None:
    got, why = allowed(SENSOR, patterns)
    assert (why is not None) == refused
    if not refused:
        assert got == kept


def test_another_user_does_not_inherit_a_persistent_session() -> None:
    table = SessionTable(10)
    first, present, _ = table.attach("dev-1", False, owner="alice")
    assert not present
    table.detach(first)
    again, present, _ = table.attach("dev-1", False, owner="alice")
    assert present
    assert again is first
    table.detach(again)
    other, present, ended = table.attach("dev-1", False, owner="mallory")
    assert not present
    assert ended == [first]
    assert other is not first


def test_unknown_users_cost_a_hash_like_known_ones(tmp_path: Path) -> None:
    """Found in review: unknown names were refused at once and known ones after a scrypt,
    so timing told which user names exist. Both now go to the hashing worker."""
    path = tmp_path / "users.json"
    save_users(path, {"dev": User("dev", hash_password("pw"), SENSOR)})
    auth = Authenticator(path, anonymous=False)
    assert auth.quick("nobody", b"pw") is None  # needs the (slow) check, as "dev" does
    assert auth.quick("dev", b"pw") is None
    assert auth.quick("dev", None) == CONNACK_BAD_CREDENTIALS  # no password: nothing to hash
    assert auth.verify("nobody", b"pw") == CONNACK_BAD_CREDENTIALS
    assert auth.verify("dev", b"pw") == SENSOR
    assert auth.quick("dev", b"pw") == SENSOR  # remembered now


def test_a_fleet_larger_than_the_memory_stays_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an audit: the memory of verified passwords was cleared whole when full, so
    past 10,000 devices most reconnects paid scrypt (44 ms each, on one worker) again."""
    import edge.mqtt_auth

    monkeypatch.setattr(edge.mqtt_auth, "_REMEMBERED", 3)
    path = tmp_path / "users.json"
    names = [f"dev{i}" for i in range(6)]
    save_users(path, {n: User(n, hash_password(f"pw-{n}"), SENSOR) for n in names})
    auth = Authenticator(path, anonymous=False)
    for n in names:
        assert auth.check(n, f"pw-{n}".encode()) == SENSOR
    assert [auth.quick(n, f"pw-{n}".encode()) for n in names] == [SENSOR] * 6
