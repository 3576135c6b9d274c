"""The status page in headless Chromium, against real nats-server, master and agent
processes: a job run with ``fleet run`` appears and finishes live without a reload, and
output that holds markup is shown as text. Screenshots are kept as test artifacts
(``FLEET_ARTIFACTS`` or the test's tmp dir)."""

from __future__ import annotations

import asyncio
import http.client
import os
import secrets
import shutil
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agents import (
    FLEET,
    MASTER,
    AgentProcess,
    MasterProcess,
    finished,
    fleet_env,
    job_request,
    submit,
)
from natsserver import NatsServer
from observe import aget, listening_port
from tlsutil import make_ca_and_server_cert
from webdriver import Browser, find_browser

from bus import Bus, Signer, generate_seed, public_key_of, read_seed_file

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">&amp;'


def agent_key(agent: AgentProcess) -> str:
    return public_key_of(read_seed_file(agent.data_dir / "agent.nk"))


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    path = Path(os.environ.get("FLEET_ARTIFACTS") or tmp_path / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    find_browser()
    b = Browser(tmp_path / "chromedriver.log")
    try:
        yield b
    finally:
        b.quit()


@pytest.fixture
def page_master(tmp_path: Path, nats_server: NatsServer) -> Iterator[Callable[..., MasterProcess]]:
    made: list[MasterProcess] = []

    def make(**config: object) -> MasterProcess:
        m = MasterProcess(tmp_path, nats_server.url, **{"web_listen": "127.0.0.1:0", **config})
        made.append(m)
        return m

    yield make
    for m in made:
        try:
            m.stop()
        except Exception:
            m.kill()


async def test_page_is_safe_by_headers_and_refuses_writes(
    bus: Bus, page_master: Callable[..., MasterProcess]
) -> None:
    master = page_master().start()
    port = await listening_port(master.log, "status page")
    await master.wait_ready(bus)
    status, headers, body = await aget(f"http://127.0.0.1:{port}/")
    assert status == 200
    assert b'<script src="/app.js"' in body
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, headers, _ = await aget(f"http://127.0.0.1:{port}/api/jobs")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    # DNS rebinding: another site's name pointed at 127.0.0.1 reads nothing.
    status, _, body = await aget(f"http://127.0.0.1:{port}/api/jobs", {"Host": "rebound.example"})
    assert status == 421
    assert b"jobs" not in body
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /api/jobs HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    async with asyncio.timeout(10):
        assert (await reader.read()).startswith(b"HTTP/1.1 405 ")
    writer.close()


async def test_a_job_run_appears_and_finishes_live_and_markup_stays_text(
    nats_server: NatsServer,
    bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    page_master: Callable[..., MasterProcess],
    operator: tuple[Path, Signer],
    browser: Browser,
    artifacts: Path,
) -> None:
    key, signer = operator
    agents = [
        await agent_factory("web-1", labels={"role": "web"}).started(bus),
        await agent_factory("db-1", labels={"role": "db"}).started(bus),
    ]
    master = page_master(
        agents={a.id: {"public_key": agent_key(a), "labels": {"role": a.id[:-2]}} for a in agents},
        operators={"tester": {"public_key": signer.public_key}},
    ).start()
    port = await listening_port(master.log, "status page")
    await master.wait_ready(bus)
    for argv in (["true"], ["false"], ["uname", "-a"]):
        await finished(bus, "db-1", await submit(bus, signer, "db-1", job_request(argv)))

    url = f"http://127.0.0.1:{port}/"
    browser.open(url)
    browser.wait_for("return document.getElementById('live').className === 'on'")
    browser.wait_for("return document.querySelectorAll('#jobs tr').length === 3")
    browser.js("window.__sameDocument = 42")  # gone if the page reloaded

    # A job started with `fleet run` shows up while it runs and finishes in place.
    proc = await asyncio.create_subprocess_exec(
        FLEET,
        "run",
        "-a",
        "web-1",
        "--",
        "sh",
        "-c",
        "sleep 2; echo done",
        env=fleet_env(nats_server.url, key),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    running = await asyncio.to_thread(
        browser.wait_for,
        "const r = [...document.querySelectorAll('#jobs tr')].find("
        "  r => r.children[1].textContent === 'web-1');"
        "return r && r.children[2].textContent",
    )
    assert running in ("submitted", "running")
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert b"done" in out
    await asyncio.to_thread(
        browser.wait_for,
        "const r = [...document.querySelectorAll('#jobs tr')].find("
        "  r => r.children[1].textContent === 'web-1');"
        "return r && r.children[2].textContent === 'succeeded'",
    )
    assert browser.js("return window.__sameDocument") == 42
    browser.screenshot(artifacts / "status-page-jobs.png")

    # Output holding markup: shown as text, never run.
    job = await submit(bus, signer, "web-1", job_request(["printf", "%s", HOSTILE]))
    assert (await finished(bus, "web-1", job)).status == "succeeded"
    await asyncio.to_thread(
        browser.wait_for,
        "const r = document.querySelector(`#jobs tr[data-job='${arguments[0]}']`);"
        "return r && r.children[2].textContent === 'succeeded'",
        job,
    )
    browser.js(f"document.querySelector(\"#jobs tr[data-job='{job}'] a\").click()")
    shown = await asyncio.to_thread(
        browser.wait_for,
        "const o = document.getElementById('job-output'); return o && o.textContent",
    )
    assert HOSTILE in shown
    assert browser.js("return document.querySelectorAll('#job-output *:not(span)').length") == 0
    assert browser.js("return document.querySelectorAll('script').length") == 1  # app.js only
    assert browser.js("return window.__pwned === undefined")
    marks = browser.js(
        "return [...document.querySelectorAll('#job-events tr td:first-child span')]"
        ".map(s => s.textContent)"
    )
    assert marks
    assert set(marks) == {"✓"}
    browser.resize(1280, 1250)
    browser.screenshot(artifacts / "status-page-job.png")
    if os.environ.get("FLEET_README_SCREENSHOT"):  # docs/status-page.png is this one
        shutil.copy(artifacts / "status-page-job.png", os.environ["FLEET_README_SCREENSHOT"])

    # A job submitted under the tester's name with another key: marked, never hidden.
    forger = Signer(generate_seed())
    forged = await submit(bus, forger, "db-1", job_request(["true"]))
    await finished(bus, "db-1", forged)
    browser.js("document.querySelector('nav button[data-tab=audit]').click()")
    audit = await asyncio.to_thread(
        browser.wait_for,
        "const rows = [...document.querySelectorAll('#audit tr')];"
        "return rows.length > 3 && rows.map(r => [r.children[0].textContent,"
        "  r.children[3].textContent, r.children[4].textContent, r.children[6].textContent])",
    )
    submitted = [row for row in audit if row[1] == "job.submitted"]
    assert submitted[0][:3] == ["✗", "job.submitted", "tester"]
    assert "signed by" in submitted[0][3] or "not trusted" in submitted[0][3]
    assert all(row[0] == "✓" for row in submitted[1:])
    browser.screenshot(artifacts / "status-page-audit.png")

    # The agents tab: both agents with their labels, as text.
    browser.js("document.querySelector('nav button[data-tab=agents]').click()")
    rows = await asyncio.to_thread(
        browser.wait_for,
        "const rows = [...document.querySelectorAll('#agents tr')];"
        "return rows.length === 2 && rows.map(r => r.children[0].textContent + ' ' +"
        "  r.children[1].textContent + ' ' + r.children[4].textContent)",
    )
    assert rows == ["db-1 online role=db", "web-1 online role=web"]


def _https(port: int, ca: Path, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status, dict(response.getheaders())
    finally:
        connection.close()


async def test_beyond_loopback_the_page_needs_tls_and_its_token(
    tmp_path: Path, bus: Bus, page_master: Callable[..., MasterProcess]
) -> None:
    tls = make_ca_and_server_cert(tmp_path / "tls")
    token_file = tmp_path / "web.token"
    token = secrets.token_urlsafe(32)
    token_file.write_text(token + "\n")
    token_file.chmod(0o644)
    master = page_master(
        web_listen="0.0.0.0:0",
        web_tls_cert=str(tls.cert),
        web_tls_key=str(tls.key),
        web_token_file=str(token_file),
    )
    refused = await asyncio.create_subprocess_exec(
        MASTER, "run", "-c", str(master.config_path), stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(refused.communicate(), 60)
    assert refused.returncode == 2
    assert b"readable by others" in err

    token_file.chmod(0o600)
    master.start()
    port = await listening_port(master.log, "status page")
    await master.wait_ready(bus)

    def get(path: str, **headers: str) -> tuple[int, dict[str, str]]:
        return _https(port, tls.ca, path, headers)

    assert (await asyncio.to_thread(get, "/"))[0] == 401
    assert (await asyncio.to_thread(get, "/api/jobs"))[0] == 401
    assert (await asyncio.to_thread(get, "/api/stream"))[0] == 401
    wrong = {"Authorization": "Bearer " + "x" * len(token)}
    assert (await asyncio.to_thread(get, "/api/jobs", **wrong))[0] == 401
    assert (await asyncio.to_thread(get, "/?token=" + "x" * len(token)))[0] == 401
    right = {"Authorization": f"Bearer {token}"}
    assert (await asyncio.to_thread(get, "/api/jobs", **right))[0] == 200
    status, headers = await asyncio.to_thread(get, "/?token=" + token)
    assert status == 303
    assert headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    for attribute in ("HttpOnly", "Secure", "SameSite=Strict"):
        assert attribute in cookie
    status, _ = await asyncio.to_thread(get, "/api/summary", Cookie=cookie.split(";")[0])
    assert status == 200
    # Plain HTTP on the TLS port gets no page.
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        await asyncio.to_thread(_plain, port, "/api/jobs", right)


def _plain(port: int, path: str, headers: dict[str, str]) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()
