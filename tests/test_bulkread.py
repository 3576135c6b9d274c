"""The bulk log reader (bus/bulkread.py over bus/wire.py) against real servers: it reads
what a Tail reads, under flow control, TLS, nkeys and the generated permissions, fails
clearly and in bounded time when the server goes away, and parses the wire exactly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats.js.errors
import pytest
from agents import FLEET, job_request, submit
from deployment import Deployment, run_cli
from linkproxy import LinkProxy
from natsserver import NatsCluster, NatsServer, free_port, nkey_user_config, tls_config
from tlsutil import make_ca_and_server_cert

from bus import (
    AuthError,
    Bus,
    ConnectionFailedError,
    ConnectSettings,
    FleetTimeoutError,
    PermissionDeniedError,
    StorageSettings,
    connect,
    generate_seed,
    provision,
    write_seed_file,
)
from bus.bulkread import read_all, read_bulk
from bus.keys import public_key_of
from bus.log import LogRecord, Tail, read_log
from bus.wire import Delivery, WireConnection, header_map, header_value, status_of

STREAM, SUBJECTS = "BULK", "bulk.>"
ONE_MIB = 1 << 20


async def make_stream(bus: Bus) -> None:
    await bus.js.add_stream(name=STREAM, subjects=[SUBJECTS])


async def fill(bus: Bus, sizes: list[int], subject: str = "bulk.a") -> None:
    for i, size in enumerate(sizes):
        await bus.js.publish(f"{subject}.{i}", os.urandom(size))


async def tail_read(bus: Bus, subject: str, start_seq: int = 0) -> list[LogRecord]:
    async with await Tail.open(bus, STREAM, subject, start_seq=start_seq) as tail:
        return await asyncio.wait_for(tail.read_available(), 60)


async def to_the_end(reader: AsyncIterator[list[LogRecord]], timeout: float) -> int:
    """Read what is left (bounded); how many records that was."""
    count = 0
    async with asyncio.timeout(timeout):
        async for batch in reader:
            count += len(batch)
    return count


def same(bulk: list[LogRecord], tail: list[LogRecord]) -> None:
    """What the bulk reader read is what the Tail read, and it knows when each was stored."""
    assert [(r.seq, r.subject, r.data, r.headers) for r in bulk] == [
        (r.seq, r.subject, r.data, r.headers) for r in tail
    ]
    assert all(r.stored_ns is not None and r.stored_ns > 0 for r in bulk)


# --- against a real server -----------------------------------------------------------------


@pytest.mark.both_loops
async def test_read_all_reads_what_a_tail_reads(bus: Bus) -> None:
    await make_stream(bus)
    near_max = ONE_MIB - 4096  # the server's default max_payload counts headers too
    headers: list[Callable[[int], dict[str, str] | None]] = [
        lambda i: None,
        lambda i: {"Nats-Msg-Id": f"id-{i}"},  # what every stored event carries
        lambda i: {"Nats-Msg-Id": f"m-{i}", "X-Trace": "a b: c", "X-Dash": "-", "X-Utf8": "zürich"},
        lambda i: {"X-Only": "no id", "X-Second": str(i)},
    ]
    sizes = [0, 1, 7, 300, 512, near_max, 150, near_max, 3, near_max - 100, 999, 2]
    for i, size in enumerate(sizes):
        subject = "bulk.b.x" if i % 3 == 0 else f"bulk.a.{i}"
        made = headers[i % len(headers)](i)
        await bus.js.publish(subject, os.urandom(size), headers=made)
    for filter_ in (SUBJECTS, "bulk.a.>", "bulk.b.x"):
        bulk = await asyncio.wait_for(read_all(bus, STREAM, filter_), 60)
        same(bulk, await tail_read(bus, filter_))
    everything = await read_all(bus, STREAM, SUBJECTS)
    assert [r.seq for r in everything] == list(range(1, len(sizes) + 1))
    assert sum(len(r.data) for r in everything) == sum(sizes)
    assert everything[0].headers == {}
    assert everything[1].headers == {"Nats-Msg-Id": "id-1"}
    assert everything[2].headers["X-Utf8"] == "zürich"

    # From a sequence in the middle: that message and every later one.
    middle = await read_all(bus, STREAM, SUBJECTS, start_seq=6)
    same(middle, await tail_read(bus, SUBJECTS, start_seq=6))
    assert [r.seq for r in middle] == list(range(6, len(sizes) + 1))
    # An empty slice, past the end or on a subject nobody used, ends at once with [].
    assert await asyncio.wait_for(read_all(bus, STREAM, SUBJECTS, start_seq=100), 10) == []
    assert await asyncio.wait_for(read_all(bus, STREAM, "bulk.none.>"), 10) == []
    assert await asyncio.wait_for(read_all(bus, STREAM, "bulk.b.x", start_seq=11), 10) == []


async def test_a_slow_caller_gets_every_message_once_in_order(
    nats_server: NatsServer, bus: Bus
) -> None:
    await make_stream(bus)
    # 12 MB: more than the consumer may send before flow control holds it back (the
    # server's max_pending / 16) and more than the socket buffers hold.
    sizes = [64 * 1024 + i for i in range(192)]
    await fill(bus, sizes)
    batches, seqs, held_back = 0, [], []
    async with asyncio.timeout(120):
        async for batch in read_bulk(bus, STREAM, SUBJECTS):
            batches += 1
            seqs += [r.seq for r in batch]
            assert [len(r.data) for r in batch] == [sizes[s - 1] for s in (r.seq for r in batch)]
            await asyncio.sleep(0.2)  # the caller's own work between batches, not a wait
            # While the caller works, the server has sent only what flow control allows.
            (reader,) = [c for c in await bus.js.consumers_info(STREAM) if c.name[:5] == "bulk_"]
            assert reader.delivered is not None
            held_back.append(reader.delivered.stream_seq)
    assert seqs == list(range(1, len(sizes) + 1))
    assert batches > 1
    assert held_back[0] < len(sizes)
    assert not [line for line in nats_server.log if "Slow Consumer" in line]


@pytest.mark.slow
async def test_from_every_node_of_a_cluster(nats_cluster: NatsCluster) -> None:
    """The consumer lives with the stream's leader; a reader on any node is pushed to
    across the routes, and reads the same."""
    sizes = [5, 70_000, 300, ONE_MIB - 4096, 1]
    for i, url in enumerate(nats_cluster.urls):
        async with await connect(ConnectSettings(servers=[url], request_timeout_s=10)) as bus:
            if i == 0:
                # Provisioning waits until the starting cluster can place 3 replicas.
                await provision(bus.js, settings=StorageSettings(replicas=3))
                await bus.js.add_stream(name=STREAM, subjects=[SUBJECTS], num_replicas=3)
                await fill(bus, sizes)
            got = await asyncio.wait_for(read_all(bus, STREAM, SUBJECTS), 60)
            assert [len(r.data) for r in got] == sizes, url
            # read_log, not a bare Tail: just after the cluster elected the stream's
            # leader, a new consumer may say nothing is pending (a bare Tail then reads
            # nothing); both readers wait for the newest message the leader names.
            same(got, await read_log(bus, STREAM, SUBJECTS))


async def test_bulk_read_over_tls_with_an_nkey(
    server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    tls = make_ca_and_server_cert(tmp_path / "tls")
    key, seed = tmp_path / "reader.nk", generate_seed()
    write_seed_file(key, seed)
    server = server_factory(
        config=nkey_user_config(public_key_of(seed)) + "\n" + tls_config(tls.cert, tls.key, tls.ca)
    )
    url = server.url.replace("nats://", "tls://")
    settings = ConnectSettings(servers=[url], nkey_file=key, tls_ca=tls.ca)
    async with await connect(settings) as bus:
        await provision(bus.js)
        await make_stream(bus)
        await fill(bus, [10, 200_000, 3000])
        got = await asyncio.wait_for(read_all(bus, STREAM, SUBJECTS), 30)
        assert [(r.seq, len(r.data)) for r in got] == [(1, 10), (2, 200_000), (3, 3000)]
    # Another key, same TLS: the reader's own connection is refused as the bus's would be.
    stranger = tmp_path / "stranger.nk"
    write_seed_file(stranger, generate_seed())
    async with await connect(settings) as bus:
        forged = bus.settings.model_copy(update={"nkey_file": stranger})
        bus.settings = forged
        with pytest.raises(AuthError, match="refused the reader"):
            await asyncio.wait_for(read_all(bus, STREAM, SUBJECTS), 30)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("deployment", ["generated"], indirect=True)
async def test_under_the_generated_permissions(deployment: Deployment) -> None:
    d = deployment
    tester = await d.as_("tester")
    s = tester.subjects
    jobs = [await submit(tester, d["tester"].signer, "web-1", job_request(["true"])) for _ in "ab"]
    their = await submit(tester, d["tester"].signer, "web-2", job_request(["true"]))

    # An operator reads the whole log, through the real CLI too.
    mine = await asyncio.wait_for(read_all(tester, s.events_stream, s.all_events), 30)
    assert [r.subject for r in mine][-3:] == [
        s.job_event("web-1", jobs[0], "submitted"),
        s.job_event("web-1", jobs[1], "submitted"),
        s.job_event("web-2", their, "submitted"),
    ]
    replay = await run_cli(FLEET, "replay", "--json", env=d.env("tester"), timeout=60)
    assert replay.returncode == 0, replay.stderr
    assert '"events": ' in replay.stdout
    audit = await run_cli(FLEET, "audit", "--verify", env=d.env("tester"), timeout=60)
    assert audit.returncode == 0, audit.stderr
    assert "verified" in audit.stderr

    # An agent may read neither the whole log, nor another agent's jobs, nor even its own
    # through this reader: its one create subject is its catch-up consumer's.
    agent = await d.as_("web-1")
    for subject in (s.all_events, f"{s.prefix}.evt.job.web-2.>", f"{s.prefix}.evt.job.web-1.>"):
        with pytest.raises(PermissionDeniedError, match=r"CONSUMER\.CREATE"):
            await asyncio.wait_for(read_all(agent, s.events_stream, subject), 30)
    denied = await run_cli(FLEET, "replay", env=d.env("web-1"), timeout=60)
    assert denied.returncode == 2, denied.stderr
    assert "permission denied" in denied.stderr, denied.stderr
    assert "CONSUMER.CREATE" in denied.stderr, denied.stderr

    # Its reader's own connection may not listen anywhere its bus may not.
    forbidden = [
        f"{s.prefix}.evt.job.web-2.>",  # another agent's jobs, live
        s.all_events,
        "_INBOX_tester.>",  # the operator's replies
        "_INBOX.>",  # anyone's replies in the shared inbox
    ]
    for subject in [agent.nc.new_inbox(), *forbidden]:
        reader = await WireConnection.open(agent, "attacker")
        try:
            reader.subscribe(subject)
            if subject in forbidden:
                refusal = re.escape(f"subscribing to '{subject}'")
                with pytest.raises(PermissionDeniedError, match=refusal):
                    await asyncio.wait_for(reader.flushed(), 10)
            else:  # its own inbox, where its bulk reads are delivered
                await asyncio.wait_for(reader.flushed(), 10)
        finally:
            reader.close()
    # A headless user reads nothing of the log by itself.
    batch = await d.as_("batch")
    with pytest.raises(PermissionDeniedError):
        await asyncio.wait_for(read_all(batch, s.events_stream, s.all_events), 30)


async def test_a_server_stopped_mid_read_fails_the_read(nats_server: NatsServer, bus: Bus) -> None:
    await make_stream(bus)
    await fill(bus, [ONE_MIB - 4096] * 40)
    reader = read_bulk(bus, STREAM, SUBJECTS)
    first = await asyncio.wait_for(anext(reader), 30)
    assert first[0].seq == 1
    await asyncio.to_thread(nats_server.stop)
    with pytest.raises(ConnectionFailedError, match=r"closed the reader|connection broke"):
        await to_the_end(reader, 30)


async def test_a_frozen_server_times_the_read_out(nats_server: NatsServer, bus: Bus) -> None:
    await make_stream(bus)
    await fill(bus, [ONE_MIB - 4096] * 40)
    reader = read_bulk(bus, STREAM, SUBJECTS)
    await asyncio.wait_for(anext(reader), 30)
    os.kill(nats_server.pid, signal.SIGSTOP)
    try:
        with pytest.raises(FleetTimeoutError, match="nothing heard"):
            await to_the_end(reader, 40)
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
        await reader.aclose()


async def test_an_unusable_server_is_a_clear_connection_error(nats_server: NatsServer) -> None:
    proxy = await LinkProxy(nats_server.port).start()
    try:
        async with await connect(ConnectSettings(servers=[f"nats://127.0.0.1:{proxy.port}"])) as b:
            await provision(b.js)
            await make_stream(b)
            # The server the bus reached now hangs up on every new connection at once.
            proxy.target = free_port()
            with pytest.raises(ConnectionFailedError, match="cannot open a reader"):
                await asyncio.wait_for(read_all(b, STREAM, SUBJECTS), 30)
        # A bus that is closed has no server to read from.
        with pytest.raises(ConnectionFailedError, match="not connected"):
            await asyncio.wait_for(read_all(b, STREAM, SUBJECTS), 10)
    finally:
        await proxy.close()


async def raw_publish(
    port: int, subject: str, headers: bytes, body: bytes, reply: str = ""
) -> None:
    """Publish bytes nats-py would not write (a status line in the headers), as a client
    that skips every check may."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)  # INFO
        writer.write(b'CONNECT {"verbose":false,"headers":true,"protocol":1}\r\n')
        line = f"HPUB {subject} {reply} {len(headers)} {len(headers) + len(body)}"
        writer.write(line.replace("  ", " ").encode() + b"\r\n" + headers + body + b"\r\n")
        writer.write(b"PING\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"PONG\r\n"), 5) == b"PONG\r\n"
    finally:
        writer.close()


PWNED = "bulk.pwned"
"""Where a forged message asks the reader to answer (inside the stream: it would stay)."""


async def slip_in(bus: Bus, port: int, forged: str, kind: str) -> None:
    """Publish into the inbox of the reader whose consumer's name starts with ``kind``
    (someone else: here anyone, on the open server) a message that is no delivery."""
    (reader,) = [c for c in await bus.js.consumers_info(STREAM) if c.name.startswith(kind)]
    inbox = reader.config.deliver_subject
    assert inbox is not None
    if forged == "data":
        await bus.nc.publish(inbox, b"forged", reply=PWNED)
    else:
        status = b"NATS/1.0 100 FlowControl Request\r\n\r\n"
        await raw_publish(port, inbox, status, b"", reply=PWNED)


@pytest.mark.parametrize("forged", ["data", "flow control"])
async def test_a_message_slipped_into_the_reader_s_inbox_ends_the_read(
    nats_server: NatsServer, bus: Bus, forged: str
) -> None:
    await make_stream(bus)
    await fill(bus, [256 * 1024] * 48)  # more than flow control lets through at once
    reader = read_bulk(bus, STREAM, SUBJECTS)
    await asyncio.wait_for(anext(reader), 30)
    # Neither a record nor a request the reader answers wherever it is told.
    await slip_in(bus, nats_server.port, forged, "bulk_")
    with pytest.raises(ConnectionFailedError, match=r"not a delivery|not the server's"):
        await to_the_end(reader, 30)
    with pytest.raises(nats.js.errors.NotFoundError):
        await bus.js.get_last_msg(STREAM, PWNED)


@pytest.mark.parametrize("forged", ["data", "flow control"])
async def test_a_message_slipped_into_a_tail_s_inbox_breaks_it(
    nats_server: NatsServer, bus: Bus, forged: str
) -> None:
    """The same attack on a Tail (``fleet audit --follow`` goes on with one)."""
    await make_stream(bus)
    await fill(bus, [256 * 1024] * 48)
    async with await Tail.open(bus, STREAM, SUBJECTS) as tail:
        assert await tail.fetch(timeout=10)
        await slip_in(bus, nats_server.port, forged, "tail_")
        with pytest.raises(ConnectionFailedError, match=r"not a delivery|not the server's"):
            await fetch_until_broken(tail, 30)
    with pytest.raises(nats.js.errors.NotFoundError):
        await bus.js.get_last_msg(STREAM, PWNED)


async def fetch_until_broken(tail: Tail, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            await tail.fetch(timeout=1.0)


async def test_the_server_refuses_a_forged_delivery(bus: Bus) -> None:
    """What the readers rely on to tell a delivery: no client may send a message whose
    reply says where in the log it is."""
    await make_stream(bus)
    await fill(bus, [1])
    forged = f"$JS.ACK.{STREAM}.bulk_x.1.2.1.1700000000000000000.0"
    heard = await bus.nc.subscribe("bulk.inbox")
    await bus.nc.publish("bulk.inbox", b"forged", reply=forged)
    denial = await bus.wait_denied(forged, timeout=5)
    assert "publishing to" in str(denial)
    await bus.nc.publish("bulk.inbox", b"plain", reply="bulk.reply")
    assert (await heard.next_msg(timeout=5)).data == b"plain"  # the forged one never came


async def test_a_stored_message_that_looks_like_a_status_is_a_record(
    nats_server: NatsServer, bus: Bus
) -> None:
    await make_stream(bus)
    await fill(bus, [10])
    for status in (b"NATS/1.0 100 FlowControl Request\r\n\r\n", b"NATS/1.0 409 Gone\r\n\r\n"):
        await raw_publish(nats_server.port, "bulk.status", status, b"")
    await fill(bus, [20], subject="bulk.z")
    bulk = await asyncio.wait_for(read_all(bus, STREAM, SUBJECTS), 30)
    assert [r.subject for r in bulk] == ["bulk.a.0", "bulk.status", "bulk.status", "bulk.z.0"]
    same(bulk, await tail_read(bus, SUBJECTS))


# --- the frame parser on crafted bytes -----------------------------------------------------


@contextlib.asynccontextmanager
async def fed() -> AsyncIterator[tuple[WireConnection, asyncio.StreamReader, socket.socket]]:
    """A WireConnection reading what the test feeds it, writing to a real socket whose
    other end the test reads."""
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    _, writer = await asyncio.open_connection(sock=ours)
    reader = asyncio.StreamReader()
    conn = WireConnection(reader, writer)
    try:
        yield conn, reader, theirs
    finally:
        conn.close()
        theirs.close()


HMSG_REPLY = (
    b"HMSG _INBOX.x.y 1 $JS.ACK.S.c.1.7.1.1700000000000000000.3 30 33\r\n"
    b"NATS/1.0\r\nNats-Msg-Id: id1\r\n\r\nabc\r\n"
)
HMSG_NO_REPLY = b"HMSG bulk.a 2 12 17\r\nNATS/1.0\r\n\r\nhello\r\n"
MSG_REPLY = b"MSG bulk.b 3 reply.to 4\r\nMSG \r\n"
MSG_EMPTY = b"MSG bulk.c 3 0\r\n\r\n"
FLOW_CONTROL = (
    b"HMSG _INBOX.x.y 1 $JS.FC.S.c.9 36 36\r\nNATS/1.0 100 FlowControl Request\r\n\r\n\r\n"
)
STREAM_OF_FRAMES = HMSG_REPLY + b"+OK\r\n" + HMSG_NO_REPLY + MSG_REPLY + MSG_EMPTY + FLOW_CONTROL
EXPECTED: list[Delivery] = [
    (
        b"_INBOX.x.y",
        b"$JS.ACK.S.c.1.7.1.1700000000000000000.3",
        b"NATS/1.0\r\nNats-Msg-Id: id1\r\n\r\n",
        b"abc",
    ),
    (b"bulk.a", b"", b"NATS/1.0\r\n\r\n", b"hello"),
    (b"bulk.b", b"reply.to", b"", b"MSG "),  # a body that looks like a frame is a body
    (b"bulk.c", b"", b"", b""),
    (b"_INBOX.x.y", b"$JS.FC.S.c.9", b"NATS/1.0 100 FlowControl Request\r\n\r\n", b""),
]


async def test_frames_split_at_any_byte_are_read_whole() -> None:
    for cut in range(1, len(STREAM_OF_FRAMES)):
        async with fed() as (conn, reader, _):
            reader.feed_data(STREAM_OF_FRAMES[:cut])
            got = await conn.read()
            reader.feed_data(STREAM_OF_FRAMES[cut:])
            got += await conn.read()
            assert got == EXPECTED, cut
    async with fed() as (conn, reader, _):
        got = []
        for i in range(len(STREAM_OF_FRAMES)):  # one byte a read
            reader.feed_data(STREAM_OF_FRAMES[i : i + 1])
            got += await conn.read()
        assert got == EXPECTED


async def test_a_ping_between_frames_is_answered() -> None:
    async with fed() as (conn, reader, peer):
        reader.feed_data(HMSG_REPLY + b"PING\r\n" + MSG_EMPTY)
        assert await conn.read() == [EXPECTED[0], EXPECTED[3]]
        await conn.drain()
        assert await asyncio.to_thread(peer.recv, 100) == b"PONG\r\n"


async def test_errors_and_a_closed_connection_end_the_read() -> None:
    async with fed() as (conn, reader, _):
        reader.feed_data(HMSG_REPLY + b"-ERR 'Slow Consumer'\r\n")
        with pytest.raises(ConnectionFailedError, match="Slow Consumer"):
            await conn.read()
    async with fed() as (conn, reader, _):
        reader.feed_data(b"-ERR 'Permissions Violation for Subscription to \"a.b\"'\r\n")
        with pytest.raises(PermissionDeniedError, match=r"subscribing to 'a\.b'"):
            await conn.read()
    async with fed() as (conn, reader, _):
        reader.feed_data(HMSG_REPLY[:20])
        reader.feed_eof()
        assert await conn.read() == []  # a frame's start, kept for the next read
        with pytest.raises(ConnectionFailedError, match="closed"):
            await conn.read()


async def test_a_server_that_hangs_up_before_the_pong_is_a_connection_error() -> None:
    async with fed() as (conn, reader, _):
        conn.subscribe("a.b")
        reader.feed_data(b"+OK\r\n")
        reader.feed_eof()
        with pytest.raises(ConnectionFailedError, match="broke"):
            await asyncio.wait_for(conn.flushed(), 5)


async def test_a_reset_connection_is_a_connection_error() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        peer, _ = listener.accept()
        conn = WireConnection(reader, writer)
        # Closed with unread data and no linger: the kernel answers with a reset.
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        with pytest.raises(ConnectionFailedError, match="broke"):
            await asyncio.wait_for(conn.read(), 5)
        conn.close()
    finally:
        listener.close()


def test_status_lines_and_headers() -> None:
    assert status_of(EXPECTED[4][2]) == "100"
    assert status_of(b"NATS/1.0 409 Consumer Deleted\r\n\r\n") == "409"
    assert status_of(b"NATS/1.0 404\r\n\r\n") == "404"
    assert status_of(EXPECTED[0][2]) is None
    assert status_of(b"NATS/1.0\r\n\r\n") is None
    stalled = (
        b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 5\r\n"
        b"Nats-Consumer-Stalled: $JS.FC.S.c.2\r\n\r\n"
    )
    assert status_of(stalled) == "100"
    assert header_value(stalled, "Nats-Consumer-Stalled") == "$JS.FC.S.c.2"
    assert header_map(EXPECTED[0][2]) == {"Nats-Msg-Id": "id1"}
    assert header_map(b"NATS/1.0\r\n\r\n") == {}
    assert header_map(b"NATS/1.0\r\nA: 1\r\nB: x: y\r\nA: 2\r\n\r\n") == {"A": "1", "B": "x: y"}
    assert header_map(b"NATS/1.0\r\nNats-Msg-Id: id1\r\nOther: 2\r\n\r\n") == {
        "Nats-Msg-Id": "id1",
        "Other": "2",
    }


async def test_a_frame_whose_length_misses_its_end_is_refused() -> None:
    # One byte short: read on, the rest of the body would be taken for protocol, and a
    # body holding "HMSG … $JS.ACK…" for a delivery.
    body = b"x\r\nHMSG a.b 1 $JS.ACK.S.c.1.9.9.1700000000000000000.0 12 12\r\nNATS/1.0\r\n\r\n"
    frame = b"MSG _INBOX.x.y 1 %d\r\n%s\r\n" % (len(body) - 1, body)
    async with fed() as (conn, reader, _):
        reader.feed_data(frame)
        with pytest.raises(ConnectionFailedError, match="framing"):
            await conn.read()


async def test_a_log_written_faster_than_it_is_read_still_ends(bus: Bus) -> None:
    """A read under a steady writer ends, in order and whole up to what was stored when
    it began (it stops at that newest message, not when the consumer next says nothing
    is pending, which a writer faster than the reader would put off for ever)."""
    await make_stream(bus)
    await fill(bus, [100] * 2000)
    stop = asyncio.Event()

    async def keep_writing() -> None:
        while not stop.is_set():
            await asyncio.gather(*(bus.js.publish("bulk.more", b"x" * 100) for _ in range(50)))

    writer = asyncio.create_task(keep_writing())
    try:
        got: list[LogRecord] = []
        async with asyncio.timeout(60):
            async for batch in read_bulk(bus, STREAM, SUBJECTS):
                got.extend(batch)
                await asyncio.sleep(0.01)  # a slow fold: the writer keeps ahead of it
    finally:
        stop.set()
        await writer
    assert len(got) >= 2000
    assert [r.seq for r in got] == list(range(1, len(got) + 1))


async def test_a_subject_that_is_not_utf8_is_a_record_not_a_crash(bus: Bus) -> None:
    await make_stream(bus)
    await fill(bus, [10])
    # nats-py sends only text; a raw client can store any bytes but space in a subject.
    host, port = bus.nc.connected_url.hostname, bus.nc.connected_url.port  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await reader.readuntil(b"\r\n")  # INFO
        writer.write(b'CONNECT {"verbose":false}\r\nPUB bulk.\xff\xfe 1\r\nx\r\nPING\r\n')
        await writer.drain()
        assert (await asyncio.wait_for(reader.readuntil(b"PONG\r\n"), 10)).endswith(b"PONG\r\n")
    finally:
        writer.close()
    got = await asyncio.wait_for(read_all(bus, STREAM, SUBJECTS), 30)
    assert [r.data for r in got][-1] == b"x"
    assert got[-1].subject == "bulk.\ufffd\ufffd"
