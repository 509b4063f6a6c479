"""Revocations at the size a long-lived mesh reaches: all kept, all passed on."""

from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from node import datadir, security
from node import membership as ms
from node.codec import MAX_CONTROL_BYTES, Kind, decode_control
from node.loop_security import revocation_frames

MESH = "plant"
NODE = "aa" * 8


def revocations(creds: Any, n: int) -> list[dict[str, Any]]:
    at = int(time.time())
    return [
        ms.sign(
            creds.signing_key,
            ms.revocation_record(
                mesh=MESH, node=secrets.token_hex(8), key=secrets.token_urlsafe(30)[:40], at=at
            ),
        )
        for _ in range(n)
    ]


def test_a_long_revocation_list_is_read_whole(tmp_path: Path) -> None:
    """Found by an audit: at most 1,000 were read from revoked.json, so past that a node
    started with part of the list, and a later `meshctl revoke` was never applied."""
    creds = security.init_mesh(tmp_path, mesh=MESH, node_id=NODE, name="auth", now=time.time())
    revs = revocations(creds, 1_200)
    (tmp_path / security.REVOKED_FILE).write_text(json.dumps(revs))
    sec = security.Security(creds, tmp_path, NODE, lambda _m: None)
    last = revs[-1]["rec"]
    assert sec.is_revoked(last["node"])
    assert len(sec.revocations) == 1_200
    assert sec.accept_revocations(revs) == []  # all known: nothing new, nothing checked


def test_a_list_learnt_at_once_is_one_log_line_and_a_few_are_told_each(tmp_path: Path) -> None:
    """Found in a secured plant's review: a node that joined logged each revocation the
    mesh knew as "node X revoked: its links and sessions are closed", hundreds of lines
    of what it never had."""
    creds = security.init_mesh(tmp_path, mesh=MESH, node_id=NODE, name="auth", now=time.time())
    lines: list[str] = []
    sec = security.Security(creds, tmp_path, NODE, lines.append)
    assert len(sec.accept_revocations(revocations(creds, 200))) == 200
    assert len(lines) == 1
    assert lines[0].startswith("learnt 200 revocations (node ")
    lines.clear()
    (one,) = revocations(creds, 1)
    assert sec.accept_revocations([one]) == [one]
    assert lines == [f"node {one['rec']['node']} revoked: its links and sessions are closed"]


def test_revocations_go_in_frames_every_receiver_reads(tmp_path: Path) -> None:
    """Found by an audit: all of them went in one REVOKE frame, which every receiver
    refused past ~245 (over 64 KiB): revocations stopped spreading."""
    creds = security.init_mesh(tmp_path, mesh=MESH, node_id=NODE, name="auth", now=time.time())
    revs = revocations(creds, 600)
    frames = revocation_frames(revs)
    assert len(frames) > 1
    got = []
    for frame in frames:
        assert len(frame) <= MAX_CONTROL_BYTES
        kind, body = decode_control(frame)
        assert kind == Kind.REVOKE
        got += body["revocations"]
    assert got == revs


