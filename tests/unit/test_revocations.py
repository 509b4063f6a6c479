"""Revocations at the size a long-lived mesh reaches: all kept, all passed on."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

from node import membership as ms
from node import security
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
