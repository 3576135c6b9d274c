"""Real agent processes for end-to-end tests, and helpers to submit and await jobs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nats.errors
from nats.js import api

from bus import Bus, Signer, decode_envelope, decode_event, decode_model, sign_envelope
from bus.log import read_log
from schemas import (
    ArgvCommand,
    Envelope,
    Event,
    JobFinished,
    JobRequest,
    JobSubmitted,
    Presence,
    ScriptCommand,
    make_envelope,
    new_id,
)

FLEET = str(Path(sys.executable).parent / "fleet")
AGENTD = str(Path(sys.executable).parent / "fleet-agentd")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return f'"{value}"'


class _Daemon:
    """A daemon process a test started: stopped with SIGTERM, or killed, by pid."""

    proc: subprocess.Popen[bytes] | None = None
    log_path: Path

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()  # never leave a process running behind a failed test
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _spawn(self, argv: list[str]) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()


def permissive_grant(key: str, name: str = "tester") -> str:
    """A trust-file grant of everything a key can be granted (tests that are not about
    the trust file), except running as root."""
    return (
        f'[[grant]]\nname = "{name}"\nkey = "{key}"\ncommands = true\nmodules = ["*"]\n'
        'users = ["*"]\npassword_users = ["*"]\non_behalf_of = ["*"]\nenv = ["*"]\n'
        'control = ["*"]\n'
    )


class AgentProcess(_Daemon):
    """One ``fleet-agentd`` process with its own config and data directory.

    Without a ``trust_file`` in ``config``, it gets one granting ``trusted`` keys
    everything (:func:`permissive_grant`); with neither, it runs no job.
    """

    def __init__(
        self,
        base: Path,
        url: str,
        agent_id: str,
        *,
        trusted: Sequence[str] = (),
        **config: Any,  # type: ignore[assignment]
    ) -> None:
        self.id = agent_id
        self.dir = base / f"agent-{agent_id}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.dir / "data"
        self.config_path = self.dir / "agentd.toml"
        self.log_path = self.dir / "agentd.log"
        if trusted and "trust_file" not in config:
            trust = self.dir / "trust.toml"
            trust.write_text(
                "\n".join(permissive_grant(k, f"key{n}") for n, k in enumerate(trusted))
            )
            config["trust_file"] = str(trust)
        settings: dict[str, Any] = {
            "id": agent_id,
            "server": url,
            "data_dir": str(self.data_dir),
            "heartbeat_s": 0.5,
            "job_kill_grace_s": 1.0,
            "shutdown_grace_s": 5.0,
            "log_level": "DEBUG",
            **config,
        }
        self.write_config(settings)
        self.started_ns = 0

    def write_config(self, settings: dict[str, Any]) -> None:
        tables = {k: v for k, v in settings.items() if isinstance(v, dict)}
        lines = [f"{k} = {toml_value(v)}" for k, v in settings.items() if k not in tables]
        for name, table in tables.items():
            lines.append(f"[{name}]")
            for key, value in table.items():
                if isinstance(value, dict):
                    lines.append(f"[{name}.{key}]")
                    lines += [f"{k} = {toml_value(v)}" for k, v in value.items()]
                else:
                    lines.append(f"{key} = {toml_value(value)}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> AgentProcess:
        self.started_ns = time.time_ns()
        self._spawn([AGENTD, "-c", str(self.config_path)])
        return self

    async def wait_online(self, bus: Bus, timeout: float = 20.0) -> Presence:
        """Until this incarnation's heartbeat is in the presence bucket."""
        try:
            return await wait_presence(
                bus, self.id, lambda p: p.started_at >= self.started_ns, timeout
            )
        except AssertionError:
            raise AssertionError(f"agent {self.id} not online:\n{self.log()}") from None

    async def started(self, bus: Bus, timeout: float = 20.0) -> AgentProcess:
        self.start()
        await self.wait_online(bus, timeout)
        return self


async def wait_presence(
    bus: Bus, agent: str, check: Callable[[Presence], bool], timeout: float = 60.0
) -> Presence:
    """Until the agent's heartbeat satisfies ``check``."""
    kv = await bus.key_value(bus.subjects.presence_bucket)
    watcher = await kv.watch(agent)
    last: Presence | None = None
    try:
        async with asyncio.timeout(timeout):
            async for entry in watcher:
                if entry is None or not entry.value:
                    continue
                last = decode_model(entry.value, Presence)
                if check(last):
                    return last
    except TimeoutError:
        raise AssertionError(f"{agent}: presence never matched; last: {last}") from None
    finally:
        await watcher.stop()
    raise AssertionError("watch ended")


