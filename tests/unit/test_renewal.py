"""Membership renewal (node/renewal.py): what the authority renews, and when a node asks.

Found in session 8's note: a node's record expired a year after it joined, with no way to
renew it, and every link with it was refused from then on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from node import membership as ms
from node import renewal, security

MESH = "plant"
AUTH = "aa" * 8
NODE = "bb" * 8
DAY = 86400


def authority(tmp_path: Path) -> security.Security:
    (tmp_path / "auth").mkdir()
    creds = security.init_mesh(
        tmp_path / "auth", mesh=MESH, node_id=AUTH, name="auth", now=time.time()
    )
    return security.Security(creds, tmp_path / "auth", AUTH, lambda _m: None)


def record(auth: security.Security, *, key: str, exp: float, node: str = NODE) -> dict[str, Any]:
    assert auth.creds.signing_key is not None
    rec = ms.member_record(mesh=MESH, node=node, key=key, name="b", role="node", expires=int(exp))
    return ms.sign(auth.creds.signing_key, rec)


KEY = "k" * 40


def test_the_authority_renews_a_valid_record_for_the_key_that_proves_it(tmp_path: Path) -> None:
    auth = authority(tmp_path)
    held = record(auth, key=KEY, exp=time.time() + 5 * DAY)
    ok, answer = auth.enroll({"renew": True, "node": NODE, "member": held}, KEY)
    assert ok, answer
    assert renewal.expires(answer["member"]) > time.time() + 364 * DAY
    member = ms.check_member(
        answer["member"], mesh=MESH, mesh_pk=auth.creds.mesh_pk, now=time.time(), curve_key=KEY
    )
    assert (member.node, member.name) == (NODE, "b")
    assert (auth.counters["renewed"], auth.counters["enrolled"]) == (1, 0)


@pytest.mark.parametrize(
    ("exp", "key", "node", "why"),
    [
        (-DAY, KEY, NODE, "expired"),
        (5 * DAY, "x" * 40, NODE, "another key"),  # a copied record
        (5 * DAY, KEY, "cc" * 8, "is for node"),  # claims another node id
    ],
)
def test_the_authority_refuses_what_a_link_would(
    tmp_path: Path, exp: float, key: str, node: str, why: str
) -> None:
    auth = authority(tmp_path)
    held = record(auth, key=KEY, exp=time.time() + exp)
    ok, answer = auth.enroll({"renew": True, "node": node, "member": held}, key)
    assert not ok
    assert why in answer["error"]
    assert auth.counters["renew_refused"] == 1


def test_a_revoked_member_is_not_renewed(tmp_path: Path) -> None:
    auth = authority(tmp_path)
    assert auth.creds.signing_key is not None
    revoked = ms.revocation_record(mesh=MESH, node=NODE, key=KEY, at=int(time.time()))
    auth.accept_revocations([ms.sign(auth.creds.signing_key, revoked)])
    held = record(auth, key=KEY, exp=time.time() + 5 * DAY)
    ok, answer = auth.enroll({"renew": True, "node": NODE, "member": held}, KEY)
    assert not ok
    assert "revoked" in answer["error"]


def test_the_authority_renews_its_own_record_only_when_due(tmp_path: Path) -> None:
    auth = authority(tmp_path)
    r = renewal.Renewal(auth, lambda _m: None)
    now = time.time()
    assert r.tick(now, 0.0) is None  # a year left
    assert r.tick(now + 340 * DAY, 1.0) is None  # checked again only after CHECK_EVERY
    got = r.tick(now + 340 * DAY, renewal.CHECK_EVERY)  # 25 days left: due
    assert got is not None
    assert renewal.expires(got) > now + 700 * DAY
    assert got["rec"]["node"] == AUTH


def test_a_record_that_is_not_due_is_not_renewed(tmp_path: Path) -> None:
    """Found in review: any member could ask again and again, each time costing the
    authority's loop a verification, a signature and a log line."""
    auth = authority(tmp_path)
    held = record(auth, key=KEY, exp=time.time() + 200 * DAY)
    ok, answer = auth.enroll({"renew": True, "node": NODE, "member": held}, KEY)
    assert not ok
    assert "not due" in answer["error"]
    # A good record asked early (its holder's clock is ahead) is no failed proof: its key
    # was blocked for 30 s, and the member cut off from the authority (secured scenario).
    assert KEY.encode() not in auth.policy.blocked
    ok, answer = auth.enroll({"renew": True, "node": NODE, "member": {"rec": {}}}, KEY)
    assert (ok, answer["error"].startswith("cannot renew:")) == (False, True)
    assert KEY.encode() in auth.policy.blocked  # a record that does not prove still is


