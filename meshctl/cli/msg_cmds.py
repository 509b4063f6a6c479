"""Commands that move events: pub, sub, tail, req, reply."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Annotated

import typer
import zmq
from rich.markup import escape

from meshctl.cli.options import (
    HeaderOpt,
    JsonOpt,
    Seconds,
    ServerOpt,
    TimeoutOpt,
    duration,
    parse_headers,
    positive_duration,
)
from meshctl.cli.output import dumps, event_json, iso_time, note, out_console, preview, write_line
from meshctl.cli.watch import NodeWatch
from meshctl.client import Client, Subscription, connect
from meshctl.errors import (
    InputError,
    MeshError,
    OperationalError,
    PayloadTooLarge,
    RemoteError,
    Timeout,
)
from node.events import Event
from node.topics import validate_pattern, validate_publish_topic

DEFAULT_REPLY_GROUP = "meshctl-reply"
CountOpt = Annotated[
    int | None,
    typer.Option("--count", "-n", min=1, show_default=False, help="Stop after N events."),
]
RawOpt = Annotated[bool, typer.Option("--raw", "-r", help="Print payloads only.")]


def _render(event: Event, json_out: bool, raw: bool) -> None:
    if json_out:
        write_line(dumps(event_json(event)))
    elif raw:  # one event a line; a payload that ends its own line got an empty one too
        data = event.data
        sys.stdout.buffer.write(data if data.endswith(b"\n") else data + b"\n")
    else:
        marks = "".join(
            (
                " (retained)" if event.retained else "",
                f" (delivery {event.deliveries})" if event.redelivered else "",
                f" #{event.seq}" if event.seq is not None else "",
            )
        )
        write_line(f"[{iso_time(event.time_ns)[11:23]}] {event.topic}{marks}: {event.text()}")


def pub(
    topic: Annotated[str, typer.Argument(help="Topic to publish to, e.g. plant1/line3/temp.")],
    data: Annotated[
        str,
        typer.Argument(
            help="Payload; '-' reads stdin, one event per line. "
            "{{n}} is replaced by the sequence number."
        ),
    ] = "",
    header: HeaderOpt = None,
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="Publish N events.")] = 1,
    rate: Annotated[
        float | None,
        typer.Option(
            "--rate",
            min=0.001,
            show_default=False,
            help="Events per second (default: as fast as the node takes them).",
        ),
    ] = None,
    persistent: Annotated[
        bool,
        typer.Option(
            "--persistent",
            "-p",
            help="Store the events before the node acknowledges them; exit 1 if it cannot.",
        ),
    ] = False,
    retain: Annotated[
        bool,
        typer.Option(
            "--retain", help="Keep as the topic's last value for new subscribers; '' clears it."
        ),
    ] = False,
    server: ServerOpt = None,
    timeout: TimeoutOpt = Seconds(2),
    json_out: JsonOpt = False,
) -> None:
    """Publish events to a topic."""
    validate_publish_topic(topic)
    if data == "-" and count != 1:  # it was ignored without a word (found in review)
        raise typer.BadParameter("stdin ('-') publishes one event per line", param_hint="--count")
    headers = parse_headers(header)
    mode = {"persistent": persistent, "retain": retain}
    verb = "stored" if persistent else "published"
    stopped: PayloadTooLarge | None = None
    with connect(server, name="meshctl pub", timeout=timeout) as client:
        start = time.monotonic()
        try:
            with client.batch():
                if data == "-":
                    sent, stopped = _publish_lines(client, topic, headers, rate, mode)
                else:
                    sent = _publish_count(client, topic, data, headers, count, rate, mode)
            if persistent:
                _confirm(client, sent, max(timeout, 5.0))
            client.flush(timeout)
        except Timeout as e:
            raise Timeout(f"{e}; {_so_far(client, persistent)}") from None
        except KeyboardInterrupt:  # exit 130 said nothing of what had gone out
            note(f"interrupted: {_so_far(client, persistent)}")
            raise typer.Exit(130) from None
        elapsed = time.monotonic() - start
    if stopped is not None:
        # Which lines made it: a stream stopped by one line said only that (found by an
        # exploratory test), and the ones before it were sent, or stored.
        raise InputError(
            f"line {sent + 1}: {stopped}; stopped there, {sent} line{'s' if sent != 1 else ''} "
            f"before it {verb}"
        )
    if json_out:
        print(dumps({"topic": topic, verb: sent, "seconds": round(elapsed, 6)}))
    else:
        # Paced, N events span N - 1 intervals: "--count 3 --rate 10" said "(15/s)".
        spans = sent - 1 if rate else sent
        rate_txt = f" in {elapsed:.3f}s ({spans / elapsed:,.0f}/s)" if sent > 1 and elapsed else ""
        note(f"{verb} {sent} event{'s' if sent != 1 else ''} to {topic}{rate_txt}")


def _so_far(client: Client, persistent: bool) -> str:
    """What a run that timed out did: a node stopped mid-run left only "accepted nothing
    for 2s", though thousands were stored (exploratory test)."""
    n = client.published
    if not persistent:
        return f"{n} event{'s' if n != 1 else ''} published before it"
    with contextlib.suppress(MeshError, zmq.ZMQError):
        for _ in range(1000):  # acknowledgements that came before the node went quiet
            if not client.process(0):
                break
    waiting = client.unconfirmed
    return (
        f"{n - waiting} of {n} event{'s' if n != 1 else ''} confirmed stored, "
        f"{waiting} unconfirmed (they may be stored)"
    )


