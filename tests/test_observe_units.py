"""The observability parts on their own: exposition, the HTTP server, JSON logs, the
status page's configuration rules and its pages."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from bus.errors import UsageError
from bus.httpd import HttpServer, Listen, Request, Response, text
from bus.logformat import JsonFormatter, log_ids
from bus.metrics import Counter, Family, Histogram, Registry, parse, sample
from master.config import MasterConfig, load_master_config

MASTER = str(Path(sys.executable).parent / "fleet-master")


# --- exposition -------------------------------------------------------------------------


async def test_exposition_round_trips_hostile_label_values() -> None:
    counter = Counter("fleet_x_total", "things\nwith a newline in the help")
    hostile = 'a"b\\c\nd} e="f'
    counter.inc(2, agent=hostile, status="ok")
    counter.inc(agent=hostile, status="ok")
    registry = Registry()

    async def collect() -> list[Family]:
        return [counter.family(), Family("fleet_y", "gauge", "y").add(1.5)]

    registry.add("test", collect)
    body = (await registry.render()).decode()
    assert "# TYPE fleet_x_total counter" in body
    assert "# HELP fleet_x_total things\\nwith a newline in the help" in body
    parsed = parse(body)
    assert sample(parsed, "fleet_x_total", agent=hostile, status="ok") == 3
    assert sample(parsed, "fleet_y") == 1.5
    assert sample(parsed, "fleet_scrape_collector_success", collector="test") == 1


async def test_a_failing_collector_is_reported_not_fatal() -> None:
    registry = Registry()

    async def broken() -> list[Family]:
        raise RuntimeError("boom")

    registry.add("broken", broken)
    parsed = parse((await registry.render()).decode())
    assert sample(parsed, "fleet_scrape_collector_success", collector="broken") == 0


def test_histogram_buckets_are_cumulative() -> None:
    histogram = Histogram("fleet_job_duration_seconds", "d", buckets=(1.0, 10.0))
    for value in (0.5, 2.0, 20.0):
        histogram.observe(value)
    parsed = parse(histogram.family().render())
    assert sample(parsed, "fleet_job_duration_seconds_bucket", le="1") == 1
    assert sample(parsed, "fleet_job_duration_seconds_bucket", le="10") == 2
    assert sample(parsed, "fleet_job_duration_seconds_bucket", le="+Inf") == 3
    assert sample(parsed, "fleet_job_duration_seconds_count") == 3
    assert sample(parsed, "fleet_job_duration_seconds_sum") == 22.5


# --- the HTTP server --------------------------------------------------------------------


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(10):
        body = await reader.read()
    writer.close()
    return body


async def test_http_server_serves_get_and_refuses_the_rest() -> None:
    async def handler(request: Request) -> Response:
        return text(200, f"path={request.path} q={request.query.get('a')}")

    async with HttpServer(Listen("127.0.0.1", 0), handler) as server:
        ok = await _raw(server.port, b"GET /x?a=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
        assert ok.endswith(b"path=/x q=1\n")
        post = await _raw(server.port, b"POST /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert post.startswith(b"HTTP/1.1 405 ")
        junk = await _raw(server.port, b"hello\r\n\r\n")
        assert junk.startswith(b"HTTP/1.1 400 ")
        huge = await _raw(server.port, b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n")
        assert huge.startswith(b"HTTP/1.1 431 ")


async def test_closing_the_server_ends_open_streams() -> None:
    started = asyncio.Event()

    async def forever() -> object:
        yield b"data: 1\n\n"
        started.set()
        await asyncio.Event().wait()

    async def handler(request: Request) -> Response:
        return Response(200, content_type="text/event-stream", stream=forever())  # type: ignore[arg-type]

    server = HttpServer(Listen("127.0.0.1", 0), handler)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /s HTTP/1.1\r\n\r\n")
    async with asyncio.timeout(10):
        await started.wait()
        await server.close()
        rest = await reader.read()  # EOF: the server closed the stream
    assert b"data: 1" in rest
    writer.close()


async def test_a_loopback_listener_answers_only_to_loopback_names() -> None:
    """DNS rebinding: a web page of evil.example re-resolved to 127.0.0.1 must not read a
    loopback listener; its requests carry ``Host: evil.example``."""

    async def handler(request: Request) -> Response:
        return text(200, "secret")

    async with HttpServer(Listen("127.0.0.1", 0), handler) as server:
        port = server.port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
            answer = await _raw(port, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 200 "), host
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
            answer = await _raw(port, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 421 "), host
            assert b"secret" not in answer


async def test_connections_beyond_the_limit_are_turned_away() -> None:
    release = asyncio.Event()

    async def held() -> object:
        yield b"data: 1\n\n"
        await release.wait()

    async def handler(request: Request) -> Response:
        return Response(200, content_type="text/event-stream", stream=held())  # type: ignore[arg-type]

    async with HttpServer(Listen("127.0.0.1", 0), handler, max_connections=2) as server:
        streams = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            async with asyncio.timeout(10):
                await reader.readuntil(b"data: 1\n\n")
            streams.append(writer)
        busy = await _raw(server.port, b"GET / HTTP/1.1\r\n\r\n")
        assert busy.startswith(b"HTTP/1.1 503 ")
        release.set()
        for writer in streams:
            writer.close()


def test_listen_addresses() -> None:
    assert Listen.parse(":8080") == Listen("127.0.0.1", 8080)
    assert Listen.parse("[::1]:9") == Listen("::1", 9)
    assert Listen.parse("127.0.0.1:9464").loopback
    assert Listen.parse("localhost:1").loopback
    assert not Listen.parse("0.0.0.0:8443").loopback
    assert not Listen.parse("status.example.org:443").loopback
    for bad in ("8080", "host:", "host:99999", "a:b"):
        with pytest.raises(UsageError):
            Listen.parse(bad)


# --- JSON logs --------------------------------------------------------------------------


def test_json_log_lines_carry_the_ids() -> None:
    record = logging.LogRecord(
        "agentd.runtime", logging.INFO, __file__, 1, "job %s ran\nok", ("j1",), None
    )
    with log_ids(agent="web-1", job="j1"):
        line = JsonFormatter().format(record)
    doc = json.loads(line)
    assert "\n" not in line
    assert doc["level"] == "INFO"
    assert doc["logger"] == "agentd.runtime"
    assert doc["message"] == "job j1 ran\nok"
    assert (doc["agent"], doc["job"]) == ("web-1", "j1")
    assert doc["time"].endswith("Z")
    record.event = "e1"  # as extra={"event": …} sets it
    assert json.loads(JsonFormatter().format(record))["event"] == "e1"
    assert "agent" not in json.loads(JsonFormatter().format(record))  # the block ended


# --- the status page's exposure rules ---------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:8443", "[::]:8443", "10.1.2.3:80", "web.example:443"])
def test_web_beyond_loopback_needs_tls_and_a_token(listen: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs TLS and a token"):
        MasterConfig(web_listen=listen)
    cert, key, token = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "token"
    with pytest.raises(ValueError, match="web_token_file"):
        MasterConfig(web_listen=listen, web_tls_cert=cert, web_tls_key=key)
    with pytest.raises(ValueError, match="web_tls_cert"):
        MasterConfig(web_listen=listen, web_token_file=token)
    MasterConfig(web_listen=listen, web_tls_cert=cert, web_tls_key=key, web_token_file=token)


def test_web_on_loopback_needs_neither() -> None:
    assert MasterConfig(web_listen=":8080").web_listen == ":8080"
    assert MasterConfig(web_listen="127.0.0.1:8080").web_listen == "127.0.0.1:8080"
    assert MasterConfig().web_listen == ""  # off unless configured


def test_master_refuses_to_start_with_an_unsafe_status_page(tmp_path: Path) -> None:
    config = tmp_path / "master.toml"
    config.write_text(f'web_listen = "0.0.0.0:8443"\ndata_dir = "{tmp_path / "data"}"\n')
    with pytest.raises(UsageError, match="beyond this machine"):
        load_master_config(config)
    done = subprocess.run(
        [MASTER, "run", "-c", str(config)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    assert "web_listen 0.0.0.0:8443 is reachable beyond this machine" in done.stderr
    assert "web_tls_cert, web_tls_key, web_token_file" in done.stderr
    assert not (tmp_path / "data" / "master.pid").exists()


# --- systemd's watchdog -----------------------------------------------------------------


async def test_watchdog_pings_systemd_until_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from bus.sdnotify import feed_watchdog

    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(feed_watchdog(stop))
    try:
        async with asyncio.timeout(10):
            pings = [await loop.sock_recv(sock, 64) for _ in range(3)]
        assert pings == [b"WATCHDOG=1"] * 3
        stop.set()
        async with asyncio.timeout(10):
            await task
    finally:
        task.cancel()
        sock.close()
    monkeypatch.delenv("WATCHDOG_USEC")
    await feed_watchdog(asyncio.Event())  # no watchdog asked for: returns at once


# --- the status page's pages ------------------------------------------------------------


def test_pages_of_a_large_fleet_are_pages() -> None:
    from ledger.projection import Projection
    from master.web.pages import MAX_LIMIT, agents_page, jobs_page

    p = Projection()
    for i in range(10_000):
        agent = p.agent(f"a{i:05d}")
        agent.online = i % 2 == 0
        agent.labels = {"role": "<b>web</b>"}
    for i in range(1_000):
        job = p.job(f"j{i:04d}", f"a{i % 3:05d}")
        job.status = "failed" if i % 10 == 0 else "succeeded"
        job.submitted_by = "alice" if i % 2 else "bob"
    page = agents_page(p, {"offset": "100", "limit": "50"})
    assert page["total"] == 10_000
    assert [a["id"] for a in page["items"]][:2] == ["a00100", "a00101"]
    assert len(page["items"]) == 50
    assert page["items"][0]["labels"] == {"role": "<b>web</b>"}  # data, escaped by the page
    assert agents_page(p, {"online": "0", "limit": "100000"})["total"] == 5_000
    assert len(agents_page(p, {"limit": "100000"})["items"]) == MAX_LIMIT
    newest = jobs_page(p, {"limit": "3"})
    assert [j["job_id"] for j in newest["items"]] == ["j0999", "j0998", "j0997"]
    assert newest["more"] is True
    failed = jobs_page(p, {"status": "failed", "agent": "a00000", "limit": "500"})
    assert {j["job_id"] for j in failed["items"]} == {f"j{i:04d}" for i in range(0, 1000, 30)}
    assert failed["more"] is False
    by_user = jobs_page(p, {"user": "alice", "limit": "500"})
    assert all(int(j["job_id"][1:]) % 2 for j in by_user["items"])
    with pytest.raises(ValueError, match="invalid literal"):
        jobs_page(p, {"offset": "x"})


def test_rollout_families_count_agents_by_state() -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from ledger.projection import Projection
    from master.metrics import MasterMetrics

    p = Projection()
    p.target = "1.1.0"
    rollout = p.rollout("1.1.0")
    rollout.agents = {"a": "applied", "b": "applied", "c": "failed", "d": "token"}
    rollout.failures, rollout.halted = 1, "2 failures"
    p.rollout("1.0.0").agents = {"a": "applied"}
    metrics = MasterMetrics(cast(Any, SimpleNamespace(projection=p)))
    text = "".join(f.render() for f in metrics._rollouts())
    s = parse(text)
    assert sample(s, "fleet_rollout_agents", version="1.1.0", state="applied") == 2
    assert sample(s, "fleet_rollout_agents", version="1.1.0", state="failed") == 1
    assert sample(s, "fleet_rollout_agents", version="1.1.0", state="downloaded") == 0
    assert sample(s, "fleet_rollout_failures_total", version="1.1.0") == 1
    assert sample(s, "fleet_rollout_halted", version="1.1.0") == 1
    assert sample(s, "fleet_rollout_halted", version="1.0.0") == 0
    assert sample(s, "fleet_rollout_target", version="1.1.0") == 1


def test_alert_rules_name_only_metrics_the_daemons_export() -> None:
    import re

    root = Path(__file__).parent.parent
    rules = (root / "ops" / "prometheus" / "alerts.yml").read_text()
    code = "".join(
        (root / p).read_text() for p in ("master/metrics.py", "agentd/metrics.py", "bus/metrics.py")
    )
    named = set(re.findall(r"\b(fleet_[a-z_]+)", rules))
    assert named
    assert {n for n in named if f'"{n}"' not in code} == set()