def test_a_crash_while_a_mesh_is_created_leaves_a_data_dir_that_starts_afresh(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """mesh.json was written before member.json: a crash between them left a data dir
    that "already belongs to a mesh" with no record, and the node never started again."""
    real = security._write_private

    def crash_at_the_record(path: Path, text: str) -> None:
        if path.name == security.MEMBER_FILE:
            raise OSError("crash")
        real(path, text)

    monkeypatch.setattr(security, "_write_private", crash_at_the_record)
    with pytest.raises(OSError, match="crash"):
        security.init_mesh(tmp_path, mesh=MESH, node_id=NODE, name="a", now=time.time())
    monkeypatch.setattr(security, "_write_private", real)
    assert security.load_credentials(tmp_path) is None
    creds = security.init_mesh(tmp_path, mesh=MESH, node_id=NODE, name="a", now=time.time())
    assert creds.mesh == MESH
    assert not list(tmp_path.glob("*.tmp"))


def test_revocations_are_written_whole(tmp_path: Path) -> None:
    """revoked.json was a plain write_text: a crash in it left a truncated file that
    stopped the node at every start. Written to a temp file and renamed, it is whole."""
    creds = security.init_mesh(tmp_path, mesh=MESH, node_id=NODE, name="a", now=time.time())
    signed = security.revoke(tmp_path, node="bb" * 8, key="k" * 40, now=time.time())
    assert json.loads((tmp_path / security.REVOKED_FILE).read_text()) == [signed]
    assert ms.check_revocation(signed, mesh=MESH, mesh_pk=creds.mesh_pk)["role"] == "node"
    assert (tmp_path / security.REVOKED_FILE).stat().st_mode & 0o777 == 0o600


def test_a_revoke_while_the_node_saves_a_flooded_one_is_kept_and_applied(
    tmp_path: Path,
) -> None:
    """Found in a read of the code: the node wrote its own list over revoked.json when a
    revocation arrived from the mesh. One that `meshctl revoke` had added since the node's
    last look was lost from the file and never applied: the revoked node stayed in."""
    creds = security.init_mesh(tmp_path, mesh=MESH, node_id=NODE, name="auth", now=time.time())
    sec = security.Security(creds, tmp_path, NODE, lambda _m: None)
    by_cli = security.revoke(tmp_path, node="bb" * 8, key="k" * 40, now=time.time())
    flooded = revocations(creds, 1)
    assert sec.accept_revocations(flooded) == flooded  # before the node looked at the file
    on_disk = json.loads((tmp_path / security.REVOKED_FILE).read_text())
    assert by_cli in on_disk
    assert flooded[0] in on_disk
    assert sec.poll_revocations_file() == [by_cli]
    assert sec.is_revoked("bb" * 8)
    assert sec.poll_revocations_file() == []
    assert len(json.loads((tmp_path / security.REVOKED_FILE).read_text())) == 2


def test_two_writers_of_one_state_file_do_not_share_a_temporary_file(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Both wrote NAME.tmp: a second writer between the first's write and its rename took
    the first's file away (the first failed) or had its half-written file renamed."""
    path = tmp_path / "revoked.json"
    real = datadir.os.replace
    inner: list[bool] = []

    def second_writer_meanwhile(src: Any, dst: Any) -> None:
        if not inner:
            inner.append(True)
            datadir.write_whole(path, "second")
        real(src, dst)

    monkeypatch.setattr(datadir.os, "replace", second_writer_meanwhile)
    datadir.write_whole(path, "first")
    assert path.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["revoked.json"]


@pytest.mark.parametrize("file", ["tokens", "members", "token_revoke"])
def test_commands_that_change_a_file_the_node_also_changes_wait_for_its_lock(
    tmp_path: Path, file: str
) -> None:
    """Read, change, write: `meshctl invite` while the node counted a token's use (or
    `token revoke`, or a client's credentials beside an enrollment) undid one of the two."""
    security.init_mesh(tmp_path, mesh=MESH, node_id=NODE, name="auth", now=time.time())
    made = security.issue_token(tmp_path, url="tcp://127.0.0.1:1", ttl=60, uses=1, now=time.time())
    change = {
        "tokens": lambda: security.issue_token(
            tmp_path, url="tcp://127.0.0.1:1", ttl=60, uses=1, now=time.time()
        ),
        "members": lambda: security.remember_member(
            tmp_path, node="cc" * 8, name="c", key="k" * 40, role="client"
        ),
        "token_revoke": lambda: security.revoke_token(tmp_path, made.token_id),
    }[file]
    path = tmp_path / (security.MEMBERS_FILE if file == "members" else security.TOKENS_FILE)
    before = path.read_text() if path.exists() else ""
    with datadir.locked(path):
        worker = threading.Thread(target=change)
        worker.start()
        worker.join(0.3)
        assert worker.is_alive()  # waiting for the node's read-change-write to end
        assert (path.read_text() if path.exists() else "") == before
    worker.join(5)
    assert not worker.is_alive()
    assert path.read_text() != before


def test_the_node_does_not_wait_long_for_a_state_file_locked_by_a_command(
    tmp_path: Path,
) -> None:
    """Review: a `meshctl invite` stopped inside the lock (Ctrl-Z) froze the node's loop.
    It waits LOCK_WAIT, answers "busy" to an enrollment, and saves revocations later."""
    creds = security.init_mesh(tmp_path, mesh=MESH, node_id=NODE, name="auth", now=time.time())
    sec = security.Security(creds, tmp_path, NODE, lambda _m: None)
    token = security.issue_token(tmp_path, url="tcp://127.0.0.1:1", ttl=60, uses=1, now=time.time())
    body = {"token": token.token_id, "secret": token.secret, "node": "cc" * 8, "name": "c"}
    with datadir.locked(tmp_path / security.TOKENS_FILE):
        started = time.monotonic()
        ok, answer = sec.enroll(body, "k" * 40)
        assert time.monotonic() - started < 1
        assert (ok, "busy" in answer["error"]) == (False, True)
    assert sec.enroll(body, "k" * 40)[0]  # the token was not spent by the busy answer
    flooded = revocations(creds, 1)
    with datadir.locked(tmp_path / security.REVOKED_FILE):
        assert sec.accept_revocations(flooded) == flooded
    assert not (tmp_path / security.REVOKED_FILE).exists()
    with datadir.locked(tmp_path / security.REVOKED_FILE):
        started = time.monotonic()
        sec._save_retry_at = 0.0  # due: the retry does not wait for the lock (review: each
        sec.poll_revocations_file()  # tick waited 0.2 s and the loop crawled)
        assert time.monotonic() - started < 0.1
    assert not (tmp_path / security.REVOKED_FILE).exists()
    sec._save_retry_at = 0.0  # SAVE_RETRY has passed
    sec.poll_revocations_file()  # a later tick saves them
    assert json.loads((tmp_path / security.REVOKED_FILE).read_text()) == flooded