def _confirm(client: Client, sent: int, timeout: float) -> None:
    """Wait until the node stored every event; if it refused some, say how many of the
    ``sent`` it stored: "the spool is full (and 226 more)" left the operator to guess
    whether any of a run of 600 had gone (found in session 9)."""
    refused: set[str] = set()
    first: RemoteError | None = None
    while True:  # each confirm raises one kind of refusal; the next, the others
        try:
            client.confirm(timeout)
            break
        except RemoteError as e:
            first = first or e
            refused.update(e.ids)
    if first is not None:
        n = len(refused) or 1
        raise RemoteError(
            f"{first.reason}; {n} of {sent} event{'s' if sent != 1 else ''} refused, "
            f"{sent - n} stored",
            first.code,
            tuple(refused),
        )


def _pace(client: Client, i: int, start: float, rate: float | None) -> None:
    """Sleep until event ``i`` is due, handing buffered events over first."""
    if rate is None:
        return
    due = start + i / rate
    delay = due - time.monotonic()
    if delay > 0:
        client.send_pending()
        time.sleep(delay)


def _publish_count(
    client: Client,
    topic: str,
    data: str,
    headers: dict[str, str],
    count: int,
    rate: float | None,
    mode: dict[str, bool],
) -> int:
    templated = "{{n}}" in data
    payload = os.fsencode(data)  # the argument's bytes as given, UTF-8 or not
    start = time.monotonic()
    for i in range(count):
        _pace(client, i, start, rate)
        body = os.fsencode(data.replace("{{n}}", str(i + 1))) if templated else payload
        client.publish(topic, body, headers, **mode)
    return count


def _publish_lines(
    client: Client,
    topic: str,
    headers: dict[str, str],
    rate: float | None,
    mode: dict[str, bool],
) -> tuple[int, PayloadTooLarge | None]:
    """Publish stdin, one event per line: (lines sent, the error of a line that was too
    large, which stops the stream there)."""
    sent = 0
    start = time.monotonic()
    for line in sys.stdin.buffer:
        _pace(client, sent, start, rate)
        try:
            client.publish(topic, line.rstrip(b"\r\n"), headers, **mode)
        except PayloadTooLarge as e:
            return sent, e
        sent += 1
        if rate is None and sent % 64 == 0:
            client.send_pending()
    return sent, None