def test_a_renewed_record_that_cannot_be_saved_is_kept_in_memory_and_saved_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: member.json not writable (disk full, read-only) stopped the node
    at each start once its record was due. It goes on with the record in memory, says
    why once, and saves it when it can. (An end-to-end test put a directory in the way
    of the temporary file; temporary names are now each writer's own, so the failure is
    made here, in the one writer.)"""
    auth = authority(tmp_path)
    logged: list[str] = []
    auth.log = logged.append
    real = security._write_private

    def disk_full(path: Path, text: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(security, "_write_private", disk_full)
    renewed = record(auth, key=KEY, exp=time.time() + 365 * DAY, node=AUTH)
    auth.install_member(renewed)  # does not raise: the node stays up
    auth.save_member()  # the next tick: still full, not logged again
    assert auth.creds.member == renewed
    assert len([m for m in logged if "cannot save the renewed membership" in m]) == 1
    monkeypatch.setattr(security, "_write_private", real)
    auth.save_member()  # the disk has room again
    saved = json.loads((tmp_path / "auth" / security.MEMBER_FILE).read_text())
    assert saved == renewed


def _join(auth: security.Security, node: str, key: str) -> tuple[bool, dict[str, Any]]:
    token = security.issue_token(
        auth.data_dir, url="tcp://127.0.0.1:1", ttl=60, uses=1, now=time.time()
    )
    body = {"token": token.token_id, "secret": token.secret, "node": node, "name": "n"}
    return auth.enroll(body, key)


def test_an_enrolled_node_id_cannot_be_taken_by_another_key(tmp_path: Path) -> None:
    """Found in an exploratory test: a copied node_id file and a fresh token took over a
    member's id; the member was cut off as a duplicate link, and revoking the copy revoked
    it too. Nor is a revoked id, or the authority's own, enrolled again."""
    auth = authority(tmp_path)
    logged: list[str] = []
    auth.log = logged.append
    assert _join(auth, NODE, KEY)[0]
    ok, answer = _join(auth, NODE, "x" * 40)
    assert not ok
    assert "already a member with another key" in answer["error"]
    assert "fresh data dir" in answer["error"]
    assert _join(auth, NODE, KEY)[0]  # the same node, its own key: enrolled again
    ok, answer = _join(auth, AUTH, "y" * 40)
    assert (ok, "this node's own" in answer["error"]) == (False, True)
    assert auth.creds.signing_key is not None
    other = "cc" * 8
    revoked = ms.revocation_record(mesh=MESH, node=other, key="z" * 40, at=int(time.time()))
    auth.accept_revocations([ms.sign(auth.creds.signing_key, revoked)])
    ok, answer = _join(auth, other, "w" * 40)
    assert (ok, "is revoked" in answer["error"]) == (False, True)
    assert len([line for line in logged if "refused enrollment" in line]) == 3  # was silent


def test_a_refused_token_does_not_block_the_joiner_key(tmp_path: Path) -> None:
    """A mistyped or used token blocked the joiner's key (kept across attempts) for 30 s:
    the right token then failed as "no answer from the node" (exploratory test)."""
    auth = authority(tmp_path)
    ok, _answer = auth.enroll({"token": "nope", "secret": "x", "node": NODE, "name": "b"}, KEY)
    assert not ok
    assert KEY.encode() not in auth.policy.blocked
    assert _join(auth, NODE, KEY)[0]


def test_an_authority_whose_clock_is_not_set_signs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clock faults: an authority at 1970 (no real-time clock, before NTP) enrolled nodes
    with records that expired in 1971, and every member it enrolled was refused after
    NTP; its tokens were expired for any joiner with a set clock."""
    from typer.testing import CliRunner

    from meshctl.cli import app
    from node import clock

    auth = authority(tmp_path)
    token = security.issue_token(
        auth.data_dir, url="tcp://127.0.0.1:1", ttl=60, uses=1, now=time.time()
    )
    held = record(auth, key=KEY, exp=time.time() + 5 * DAY)
    monkeypatch.setattr(clock.time, "time", lambda: 5.0)  # the host's clock says 1970
    body = {"token": token.token_id, "secret": token.secret, "node": NODE, "name": "n"}
    ok, answer = auth.enroll(body, KEY)
    assert not ok
    assert answer["error"] == (
        "cannot enroll now: the authority's clock says 1970-01-01 00:00:05 UTC, which cannot "
        "be right: set it (NTP) before issuing tokens, records or credentials, whose "
        "validity is counted from it"
    )
    ok, answer = auth.enroll({"renew": True, "node": NODE, "member": held}, KEY)
    assert (ok, answer["error"].startswith("cannot renew now: the authority's clock")) == (
        False,
        True,
    )
    runner = CliRunner()
    for argv in (["invite"], ["invite", "--client", "c"], ["init", "--mesh", "m2"]):
        result = runner.invoke(app, [*argv, "--data-dir", str(tmp_path / "auth")])
        assert result.exit_code == 1, (argv, result.output)
        assert "clock says 1970-01-01 00:00:05 UTC" in str(result.exception)


def test_an_expired_members_advice_names_its_clock(
    tmp_path: Path,
) -> None:
    """Clock faults: a member whose clock ran a year ahead was told to join again with a
    new token, when setting its clock was all it needed."""
    from dataclasses import replace

    auth = authority(tmp_path)
    logged: list[str] = []
    member = security.Security(
        replace(auth.creds, signing_key=None), auth.data_dir, AUTH, lambda _m: None
    )
    later = time.time() + 400 * DAY  # past the record's year
    assert renewal.Renewal(member, logged.append).tick(later, 0.0) is None
    (line,) = logged
    assert "join again with a new token" in line
    said = time.strftime("%Y-%m-%d", time.gmtime(later))
    assert f"unless this host's clock, which says {said}" in line
