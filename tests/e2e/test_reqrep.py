"""Request/reply through a real node: echo, fixed data, scatter-gather, commands, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import Background, NodeProcess, SubProcess, run_cli, wait_for

from meshctl.cli import _stop_as_interrupted, msg_cmds
from meshctl.client import connect
from meshctl.errors import InputError, Timeout

pytestmark = pytest.mark.e2e


def test_reply_echo(node: NodeProcess, bg: Background) -> None:
    bg.start("reply", "svc/echo", "--echo", server=node.ipc)
    result = run_cli("req", "svc/echo", "hello there", server=node.tcp)
    assert result.returncode == 0, result.describe()
    assert result.out_lines == ["hello there"]


def test_reply_fixed_data_to_wildcard_pattern(node: NodeProcess, bg: Background) -> None:
    bg.start("reply", "svc/time/*", "it is late", server=node.ipc)
    for topic in ("svc/time/utc", "svc/time/local"):
        result = run_cli("req", topic, "what time is it?", server=node.ipc)
        assert result.returncode == 0, result.describe()
        assert result.out_lines == ["it is late"]


def test_req_json_reply(node: NodeProcess, bg: Background) -> None:
    bg.start("reply", "svc/j", "--echo", server=node.ipc)
    result = run_cli("req", "svc/j", "payload", "--json", server=node.ipc)
    assert result.returncode == 0, result.describe()
    (reply,) = result.json_lines()
    assert reply["data"] == "payload"
    assert reply["topic"].startswith("_INBOX/")


def test_req_from_stdin(node: NodeProcess, bg: Background) -> None:
    bg.start("reply", "svc/stdin", "--echo", server=node.ipc)
    result = run_cli("req", "svc/stdin", "-", server=node.ipc, input=b"from stdin")
    assert result.returncode == 0, result.describe()
    assert result.out_lines == ["from stdin"]


def test_scatter_gather_collects_one_reply_per_group(node: NodeProcess, bg: Background) -> None:
    bg.start("reply", "svc/poll", "from-g1", "--group", "g1", server=node.ipc)
    bg.start("reply", "svc/poll", "from-g2", "--group", "g2", server=node.ipc)
    bg.start("reply", "svc/poll", "from-g1", "--group", "g1", server=node.ipc)
    result = run_cli(
        "req", "svc/poll", "who?", "--replies", "0", "--timeout", "1s", server=node.ipc
    )
    assert result.returncode == 0, result.describe()
    assert sorted(result.out_lines) == ["from-g1", "from-g2"], (
        "one reply from each group: two members of g1 must not both answer"
    )


def test_req_replies_n(node: NodeProcess, bg: Background) -> None:
    bg.start("reply", "svc/n", "a", "--group", "ga", server=node.ipc)
    bg.start("reply", "svc/n", "b", "--group", "gb", server=node.ipc)
    result = run_cli("req", "svc/n", "x", "--replies", "2", "--timeout", "5s", server=node.ipc)
    assert result.returncode == 0, result.describe()
    assert sorted(result.out_lines) == ["a", "b"]
    assert result.elapsed < 5, "req --replies 2 must return as soon as both replies arrived"


def test_req_prints_the_first_reply_only(node: NodeProcess, bg: Background) -> None:
    """Found in review: replies that came in the same read were all printed."""
    for answer in ("a", "b", "c"):
        bg.start("reply", "svc/first", answer, "--group", answer, server=node.ipc)
    wait_for(lambda: len(node.status()["subscriptions"]) >= 3, timeout=5, what="3 responders")
    for _ in range(5):
        result = run_cli("req", "svc/first", "x", server=node.ipc)
        assert result.returncode == 0, result.describe()
        assert len(result.out_lines) == 1, result.describe()


def test_no_responders_fails_fast(node: NodeProcess) -> None:
    result = run_cli("req", "nobody/home", "anyone?", "--timeout", "10s", server=node.ipc)
    assert result.returncode == 1, result.describe()
    assert result.err_lines == ["error: no responders for nobody/home"]
    assert result.elapsed < 2, f"no responders must be answered at once, took {result.elapsed}"


def test_request_timeout(node: NodeProcess, bg: Background) -> None:
    silent = bg.start("sub", "svc/slow", server=node.ipc)  # interested, never answers
    result = run_cli("req", "svc/slow", "ping", "--timeout", "500ms", server=node.ipc)
    assert result.returncode == 1, result.describe()
    assert len(result.err_lines) == 1, result.describe()
    assert "timed out" in result.stderr
    assert 0.4 < result.elapsed < 5
    silent.wait_lines(1)  # the request did reach the silent subscriber


def test_reply_count_exits(node: NodeProcess, bg: Background) -> None:
    replier = bg.start("reply", "svc/once", "ok", "--count", "1", server=node.ipc)
    assert run_cli("req", "svc/once", server=node.ipc).out_lines == ["ok"]
    assert replier.wait_exit() == 0, replier.describe()


def test_reply_command_transforms_request(node: NodeProcess, bg: Background) -> None:
    bg.start("reply", "svc/upper", "--command", "tr a-z A-Z", server=node.ipc)
    result = run_cli("req", "svc/upper", "hello, mesh", server=node.ipc)
    assert result.returncode == 0, result.describe()
    assert result.out_lines == ["HELLO, MESH"]
    # A reply that ends its own line (`date`, `echo`) is printed without an empty one.
    ended = run_cli("req", "svc/upper", "line\n", server=node.ipc)
    assert ended.stdout == "LINE\n", ended.describe()


def test_reply_failing_command_fails_request(node: NodeProcess, bg: Background) -> None:
    replier = bg.start("reply", "svc/broken", "--command", "echo oops >&2; exit 3", server=node.ipc)
    result = run_cli("req", "svc/broken", "x", server=node.ipc)
    assert result.returncode == 1, result.describe()
    assert result.err_lines[-1].startswith("error:"), result.describe()
    assert "3" in result.err_lines[-1]
    assert replier.proc.poll() is None, "a failing command must not stop the replier"
    # The replier keeps serving after a failure; --json marks the failed reply as one.
    again = run_cli("req", "svc/broken", "y", "--json", server=node.ipc)
    assert again.returncode == 1, again.describe()
    assert json.loads(again.stdout)["error"] is True


def test_reply_plain_exit_code_command(node: NodeProcess, bg: Background) -> None:
    bg.start("reply", "svc/exit3", "--command", "exit 3", server=node.ipc)
    result = run_cli("req", "svc/exit3", "x", server=node.ipc)
    assert result.returncode == 1, result.describe()
    assert "error:" in result.stderr
    assert "exited with 3" in result.stderr


def test_an_oversized_reply_is_answered_with_the_error_and_the_replier_goes_on(
    node: NodeProcess, bg: Background
) -> None:
    """Found by an exploratory test: a reply over max_payload ended `reply --command`
    with a usage error, and its requester waited out its timeout."""
    cmd = "if grep -q big; then head -c 1100000 /dev/zero; else printf ok; fi"
    replier = bg.start("reply", "svc/huge", "--command", cmd, server=node.ipc)
    big = run_cli("req", "svc/huge", "big", "--timeout", "5s", server=node.ipc)
    assert big.returncode == 1, big.describe()
    assert "reply not sent" in big.stderr
    assert "exceeds the limit" in big.stderr
    assert big.elapsed < 4
    assert replier.proc.poll() is None
    assert run_cli("req", "svc/huge", "small", server=node.ipc).out_lines == ["ok"]


def test_req_prints_the_replies_it_got_when_fewer_came(node: NodeProcess, bg: Background) -> None:
    """Found by an exploratory test: `--replies 2` with one replier printed nothing;
    `nats req --replies` prints what arrived. It still exits 1."""
    bg.start("reply", "svc/one", "--echo", server=node.ipc)
    result = run_cli("req", "svc/one", "hello", "--replies", "2", "-t", "1s", server=node.ipc)
    assert result.returncode == 1, result.describe()
    assert result.out_lines == ["hello"]
    assert "1 of 2 replies" in result.stderr


def test_a_zero_timeout_is_a_usage_error(node: NodeProcess) -> None:
    """`-t 0` said the node was unreachable (exploratory test)."""
    result = run_cli("status", "-t", "0", server=node.ipc)
    assert result.returncode == 2, result.describe()
    assert "must be above zero" in result.stderr
    # and one past libzmq's int milliseconds ended in "internal error: OverflowError"
    long = run_cli("status", "-t", "1000h", server=node.ipc)
    assert long.returncode == 0, long.describe()
    # sub and reply took 0 too (exploratory test); and sub's wait for events was its wait
    # for the node: -t 0.0001 said "cannot reach a node".
    for args in (
        ("sub", "x", "-t", "0"),
        ("reply", "x", "--command", "true", "--command-timeout", "0"),
    ):
        zero = run_cli(*args, server=node.ipc)
        assert zero.returncode == 2, zero.describe()
        assert "must be above zero" in zero.stderr
    short = run_cli("sub", "x", "-t", "0.0001", server=node.ipc)
    assert short.returncode == 1, short.describe()
    assert "no event within" in short.stderr, short.describe()


def test_a_late_reply_to_an_inbox_from_before_is_not_taken_for_ours(node: NodeProcess) -> None:
    """Found in an exploratory test: after a node restarts, a new client may get the id,
    and so the inbox, of a client from before (libzmq numbers connections the same way
    each run). A late reply meant for the old one (its request number 1) was returned by
    the new one's `request` as its own answer: another program's payload."""

    def late_reply(inbox: str) -> None:
        time.sleep(0.3)
        with connect(node.ipc) as other:
            other.publish(f"{inbox}/1", b"not yours")
            other.flush()

    with connect(node.ipc) as silent, connect(node.ipc) as me:
        silent.subscribe("svc/slow")  # a responder that never answers: no "no responders"
        silent.flush()
        inbox = f"_INBOX/{me.node['node_id']}/{me.node['client_id']}"
        sender = threading.Thread(target=late_reply, args=(inbox,))
        sender.start()
        try:
            with pytest.raises(Timeout):
                me.request("svc/slow", b"mine", timeout=1.5)
        finally:
            sender.join()


def test_a_replier_stopped_with_sigterm_leaves_its_group_at_once(
    node: NodeProcess, bg: Background
) -> None:
    """Found in an exploratory test: SIGTERM (systemd, docker stop, kill) killed `meshctl
    reply` outright, its queue-group place stayed until the node noticed it gone, and a
    request sent there meanwhile was lost. It stops as on Ctrl-C now: goodbye, exit 0."""
    replier = bg.start("reply", "svc/term", "--echo", server=node.ipc)
    os.kill(replier.pid, signal.SIGTERM)
    assert replier.proc.wait(5) == 0, replier.describe()
    asked = run_cli("req", "svc/term", "x", "--timeout", "5s", server=node.ipc)
    assert asked.returncode == 1, asked.describe()
    assert "no responders" in asked.stderr, asked.describe()
    assert asked.elapsed < 2, asked.describe()


def test_a_command_that_outlasts_its_timeout_is_ended_whole(
    node: NodeProcess, bg: Background, tmp_path: Path
) -> None:
    """Review: at the timeout only the shell was killed, and what it had started went on
    running (as when the replier was stopped meanwhile)."""
    pidfile = tmp_path / "sleep.pid"
    command = f"sleep 30 & echo $! > {pidfile}; wait; cat"
    bg.start("reply", "svc/slow", "--command", command, "--command-timeout", "1s", server=node.ipc)
    asked = run_cli("req", "svc/slow", "x", "--timeout", "10s", server=node.ipc)
    assert asked.returncode == 1, asked.describe()
    assert "command timed out after 1s" in asked.stderr, asked.describe()
    pid = int(pidfile.read_text())
    wait_for(lambda: not _running(pid), timeout=5, what="the command's sleep to end")


def test_a_replier_whose_terminal_closes_ends_its_command_too(
    node: NodeProcess, bg: Background, tmp_path: Path
) -> None:
    """Review: in a session of its own, the command outlived a replier ended by SIGHUP
    (its terminal closed, an ssh session dropped). SIGHUP stops the replier as Ctrl-C
    does, which ends its command."""
    pidfile = tmp_path / "sleep.pid"
    command = f"sleep 30 & echo $! > {pidfile}; wait; cat"
    replier = bg.start("reply", "svc/hup", "--command", command, server=node.ipc)
    asker = SubProcess.start("req", "svc/hup", "x", "--timeout", "10s", server=node.ipc, ready=None)
    wait_for(pidfile.exists, timeout=5, what="the command to start")
    wait_for(lambda: pidfile.read_text().strip(), timeout=5, what="its pid")
    os.kill(replier.pid, signal.SIGHUP)
    assert replier.proc.wait(5) == 0, replier.describe()
    wait_for(lambda: not _running(int(pidfile.read_text())), timeout=5, what="the sleep to end")
    # Its requester hears at once that no answer is coming (it waited out its timeout).
    assert asker.wait_exit(timeout=3) == 1, asker.describe()
    assert "responder stopped before answering" in asker.stderr, asker.describe()


def test_a_stop_while_the_command_starts_ends_the_command_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CI run: a SIGHUP that came while Popen had started the command but not returned
    it yet left the command running (the test above, once in many runs). Here the signal
    comes at that moment every time."""
    start = subprocess.Popen
    started: list[int] = []

    def signalled_while_starting(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = start(*args, **kwargs)
        started.append(proc.pid)
        signal.raise_signal(signal.SIGHUP)
        return proc

    before = signal.signal(signal.SIGHUP, _stop_as_interrupted)  # as `main` sets it
    monkeypatch.setattr(subprocess, "Popen", signalled_while_starting)
    try:
        with pytest.raises(KeyboardInterrupt):
            msg_cmds._run("exec sleep 30", b"", 10)
    finally:
        signal.signal(signal.SIGHUP, before)
    try:
        wait_for(lambda: not _running(started[0]), timeout=5, what="the command to end")
    finally:
        if _running(started[0]):
            os.kill(started[0], signal.SIGKILL)  # ours: left by the code before the fix


def _running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _ask_all(node: NodeProcess, topic: str, n: int) -> list[str]:
    """``n`` requests at once, each from a client of its own; what each came to."""
    outcome = [""] * n

    def ask(i: int) -> None:
        with connect(node.ipc, name=f"asker {i}") as c:
            try:
                reply = c.request(topic, str(i), timeout=6)
                outcome[i] = "error" if reply.is_error else reply.text()
            except Timeout:
                outcome[i] = "timeout"

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return outcome


@pytest.mark.parametrize("how", ["--echo", "--command"])
def test_a_replier_that_stops_answers_what_it_was_handed(
    node: NodeProcess, bg: Background, how: str
) -> None:
    """Exploratory test: of 20 requests to a group of two `reply --command`, 8 waited out
    their timeout when one member was stopped (SIGTERM), the other alive: those the node
    had already handed the stopped one. It answers them at once now (an error for a
    command), as a NATS drain."""
    args = ["--command", "sleep 0.2; cat"] if how == "--command" else ["--echo"]
    slow = ["--command", "sleep 0.2; cat"]
    stopping = bg.start("reply", "svc/drain", *args, "--group", "g", server=node.ipc)
    bg.start("reply", "svc/drain", *slow, "--group", "g", server=node.ipc)
    if how == "--echo":  # an echo answers at once: make it fall behind to have a queue
        os.kill(stopping.pid, signal.SIGSTOP)
    results: list[str] = []
    asking = threading.Thread(target=lambda: results.extend(_ask_all(node, "svc/drain", 20)))
    asking.start()
    time.sleep(1.0)
    if how == "--echo":
        os.kill(stopping.pid, signal.SIGCONT)
    os.kill(stopping.pid, signal.SIGTERM)
    assert stopping.proc.wait(5) == 0, stopping.describe()
    asking.join(15)
    assert "timeout" not in results, results
    if how == "--echo":
        assert results == [str(i) for i in range(20)]


def test_only_requests_are_answered_at_their_inbox(node: NodeProcess, bg: Background) -> None:
    """Exploratory test: a plain publish with a reply-to header made `reply --echo`
    publish wherever it said, with the responder's permissions (around the publisher's
    pub_allow); and a real reply with a `status: no-responders` header of its own was
    taken for a bridge's "no responders"."""
    bg.start("reply", "svc/echo", "--echo", server=node.ipc)
    watcher = bg.start("sub", "app/admin/>", server=node.ipc)
    plain = run_cli("pub", "svc/echo", "x", "-H", "reply-to=app/admin/reset", server=node.ipc)
    assert plain.returncode == 0, plain.describe()
    asked = run_cli("req", "svc/echo", "y", server=node.ipc)
    assert asked.returncode == 0, asked.describe()
    time.sleep(0.3)
    assert watcher.lines == []
    with connect(node.ipc) as c:
        sub = c.subscribe("svc/status")
        c.flush()
        with connect(node.ipc) as asker:
            got: list[str] = []

            def ask() -> None:
                got.append(asker.request("svc/status", "?", timeout=5).text())

            t = threading.Thread(target=ask)
            t.start()
            c.reply(sub.next(5), "a real answer", headers={"status": "no-responders"})
            c.flush()
            t.join(5)
        assert got == ["a real answer"]
        c.publish("svc/status", "plain", headers={"reply-to": "app/admin/reset"})
        c.flush()
        with pytest.raises(InputError, match="not a request"):
            c.reply(sub.next(5), "no")


def test_a_replier_done_with_its_count_answers_what_it_was_handed(
    node: NodeProcess, bg: Background
) -> None:
    """Review: `reply --count 1` handed 4 requests at once answered one and left the
    other 3 to their timeout. They hear at once that no answer comes from it."""
    replier = bg.start(
        "reply", "svc/once", "--command", "sleep 0.5; cat", "--count", "1", server=node.ipc
    )
    started = time.monotonic()
    results = _ask_all(node, "svc/once", 4)
    assert replier.proc.wait(5) == 0, replier.describe()
    assert "timeout" not in results, results
    assert time.monotonic() - started < 5
    assert results.count("error") == 3, results  # and one answered