def sub(
    patterns: Annotated[
        list[str] | None,
        typer.Argument(help="Patterns: '*' one level, '>' the rest.", show_default=False),
    ] = None,
    group: Annotated[
        str | None,
        typer.Option(
            "--group",
            "-g",
            show_default=False,
            help="Join a queue group (one member gets each event).",
        ),
    ] = None,
    count: CountOpt = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            "-t",
            parser=positive_duration,  # 0 was taken, and "no event within 0s" followed
            metavar="DURATION",
            show_default=False,
            help="Exit 1 if no (further) event arrives within this time.",
        ),
    ] = None,
    queue: Annotated[
        str | None,
        typer.Option(
            "--queue",
            "-q",
            show_default=False,
            help="Consume the durable queue NAME (explicit acks; see --ack).",
        ),
    ] = None,
    ack: Annotated[
        bool, typer.Option("--ack", help="With --queue: acknowledge each event once printed.")
    ] = False,
    since: Annotated[
        float | None,
        typer.Option(
            "--since",
            parser=duration,
            metavar="DURATION",
            show_default=False,
            help="First replay the node's log from this long ago (10m, 1h), then go live.",
        ),
    ] = None,
    from_seq: Annotated[
        int | None,
        typer.Option(
            "--from-seq", min=1, show_default=False, help="First replay the log from sequence N."
        ),
    ] = None,
    retained: Annotated[
        bool,
        typer.Option(
            "--retained/--no-retained", help="First receive matching retained last values."
        ),
    ] = True,
    raw: RawOpt = False,
    json_out: JsonOpt = False,
    server: ServerOpt = None,
) -> None:
    """Subscribe and print events as they arrive (Ctrl-C exits 0)."""
    patterns = patterns or []
    for p in patterns:
        validate_pattern(p)
    if queue is None and not patterns:
        raise InputError("give at least one pattern, or --queue NAME")
    if queue is not None and (patterns or group or since is not None or from_seq is not None):
        raise InputError("--queue takes no patterns, --group, --since or --from-seq")
    if ack and queue is None:
        raise InputError("--ack needs --queue NAME")
    # The wait for events is not the wait for the node: -t 0.0001 said "cannot reach".
    with connect(server, name="meshctl sub", timeout=max(timeout or 2.0, 2.0)) as client:
        received = 0
        try:  # all of it: a stop right after `subscribed:` exited 130 (as `reply` did)
            if queue is not None:
                # A consumer that stops after N takes no more than N: the rest stay for others.
                # Not acknowledging, its window never frees: past 256 it printed the first
                # ones again after the ack wait (exploratory test), so it is N (the node keeps
                # it within what a client's socket queue holds).
                window = min(count or 256, 256 if ack else 65_536)
                subscription = client.consume(queue, max_inflight=window)
                granted = subscription.max_inflight
                if not ack and count and granted is not None and granted < count:
                    # Beyond the window it would print the first ones again after the ack
                    # wait, and never the rest (review).
                    raise InputError(
                        f"--count {count} without --ack: the node lends at most {granted} "
                        "unacknowledged events at once (limits.client_queue); use --ack, or a "
                        "smaller --count"
                    )
                note(f"consuming queue {queue}" + ("" if ack else " (not acknowledging)"))
            else:
                subscription = client.subscribe(
                    *patterns, group=group, retained=retained, since=since, from_seq=from_seq
                )
                for p in patterns:
                    note(f"subscribed: {p}")
                first = subscription.first_seq
                if from_seq is not None and first is not None and first > from_seq:
                    note(f"replay from #{first}: the log's entries before it were trimmed")
            watch = NodeWatch(client)
            while count is None or received < count:
                if not subscription.queue:
                    sys.stdout.flush()
                try:
                    event = watch.next(subscription, timeout)
                except Timeout:
                    raise Timeout(f"no event within {timeout:g}s (received {received})") from None
                _render(event, json_out, raw)
                if ack:
                    subscription.ack(event)
                received += 1
        except KeyboardInterrupt:
            pass
        finally:
            sys.stdout.flush()


