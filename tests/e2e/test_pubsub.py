"""Publish and subscribe through a real node with the real CLI: matching, groups, formats."""

from __future__ import annotations

import base64
import json
import os
import re
from datetime import datetime, timedelta, timezone

import pytest
from helpers import Background, NodeProcess, publish, run_cli, wait_for

from meshctl import connect

pytestmark = pytest.mark.e2e

JSON_FIELDS = {"topic", "data", "headers", "id", "time", "size"}


def _topics(proc_lines: list[dict[str, object]]) -> list[object]:
    return [e["topic"] for e in proc_lines]


def test_wildcards_match_whole_levels(node: NodeProcess, bg: Background) -> None:
    star = bg.start("sub", "--json", "a/*/c", server=node.ipc)
    tail = bg.start("sub", "--json", "a/>", server=node.ipc)
    every = bg.start("sub", "--json", ">", server=node.ipc)
    exact = bg.start("sub", "--json", "a", server=node.ipc)
    published = ["a", "a/b", "a/b/c", "a/x/c", "a/b/c/d", "b/b/c", "a/b/x"]
    # The last event matches every wildcard subscriber: once it is there, all earlier ones are.
    publish(node.tcp, [(t, t) for t in [*published, "a/end/c"]])

    for proc in (star, tail, every):
        proc.wait_line(lambda line: '"a/end/c"' in line, what="the end marker")
    exact.wait_lines(1)

    assert _topics(star.json_lines()) == ["a/b/c", "a/x/c", "a/end/c"]
    assert _topics(tail.json_lines()) == ["a/b", "a/b/c", "a/x/c", "a/b/c/d", "a/b/x", "a/end/c"], (
        "a/> must match a/b... but never a"
    )
    assert _topics(every.json_lines()) == [*published, "a/end/c"]
    assert _topics(exact.json_lines()) == ["a"]


def test_catch_all_never_sees_reserved_topics(node: NodeProcess, bg: Background) -> None:
    every = bg.start("sub", "--json", ">", server=node.ipc)
    bg.start("reply", "svc/ping", "pong", server=node.ipc)  # its connect emits $mesh/client/...
    result = run_cli("req", "svc/ping", "hi", server=node.ipc)
    assert result.returncode == 0, result.describe()
    publish(node.ipc, [("done", "")])

    every.wait_line(lambda line: '"topic":"done"' in line, what="the end marker")
    assert _topics(every.json_lines()) == ["svc/ping", "done"], (
        "'>' must not match $mesh/... system events or _INBOX/... replies"
    )


def test_one_sub_with_several_patterns(node: NodeProcess, bg: Background) -> None:
    proc = bg.start("sub", "--raw", "x/1", "y/>", "y/2", server=node.ipc)
    publish(
        node.tcp,
        [("x/1", "one"), ("x/2", "not me"), ("y/2", "two"), ("z", "nor me"), ("y/3/4", "three")],
    )
    lines = proc.wait_lines(3)
    assert lines == ["one", "two", "three"], "overlapping patterns must deliver once"
    assert len(node.status()["subscriptions"]) == 3


def test_queue_group_shares_events_fairly(node: NodeProcess, bg: Background) -> None:
    members = [
        bg.start("sub", "--raw", "--group", "g", "jobs/>", server=node.ipc) for _ in range(2)
    ]
    plain = bg.start("sub", "--raw", "--count", "100", "jobs/>", server=node.ipc)

    result = run_cli("pub", "jobs/work", "job-{{n}}", "--count", "100", server=node.ipc)
    assert result.returncode == 0, result.describe()

    assert plain.wait_exit(timeout=10) == 0, plain.describe()
    assert sorted(plain.lines) == sorted(f"job-{n}" for n in range(1, 101))

    def total() -> int:
        return sum(len(m.raw_lines) for m in members)

    wait_for(lambda: total() >= 100, timeout=10, what="100 events across the group")
    shares = [m.lines for m in members]
    together = shares[0] + shares[1]
    assert len(together) == 100, f"each event goes to exactly one member: got {len(together)}"
    assert sorted(together) == sorted(plain.lines)
    for share in shares:
        assert 30 <= len(share) <= 70, f"unfair split {[len(s) for s in shares]}"