def job_request(argv: list[str] | None = None, script: str | None = None, **kw: Any) -> JobRequest:
    command = ScriptCommand(script=script) if script is not None else ArgvCommand(argv=argv or [])
    return JobRequest(command=command, **kw)


async def submit(
    bus: Bus, signer: Signer, agent: str, request: JobRequest, job_id: str | None = None
) -> str:
    """Publish a signed job.submitted; returns the job id."""
    job_id = job_id or new_id()
    data = JobSubmitted(job_id=job_id, agent=agent, request=request, submitted_by="tester")
    subject = bus.subjects.job_event(agent, job_id, "submitted")
    envelope = make_envelope(data, source="tester", subject=subject)
    await bus.publish_event(sign_envelope(envelope, signer))
    return job_id


async def wait_event(
    bus: Bus, agent: str, job_id: str, name: str, timeout: float = 30.0
) -> Event[Any]:
    """The job's first event named ``name`` (waiting for it if need be)."""
    return await first_event(bus, bus.subjects.job_event(agent, job_id, name), timeout)


async def first_event(bus: Bus, subject: str, timeout: float = 30.0) -> Event[Any]:
    """The log's first event on ``subject`` (waiting for it if need be)."""
    return await nth_event(bus, subject, 1, timeout)


async def nth_event(bus: Bus, subject: str, n: int, timeout: float = 30.0) -> Event[Any]:
    """The log's ``n``-th event on ``subject`` (waiting for it if need be)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                sub = await bus.js.subscribe(
                    subject,
                    stream=bus.subjects.events_stream,
                    ordered_consumer=True,
                    deliver_policy=api.DeliverPolicy.ALL,
                )
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                # Just after a server restart: JetStream answers once it has recovered.
                await asyncio.sleep(0.2)
        try:
            for _ in range(n):
                msg = await sub.next_msg(timeout=timeout)
        finally:
            await sub.unsubscribe()
    event = decode_event(msg.data)
    assert isinstance(event, Event)
    return event


async def finished(bus: Bus, agent: str, job_id: str, timeout: float = 30.0) -> JobFinished:
    event = await wait_event(bus, agent, job_id, "finished", timeout)
    assert isinstance(event.data, JobFinished)
    return event.data


async def job_events(bus: Bus, job_id: str) -> list[Envelope]:
    records = await read_log(bus, bus.subjects.events_stream, bus.subjects.job_events("*", job_id))
    return [decode_envelope(r.data) for r in records]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def stop_all(agents: list[Any], request: Any) -> None:
    """Stop (or kill) every agent a test made; print their logs if the test failed."""
    for agent in agents:
        try:
            agent.stop(timeout=30)
        except Exception:
            agent.kill()
    failed = getattr(getattr(request, "node", None), "rep_call", None)
    if failed is not None and failed.failed:
        for agent in agents:
            print(f"--- log of agent {agent.id} ---\n{agent.log()[-8000:]}")


def fleet_env(url: str, key: Path) -> dict[str, str]:
    return {**os.environ, "FLEET_SERVER": url, "FLEET_NKEY": str(key), "FLEET_USER": "tester"}


MASTER = str(Path(sys.executable).parent / "fleet-master")


class MasterProcess(_Daemon):
    """One ``fleet-master run`` process with its own config."""

    def __init__(self, base: Path, url: str, *, home: str = "master", **config: Any) -> None:
        """``home``: the directory under ``base`` (several masters need one each)."""
        self.dir = base / home
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "master.toml"
        self.log_path = self.dir / "master.log"
        self.settings: dict[str, Any] = {
            "server": url,
            "data_dir": str(self.dir / "data"),
            "log_level": "DEBUG",
            # Tests run many masters at once: none may take the default port.
            "metrics_listen": "127.0.0.1:0",
            **config,
        }
        self.write_config()

    def write_config(self) -> None:
        AgentProcess.write_config(self, self.settings)  # type: ignore[arg-type]

    def start(self) -> MasterProcess:
        self._spawn([MASTER, "run", "-c", str(self.config_path)])
        return self

    async def wait_ready(self, bus: Bus, timeout: float = 30.0) -> dict[str, Any]:
        from bus.request import control

        async with asyncio.timeout(timeout):
            while True:
                reply = await control(bus, bus.subjects.master_control("status"), attempts=5)
                if reply.data["ready"]:
                    return reply.data
                await asyncio.sleep(0.1)  # catching up with the log: ask again