def tail(
    pattern: Annotated[
        str, typer.Argument(help="Pattern to watch \\[default: everything].", show_default=False)
    ] = ">",
    system: Annotated[
        bool, typer.Option("--system", "-S", help="Also show the mesh's own $mesh/... events.")
    ] = False,
    count: CountOpt = None,
    server: ServerOpt = None,
) -> None:
    """Live view for operators: time, topic, size, payload preview and the running rate."""
    validate_pattern(pattern)
    patterns = [pattern] + (["$mesh/>"] if system and pattern != "$mesh/>" else [])
    out = out_console()
    stamps: deque[float] = deque()
    with connect(server, name="meshctl tail") as client:
        subscription = client.subscribe(*patterns)
        note(f"tailing {' '.join(patterns)} on {client.server} (Ctrl-C to stop)")
        seen = 0
        watch = NodeWatch(client)
        try:
            while count is None or seen < count:
                event = watch.next(subscription)
                seen += 1
                now = time.monotonic()
                if not event.retained:  # a stored last value is not traffic (exploratory test)
                    stamps.append(now)
                while stamps and stamps[0] < now - 1.0:
                    stamps.popleft()
                colour = "magenta" if event.topic.startswith("$") else "cyan"
                mark = " [dim](retained)[/]" if event.retained else ""
                out.print(
                    f"[dim]{iso_time(event.time_ns)[11:23]}[/] "
                    f"[{colour}]{escape(event.topic)}[/]{mark} [yellow]{len(event.data)}B[/] "
                    f"{escape(preview(event.data))} [dim]{len(stamps)}/s[/]"
                )
        except KeyboardInterrupt:
            pass


def req(
    topic: Annotated[str, typer.Argument(help="Topic of the service to ask.")],
    data: Annotated[str, typer.Argument(help="Request payload; '-' reads stdin.")] = "",
    header: HeaderOpt = None,
    replies: Annotated[
        int,
        typer.Option("--replies", min=0, help="Replies to wait for; 0 collects until the timeout."),
    ] = 1,
    timeout: TimeoutOpt = Seconds(2),
    raw: RawOpt = False,
    json_out: JsonOpt = False,
    server: ServerOpt = None,
) -> None:
    """Send a request and print the reply (or replies)."""
    validate_publish_topic(topic)
    headers = parse_headers(header)
    payload = sys.stdin.buffer.read() if data == "-" else os.fsencode(data)
    partial: Timeout | None = None
    with connect(server, name="meshctl req", timeout=timeout) as client:
        try:
            got = client.request_many(
                topic, payload, replies=replies, timeout=timeout, headers=headers
            )
        except Timeout as e:
            # The replies that came are printed, as `nats req --replies` does: fewer than
            # asked for threw them away (exploratory test). Exit 1 all the same.
            got, partial = e.replies, (e if replies != 0 else None)
    failed = None
    for event in got:
        _render(event, json_out, raw or not json_out)
        if event.is_error and failed is None:
            failed = event
    sys.stdout.flush()
    if failed is not None:
        raise OperationalError(f"responder failed: {failed.text().strip() or 'no detail'}")
    if partial is not None:
        raise partial
    if not got:
        raise Timeout(f"no reply to {topic} within {timeout:g}s")


def reply(
    pattern: Annotated[str, typer.Argument(help="Pattern of requests to answer.")],
    data: Annotated[str, typer.Argument(help="Fixed reply payload.")] = "",
    echo: Annotated[bool, typer.Option("--echo", help="Reply with the request payload.")] = False,
    command: Annotated[
        str | None,
        typer.Option(
            "--command",
            show_default=False,
            help="Run CMD with the request on stdin; reply with its stdout.",
        ),
    ] = None,
    group: Annotated[
        str, typer.Option("--group", "-g", help="Queue group shared by repliers.")
    ] = DEFAULT_REPLY_GROUP,
    count: Annotated[
        int | None,
        typer.Option("--count", "-n", min=1, show_default=False, help="Stop after N requests."),
    ] = None,
    command_timeout: Annotated[
        float,
        typer.Option(
            "--command-timeout",
            parser=positive_duration,
            metavar="DURATION",
            help="Limit for one run of CMD.",
        ),
    ] = Seconds(10),
    server: ServerOpt = None,
) -> None:
    """Answer requests with DATA, the request itself (--echo) or a command's output."""
    validate_pattern(pattern)
    if sum((bool(data), echo, command is not None)) > 1:
        raise typer.BadParameter("give only one of DATA, --echo and --command")

    def answer(request: Event) -> bytes:
        return request.data if echo else os.fsencode(data)

    fixed = None if command is not None else answer
    with connect(server, name="meshctl reply") as client:
        subscription = None
        in_hand = None  # a request taken and not answered yet
        try:  # all of it: a stop right after `subscribed:` exited 130 (a flaky test)
            subscription = client.subscribe(pattern, group=group)
            note(f"subscribed: {pattern}")
            answered = 0
            watch = NodeWatch(client)
            while count is None or answered < count:
                request = watch.next(subscription)
                if request.reply_to is None:
                    continue  # a plain event on the topic, not a request
                in_hand = request
                if command is not None:
                    body, error = _run(command, request.data, command_timeout)
                else:
                    body, error = answer(request), False
                try:
                    client.reply(request, body, error=error)
                except PayloadTooLarge as e:
                    # One oversized answer ended the responder, and its requester waited out
                    # its timeout (exploratory test): answer with the error, go on serving.
                    body, error = f"reply not sent: {e}".encode(), True
                    client.reply(request, body, error=error)
                in_hand = None
                client.send_pending()
                answered += 1
                note(f"{'failed' if error else 'replied to'} {request.topic} ({len(body)} bytes)")
            # --count reached: those handed to us beyond it hear at once that no answer
            # comes from here (they timed out: review), and may ask again
            _answer_left(client, subscription, None, None)
        except KeyboardInterrupt:
            if subscription is not None:
                _answer_left(client, subscription, fixed, in_hand)