def test_queue_group_stays_fair_while_interest_changes(node: NodeProcess, bg: Background) -> None:
    """Regression: the round-robin position used to reset whenever anyone (un)subscribed."""
    from meshctl import connect

    members = [bg.start("sub", "--raw", "--group", "g", "work", server=node.ipc) for _ in range(2)]
    with connect(node.ipc, name="e2e pub") as pub, connect(node.ipc, name="e2e churn") as other:
        for i in range(20):
            pub.publish("work", f"w{i}")
            pub.flush(5)
            other.unsubscribe(other.subscribe("unrelated/topic"))  # someone else comes and goes
    wait_for(
        lambda: sum(len(m.raw_lines) for m in members) >= 20,
        timeout=10,
        what="20 events across the group",
    )
    shares = [len(m.raw_lines) for m in members]
    assert sum(shares) == 20
    assert min(shares) >= 5, f"unfair split {shares}"


def test_json_fields_are_a_contract(node: NodeProcess, bg: Background) -> None:
    proc = bg.start("sub", "--json", "sensors/>", server=node.ipc)
    before = datetime.now(timezone.utc)
    result = run_cli(
        "pub", "sensors/t1", "21.5 °C", "-H", "unit=celsius", "-H", "src=e2e", server=node.ipc
    )
    assert result.returncode == 0, result.describe()

    (event,) = [json.loads(line) for line in proc.wait_lines(1)]
    assert set(event) >= JSON_FIELDS, f"missing fields: {JSON_FIELDS - set(event)}"
    assert "encoding" not in event
    assert event["topic"] == "sensors/t1"
    assert event["data"] == "21.5 °C"
    assert event["size"] == len("21.5 °C".encode())
    assert event["headers"] == {"unit": "celsius", "src": "e2e"}
    assert re.fullmatch(r"[0-9a-f]{32}", event["id"]), event["id"]
    assert event["time"].endswith("Z")
    stamp = datetime.fromisoformat(event["time"])
    assert (
        before - timedelta(seconds=5) <= stamp <= datetime.now(timezone.utc) + timedelta(seconds=5)
    )


def test_json_base64_for_binary_payload(node: NodeProcess, bg: Background) -> None:
    proc = bg.start("sub", "--json", "bin", server=node.ipc)
    result = run_cli("pub", "bin", "-", server=node.ipc, input=b"\xff\xfe\n")
    assert result.returncode == 0, result.describe()

    proc.wait_lines(1)
    (event,) = proc.json_lines()
    assert event["encoding"] == "base64"
    assert base64.b64decode(event["data"]) == b"\xff\xfe"
    assert event["size"] == 2


def test_distinct_event_ids(node: NodeProcess, bg: Background) -> None:
    proc = bg.start("sub", "--json", "--count", "5", "ids", server=node.ipc)
    assert run_cli("pub", "ids", "x", "--count", "5", server=node.ipc).returncode == 0
    assert proc.wait_exit() == 0, proc.describe()
    ids = [e["id"] for e in proc.json_lines()]
    assert len(set(ids)) == 5


def test_count_templating(node: NodeProcess, bg: Background) -> None:
    proc = bg.start("sub", "--raw", "--count", "3", "tpl", server=node.ipc)
    result = run_cli("pub", "tpl", "n={{n}};again={{n}}", "--count", "3", server=node.ipc)
    assert result.returncode == 0, result.describe()
    assert proc.wait_exit() == 0, proc.describe()
    assert proc.lines == ["n=1;again=1", "n=2;again=2", "n=3;again=3"]


def test_publish_stdin_one_event_per_line(node: NodeProcess, bg: Background) -> None:
    proc = bg.start("sub", "--json", "--count", "3", "lines", server=node.ipc)
    result = run_cli(
        "pub", "lines", "-", "-H", "k=v", server=node.ipc, input=b"first\nsecond line\r\nthird"
    )
    assert result.returncode == 0, result.describe()
    assert proc.wait_exit() == 0, proc.describe()
    events = proc.json_lines()
    assert [e["data"] for e in events] == ["first", "second line", "third"]
    assert all(e["headers"] == {"k": "v"} for e in events)


def test_a_stdin_stream_stopped_by_a_line_too_large_says_what_was_stored(
    node: NodeProcess, bg: Background
) -> None:
    """Found by an exploratory test: the error named the limit but not which lines
    before it had been stored."""
    proc = bg.start("sub", "--json", "--count", "2", "lines", server=node.ipc)
    big = b"x" * (2 << 20)
    result = run_cli("pub", "-p", "lines", "-", server=node.ipc, input=b"a\nb\n" + big + b"\nc\n")
    assert result.returncode == 2, result.describe()
    assert result.err_lines[-1].startswith("error: line 3: payload of"), result.describe()
    assert result.err_lines[-1].endswith("stopped there, 2 lines before it stored")
    assert proc.wait_exit() == 0, proc.describe()
    assert [e["data"] for e in proc.json_lines()] == ["a", "b"]


