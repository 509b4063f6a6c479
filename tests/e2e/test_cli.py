"""The CLI contract without traffic: exit codes 0/1/2, one-line errors, config files."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import tomllib
from helpers import (
    CLI,
    NodeProcess,
    assert_one_line_error,
    cli_env,
    free_tcp_port,
    run_cli,
)

pytestmark = pytest.mark.e2e


# ---- bad input is exit 2 ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        pytest.param(("pub", "a//b", "x"), "a//b", id="pub-empty-level"),
        pytest.param(("pub", "/a", "x"), "/a", id="pub-leading-slash"),
        pytest.param(("pub", "a/*", "x"), "wildcard", id="pub-wildcard-topic"),
        pytest.param(("pub", "a/>", "x"), "wildcard", id="pub-tail-wildcard-topic"),
        pytest.param(("pub", "$mesh/x", "x"), "reserved", id="pub-reserved-topic"),
        pytest.param(("sub", "a/>/b"), "'>' must be the last level", id="sub-gt-not-last"),
        pytest.param(("sub", "a*"), "a*", id="sub-wildcard-inside-level"),
        pytest.param(("sub", "ok", "a//b"), "a//b", id="sub-second-pattern-bad"),
        pytest.param(("req", "a//b", "x"), "a//b", id="req-bad-topic"),
        pytest.param(("reply", "a/>/c", "x"), "a/>/c", id="reply-bad-pattern"),
        pytest.param(("tail", "x*"), "x*", id="tail-bad-pattern"),
    ],
)
def test_invalid_topic_or_pattern_exits_2(
    shared_node: NodeProcess, args: tuple[str, ...], needle: str
) -> None:
    result = run_cli(*args, server=shared_node.ipc)
    assert_one_line_error(result, 2)
    assert needle in result.stderr


def test_bad_server_address_exits_2() -> None:
    result = run_cli("status", server="bogus://x")
    assert_one_line_error(result, 2)
    assert "bogus://x" in result.stderr


@pytest.mark.parametrize("address", ["nothost", "::1"])
def test_a_listen_address_that_is_not_one_exits_2(tmp_path: Path, address: str) -> None:
    """Found in review: 'cannot listen on tcp://nothost:0: No such device', exit 1."""
    result = run_cli(
        "up", "--data-dir", str(tmp_path / "n"), "--no-discovery", "--insecure",
        "--listen", address, "--port", "0",
    )  # fmt: skip
    assert result.returncode == 2, result.describe()
    assert result.err_lines[-1] == (
        f"error: cannot listen on tcp://{address}:0: {address!r} is not an IPv4 address or a "
        "network interface of this host (listen.address, --listen)"
    ), result.describe()


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("sub", "x", "--timeout", "5x"), id="bad-duration"),
        pytest.param(("req", "x", "y", "--timeout", "soon"), id="bad-req-duration"),
        pytest.param(("pub", "x", "y", "-H", "novalue"), id="bad-header"),
        pytest.param(("pub", "x", "y", "-H", "=v"), id="bad-header-empty-key"),
        pytest.param(("pub", "x", "y", "--bogus"), id="unknown-option"),
        pytest.param(("pub",), id="missing-topic"),
        pytest.param(("pub", "x", "y", "--count", "0"), id="count-out-of-range"),
        pytest.param(("reply", "svc", "data", "--echo"), id="reply-data-and-echo"),
        pytest.param(("pub", "x", "-", "--count", "3"), id="count-with-stdin"),
        pytest.param(("frobnicate",), id="unknown-command"),
    ],
)
def test_usage_error_exits_2(shared_node: NodeProcess, args: tuple[str, ...]) -> None:
    result = run_cli(*args, server=shared_node.ipc)
    assert_one_line_error(result, 2)


def test_no_arguments_shows_help_and_exits_2() -> None:
    result = run_cli()
    assert result.returncode == 2, result.describe()
    assert "Usage" in result.stdout
    assert "error" not in result.stderr, result.describe()


def test_version_and_help() -> None:
    version = run_cli("--version")
    assert version.returncode == 0, version.describe()
    assert version.stdout.startswith("meshctl ")
    helptext = run_cli("--help")
    assert helptext.returncode == 0, helptext.describe()
    for command in ("up", "down", "status", "pub", "sub", "req", "reply", "tail", "config"):
        assert command in helptext.stdout


# ---- an unreachable node is exit 1, quickly ---------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("status",), id="status"),
        pytest.param(("pub", "x", "y"), id="pub"),
        pytest.param(("sub", "x"), id="sub"),
        pytest.param(("req", "x", "y"), id="req"),
    ],
)
def test_unreachable_node_exits_1_fast(args: tuple[str, ...]) -> None:
    port = free_tcp_port()
    result = run_cli(*args, "--timeout", "500ms", server=f"tcp://127.0.0.1:{port}")
    assert_one_line_error(result, 1)
    assert str(port) in result.stderr
    # It gives up after its 2 s connect wait (sub's --timeout is for events); the rest is
    # the interpreter's start, slower while other tests run beside it.
    assert result.elapsed < 4, f"took {result.elapsed:.2f}s to give up"


def test_missing_ipc_socket_exits_1(tmp_path: Path) -> None:
    result = run_cli("status", "--timeout", "500ms", server=f"ipc://{tmp_path}/none.sock")
    assert_one_line_error(result, 1)
    assert result.elapsed < 2.5
    assert f"no socket {tmp_path}/none.sock: is `meshctl up` running" in result.stderr


# ---- config files ------------------------------------------------------------------------


def test_config_init_writes_every_key(tmp_path: Path) -> None:
    path = tmp_path / "meshctl.toml"
    result = run_cli("config", "init", str(path))
    assert result.returncode == 0, result.describe()
    doc = tomllib.loads(path.read_text())
    assert doc["limits"]["max_payload"] == 1024 * 1024
    assert doc["limits"]["client_queue"] > 0
    assert doc["listen"]["port"] == 4850
    assert {"node", "listen", "limits", "log"} <= set(doc)

    stdout = run_cli("config", "init", "-")
    assert stdout.returncode == 0, stdout.describe()
    assert tomllib.loads(stdout.stdout) == doc

    again = run_cli("config", "init", str(path))
    assert_one_line_error(again, 2)
    assert "--force" in again.stderr
    forced = run_cli("config", "init", str(path), "--force")
    assert forced.returncode == 0, forced.describe()
    for where in ("", str(tmp_path)):  # '' is '.' to the CLI: "exists; use --force" it said
        wrong = run_cli("config", "init", where)
        assert_one_line_error(wrong, 2)
        assert "is a directory: give the config file's path" in wrong.stderr


def test_config_show_reflects_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[node]\nmesh = "m1"\n[limits]\nclient_queue = 10\nmax_payload = "1KiB"\n')
    result = run_cli("config", "show", "--config", str(path), "--json")
    assert result.returncode == 0, result.describe()
    (shown,) = result.json_lines()
    assert shown["node"]["mesh"] == "m1"
    assert shown["limits"]["client_queue"] == 10
    assert shown["limits"]["max_payload"] == 1024
    assert shown["listen"]["port"] == 4850  # untouched keys keep their defaults

    via_env = run_cli("config", "show", "--json", env={"MESHCTL_CONFIG": str(path)})
    assert via_env.json_lines() == [shown]

    text = run_cli("config", "show", "--config", str(path))
    assert text.returncode == 0, text.describe()
    assert tomllib.loads(text.stdout)["limits"]["client_queue"] == 10


def test_config_default_path_is_used(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    result = run_cli("config", "init", env=env)
    assert result.returncode == 0, result.describe()
    written = tmp_path / "meshctl" / "meshctl.toml"
    assert written.exists()
    written.write_text(written.read_text().replace('mesh = "default"', 'mesh = "fromfile"'))
    shown = run_cli("config", "show", "--json", env=env)
    assert shown.json_lines()[0]["node"]["mesh"] == "fromfile"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("[limits]\nbogus = 1\n", "limits.bogus", id="unknown-key"),
        pytest.param('[limits]\nclient_queue = "x"\n', "limits.client_queue", id="bad-value"),
        pytest.param("[limits]\nclient_queue = 0\n", "limits.client_queue", id="zero-queue"),
        pytest.param('[limits]\nmax_payload = "lots"\n', "limits.max_payload", id="bad-size"),
        pytest.param("[listen]\nport = 70000\n", "listen.port", id="port-range"),
        pytest.param('[log]\nlevel = "loud"\n', "log.level", id="bad-level"),
        pytest.param("[nope]\nx = 1\n", "nope", id="unknown-section"),
        pytest.param("[limits\n", "TOML", id="not-toml"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for args in (
        ("config", "show", "--config", str(path)),
        ("up", "--config", str(path), "--data-dir", str(tmp_path / "d")),
    ):
        result = run_cli(*args, timeout=10)
        assert_one_line_error(result, 2)
        assert str(path) in result.stderr
        assert key in result.stderr
    assert not (tmp_path / "d" / "node.pid").exists()


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    result = run_cli("config", "show", "--config", str(path))
    assert_one_line_error(result, 2)
    assert str(path) in result.stderr


def test_a_subscription_too_large_for_one_frame_says_so(node: NodeProcess) -> None:
    """Found in review: 10,000 patterns in one `sub` waited out the timeout ('did not
    answer SUB within 1s'): the node drops a control frame over 64 KiB as malformed."""
    patterns = [f"p/{i}" for i in range(10_000)]
    result = run_cli("sub", *patterns, "--count", "1", server=node.ipc)
    assert result.returncode == 2, result.stderr
    assert len(result.err_lines) == 1, result.stderr
    assert "is over the 65536 a node takes (too many patterns" in result.stderr
    assert result.elapsed < 5


def test_status_of_a_node_with_thousands_of_patterns(node: NodeProcess) -> None:
    """Its answer outgrew the 64 KiB a client read from its node, and was dropped unread:
    above ~700 patterns `meshctl status` only said the node did not answer."""
    from meshctl import connect

    with connect(node.ipc, timeout=5) as c:
        for i in range(0, 3000, 500):
            c.subscribe(*(f"dev/{j}/cmd" for j in range(i, i + 500)), retained=False)
        result = run_cli("status", "--json", server=node.tcp)
        assert result.returncode == 0, result.describe()
        (status,) = result.json_lines()
        assert status["subscriptions_total"] == 3000
        assert len(status["subscriptions"]) == 1000  # listed; the rest counted
        (mine,) = (cl for cl in status["clients"] if cl["subscriptions"] == 3000)
        assert mine["id"] == c.node["client_id"]
        text = run_cli("status", server=node.tcp)
        assert text.returncode == 0, text.describe()
        assert "subscriptions 3000" in text.stdout
        assert "... and 2000 more patterns" in text.stdout


def test_names_and_topics_that_look_like_markup_are_shown_as_they_are(
    node: NodeProcess,
) -> None:
    """Found in an exploratory test: one client subscribed to "x/[/]" (a valid topic)
    ended `meshctl status` with a MarkupError for every operator; `routes` ate
    "[bold]" out of a topic, and `queue ls` did the same with a queue's patterns."""
    from meshctl import connect

    with connect(node.ipc, name="[red]app", timeout=5) as c:
        c.subscribe("x/[/]", retained=False)
        c.queue("add", "q", patterns=["y/[bold]z"])
        status = run_cli("status", server=node.ipc)
        assert status.returncode == 0, status.describe()
        assert "x/[/]" in status.stdout
        assert "[red]app" in status.stdout
        routes = run_cli("routes", "y/[bold]z", server=node.ipc)
        assert routes.returncode == 0, routes.describe()
        assert "y/[bold]z" in routes.stdout
        queues = run_cli("queue", "ls", server=node.ipc)
        assert "y/[bold]z" in queues.stdout, queues.describe()


def test_status_json_fields(node: NodeProcess) -> None:
    result = run_cli("status", "--json", server=node.tcp)
    assert result.returncode == 0, result.describe()
    (status,) = result.json_lines()
    assert {
        "id",
        "name",
        "mesh",
        "endpoints",
        "uptime_s",
        "clients",
        "subscriptions",
        "counters",
    } <= set(status)
    assert status["id"] == node.node_id
    assert status["name"] == "e2e"
    assert status["mesh"] == "default"
    assert any(e.startswith("tcp://127.0.0.1:") for e in status["endpoints"])
    assert any(e.startswith("ipc://") for e in status["endpoints"])
    assert status["uptime_s"] >= 0
    (me,) = status["clients"]  # the status command itself
    assert {"id", "name", "subscriptions", "events_in", "events_out", "dropped"} <= set(me)
    counters = status["counters"]
    assert {
        "events_in",
        "events_out",
        "no_interest",
        "bad_frames",
        "bad_handshakes",
        "dropped",
    } <= set(counters)
    assert set(counters["dropped"]) >= {
        "slow_consumer",
        "payload_too_large",
        "bad_topic",
        "no_session",
    }
    human = run_cli("status", server=node.ipc)
    assert human.returncode == 0, human.describe()
    assert node.node_id in human.stdout


def test_a_reader_that_goes_away_is_not_an_error(node: NodeProcess) -> None:
    """Found by an exploratory test: `meshctl sub ... | head -1` exited 1 (Typer caught
    the broken pipe first), so scripts with pipefail failed."""
    from meshctl import connect

    with connect(node.ipc) as client:
        for i in range(200):
            client.publish(f"pipe/{i}", "x" * 2000, persistent=True)
        client.confirm(10)
    cli = " ".join(shlex.quote(a) for a in CLI)
    script = (
        f"set -o pipefail; {cli} sub --from-seq 1 'pipe/>' -n 200 --raw "
        f"--server {shlex.quote(node.ipc)} | head -1"
    )
    done = subprocess.run(
        ["bash", "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=cli_env(),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "x" * 2000 + "\n"


def test_a_table_cut_short_by_head_is_not_an_error() -> None:
    """Found in review: what rich prints (status, peers, routes, tail) exited 1 when
    the reader went away; rich's own broken-pipe handling did that."""
    code = (
        "from meshctl.cli.output import out_console\n"
        "out = out_console()\n"
        "for i in range(20000):\n"
        "    out.print(f'line {i}')\n"
    )
    python = shlex.quote(CLI[0])
    script = f"set -o pipefail; {python} -c {shlex.quote(code)} | head -1"
    done = subprocess.run(
        ["bash", "-c", script], check=False, capture_output=True, text=True, timeout=30,
        env=cli_env(),
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "line 0\n"), done.stderr


def test_odd_input_is_a_one_line_error_not_an_internal_one(tmp_path: Path) -> None:
    """Found in an exploratory test: each of these ended in "internal error: ..." (an
    OSError, a UnicodeEncodeError, a KeyError from member.json, an empty key file)."""
    where = tmp_path / "n"
    assert run_cli("init", "--mesh", "m", "--name", "n", "--data-dir", str(where)).returncode == 0
    broken = tmp_path / "broken"
    broken.mkdir(mode=0o700)
    for f in where.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "member.json").write_text("{}")
    empty_key = tmp_path / "empty-key"
    empty_key.mkdir(mode=0o700)
    for f in where.iterdir():
        (empty_key / f.name).write_bytes(f.read_bytes())
    (empty_key / "curve.key_secret").write_text("")
    up = ("up", "--no-discovery", "--listen", "127.0.0.1", "--port", "0", "--data-dir")
    for args, words in (
        (("status", "-s", "a" * 5000, "-t", "0.2"), "cannot reach a node"),
        (("status", "-s", "ipc://\udcff"), "not valid UTF-8"),
        ((*up, str(broken)), "not a signed membership record"),
        ((*up, str(empty_key)), "curve.key_secret: unreadable"),
        ((*up, str(tmp_path / "x\udcff"), "--insecure"), "not valid UTF-8"),
    ):
        done = run_cli(*args)
        assert done.returncode != 0, done.describe()
        assert len(done.err_lines) == 1, done.describe()
        assert words in done.stderr, done.describe()
        assert "internal error" not in done.stderr, done.describe()