def _answer_left(
    client: Client,
    subscription: Subscription,
    fixed: Callable[[Event], bytes] | None,
    in_hand: Event | None,
) -> None:
    """A replier that stops answers at once the request it was on (a command's ended)
    and those its node has handed it already (queued here): with its reply, or for a
    command with an error. They waited out their timeout (exploratory test: 8 of 20,
    while the group's other member was alive). It unsubscribes first: no more come, and
    those the node sent before it took that in are answered too, as a NATS drain does."""
    try:
        if in_hand is not None:
            _answer_now(client, in_hand, fixed)
        subscription.unsubscribe()
        while subscription.queue:
            request = subscription.queue.popleft()
            if request.reply_to is not None:
                _answer_now(client, request, fixed)
        client.send_pending()
    except (OperationalError, InputError):  # the node gone, an oversized answer: we stop
        pass


def _answer_now(client: Client, request: Event, fixed: Callable[[Event], bytes] | None) -> None:
    if fixed is None:
        client.reply(request, b"responder stopped before answering", error=True)
    else:
        client.reply(request, fixed(request))
    client.send_pending()  # the first of them first, before the unsubscribe's wait


def _run(command: str, stdin: bytes, limit: float) -> tuple[bytes, bool]:
    """Run a shell command for one request; (stdout, False) or (error text, True).

    In a process group of its own, ended whole on a timeout or an interrupt: killing the
    shell alone left what it had started running (the `sleep` of a timed-out
    `sleep 30; cat`), and a stopped replier left the whole command behind (review)."""
    proc = None
    try:
        with _stops_held():
            proc = subprocess.Popen(  # noqa: S602 - the operator's shell command is the feature
                command,
                shell=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        out, err = proc.communicate(stdin, timeout=limit)
    except subprocess.TimeoutExpired:
        assert proc is not None
        _end_group(proc)
        return f"command timed out after {limit:g}s".encode(), True
    except BaseException:
        if proc is not None:
            _end_group(proc)
        raise
    if proc.returncode != 0:
        why = err.decode(errors="replace").strip().splitlines()
        return (
            f"command exited with {proc.returncode}" + (f": {why[-1]}" if why else "")
        ).encode(), True
    return out, False


@contextlib.contextmanager
def _stops_held() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP while a command starts, and deliver them on leaving:
    one that came while Popen had started the command but not yet returned it left the
    command running with no one to end it (a CI run: a SIGHUP'd replier's `sleep`)."""
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    came: list[int] = []
    try:
        before = [signal.signal(s, lambda signum, _frame: came.append(signum)) for s in stops]
    except ValueError:  # not the main thread: no handler of ours runs here anyway
        yield
        return
    try:
        yield
    finally:
        for s, handler in zip(stops, before, strict=True):
            signal.signal(s, handler)
        for signum in came:  # to the handler it would have met: ignored stays ignored
            signal.raise_signal(signum)


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill a command and everything it started, and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        proc.communicate(timeout=5)