def test_pub_json_receipt(node: NodeProcess) -> None:
    result = run_cli("pub", "receipt", "x", "--count", "4", "--json", server=node.ipc)
    assert result.returncode == 0, result.describe()
    (receipt,) = result.json_lines()
    assert receipt["topic"] == "receipt"
    assert receipt["published"] == 4


def test_sub_count_exits_zero(node: NodeProcess, bg: Background) -> None:
    proc = bg.start("sub", "--count", "2", "--raw", "two", server=node.ipc)
    result = run_cli("pub", "two", "e{{n}}", "--count", "3", server=node.ipc)
    assert result.returncode == 0, result.describe()
    assert proc.wait_exit() == 0, proc.describe()
    assert proc.lines == ["e1", "e2"]


def test_sub_timeout_with_nothing_published_exits_one(node: NodeProcess) -> None:
    result = run_cli("sub", "quiet/>", "--timeout", "300ms", server=node.ipc)
    assert result.returncode == 1, result.describe()
    assert "subscribed: quiet/>" in result.stderr
    assert result.err_lines[-1].startswith("error:"), result.describe()
    assert result.stdout == ""
    assert result.elapsed < 5


def test_sub_timeout_after_some_events(node: NodeProcess, bg: Background) -> None:
    proc = bg.start("sub", "--raw", "--timeout", "1s", "some", server=node.ipc)
    assert run_cli("pub", "some", "x", "--count", "2", server=node.ipc).returncode == 0
    assert proc.wait_exit() == 1, proc.describe()
    assert proc.lines == ["x", "x"]
    assert "error:" in proc.stderr


def test_env_server_is_used(node: NodeProcess, bg: Background) -> None:
    proc = bg.start(
        "sub", "--raw", "--count", "1", "viaenv", server=None, env={"MESHCTL_SERVER": node.tcp}
    )
    result = run_cli("pub", "viaenv", "hello", env={"MESHCTL_SERVER": node.ipc})
    assert result.returncode == 0, result.describe()
    assert proc.wait_exit() == 0, proc.describe()
    assert proc.lines == ["hello"]


def test_tail_shows_events(node: NodeProcess, bg: Background) -> None:
    # As an operator's shell pipes it: no COLUMNS (the tests' environment sets one).
    env = {"COLUMNS": ""}
    proc = bg.start("tail", "watch/>", "-n", "3", server=node.ipc, ready="tailing", env=env)
    long = "watch/" + "level/" * 12 + "end"  # piped, a line of ~150 columns
    publish(node.ipc, [("watch/a", "alpha"), ("other", "no"), ("watch/b", "beta")])
    publish(node.ipc, [(long, "x" * 50)])
    assert proc.wait_exit() == 0, proc.describe()
    text = "\n".join(proc.lines)
    for expected in ("watch/a", "alpha", "watch/b", "beta"):
        assert expected in text, proc.describe()
    assert "other" not in text
    # One line per event when piped: rich wrapped them at 80 columns (exploratory test).
    assert len(proc.lines) == 3, proc.describe()
    assert long in proc.lines[2]


def test_tail_marks_retained_values_and_leaves_them_out_of_the_rate(
    node: NodeProcess, bg: Background
) -> None:
    """Found by an exploratory test: tail showed old retained values as live traffic."""
    assert run_cli("pub", "--retain", "kept/x", "old", server=node.ipc).returncode == 0
    proc = bg.start("tail", "kept/>", "-n", "2", server=node.ipc, ready="tailing")
    publish(node.ipc, [("kept/y", "new")])
    assert proc.wait_exit() == 0, proc.describe()
    first, second = proc.lines
    assert "kept/x (retained)" in first
    assert first.endswith("0/s")
    assert "(retained)" not in second
    assert second.endswith("1/s")


def test_tail_system_shows_mesh_events(node: NodeProcess, bg: Background) -> None:
    proc = bg.start("tail", "--system", "--count", "1", server=node.ipc, ready="tailing")
    assert run_cli("status", server=node.ipc).returncode == 0  # a client connects
    assert proc.wait_exit() == 0, proc.describe()
    assert "$mesh/client/" in proc.lines[0]


def test_a_payload_argument_that_is_not_utf8_goes_as_its_bytes(node: NodeProcess) -> None:
    """Found in review: `pub t/x $'caf\\xe9'` ended in 'internal error: UnicodeEncodeError';
    the shell hands over bytes, and the payload is opaque bytes."""
    with connect(node.ipc) as client:
        sub = client.subscribe("t/x")
        done = run_cli("pub", "t/x", os.fsdecode(b"caf\xe9"), server=node.ipc)
        assert done.returncode == 0, done.describe()
        assert sub.next(timeout=5).data == b"caf\xe9"
