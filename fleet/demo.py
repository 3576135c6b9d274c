"""``fleet demo``: the whole round trip on an embedded default, in seconds.

An embedded nats-server from the wheel, the fleet's streams, one real agent process in a
temporary directory, one real job: its output, its result, and its signed event trail.
Everything started here is stopped here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bus import (
    Bus,
    ConnectSettings,
    Signer,
    connect,
    decode_model,
    generate_seed,
    write_seed_file,
)
from bus.embedded import running_server
from bus.errors import EXIT_OK, FleetError
from bus.eventloop import run
from bus.log import read_log
from bus.request import control
from bus.streams import provision_fleet
from fleet.common import publish_signed
from fleet.follow import JobFollower, OutputPrinter
from ledger.driver import RecordDriver
from ledger.verify import signature_check
from ledger.views import iso
from schemas import Event, JobRequest, JobSubmitted, Presence, ScriptCommand, new_id

DEMO_SCRIPT = """\
echo "hello from fleetbus: job running on $(hostname) as $(id -un)"
echo "kernel: $(uname -sr)"
echo "this line goes to stderr" >&2
"""

_AGENT_START_S = 20.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="run one real job on an embedded server and local agent, then show its trail",
        description=__doc__,
    )
    demo.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="work in DIR and keep it (default: a temporary directory)",
    )
    demo.set_defaults(handler=demo_command)


def demo_command(args: argparse.Namespace) -> int:
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        return _demo(args.keep)
    with tempfile.TemporaryDirectory(prefix="fleet-demo-") as tmp:
        return _demo(Path(tmp))


def _say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


def _demo(work: Path) -> int:
    started = time.monotonic()
    _say(f"starting an embedded nats-server with JetStream in {work}")
    with running_server(work / "nats", name="fleet-demo") as server:
        operator_key = work / "operator.nk"
        write_seed_file(operator_key, generate_seed())
        # Agents run nothing without a trust file: this one trusts the demo's operator.
        trust = work / "trust.toml"
        trust.write_text(
            "[[grant]]\n"
            'name = "demo-operator"\n'
            f'key = "{Signer.from_file(operator_key).public_key}"\n'
            "commands = true\n"
            'modules = ["*"]\n'
            'control = ["status", "config-get", "log"]\n'
        )
        agent_key = work / "agent.nk"
        write_seed_file(agent_key, generate_seed())
        config = work / "agentd.toml"
        config.write_text(
            f'id = "demo"\nserver = "{server.url}"\ndata_dir = "{work / "agent"}"\n'
            f'nkey_file = "{agent_key}"\ntrust_file = "{trust}"\n'
            'heartbeat_s = 1.0\nlog_level = "WARNING"\n[labels]\nrole = "demo"\n'
        )
        master_key = work / "master.nk"
        write_seed_file(master_key, generate_seed())
        (work / "master.toml").write_text(
            f'server = "{server.url}"\ndata_dir = "{work / "master"}"\n'
            f'nkey_file = "{master_key}"\nlog_level = "WARNING"\n'
        )
        return run(_round_trip(server.url, config, operator_key, started), use_uvloop=False)


async def _round_trip(url: str, config: Path, operator_key: Path, started: float) -> int:
    settings = ConnectSettings(servers=[url], name="fleet demo")
    async with await connect(settings) as bus:
        report = await provision_fleet(bus)
        _say(f"created {len(report.created)} streams and buckets: {', '.join(report.created)}")
        master_config = config.with_name("master.toml")
        _say("starting the master (fleet-master) and an agent (fleet-agentd) as processes")
        master = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "master",
            "run",
            "-c",
            str(master_config),
            stdin=subprocess.DEVNULL,
        )
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentd", "-c", str(config), stdin=subprocess.DEVNULL
        )
        try:
            status = await control(bus, bus.subjects.master_control("status"), attempts=5)
            config_hash = status.data["config_hash"][:12]
            _say(f"master up (config hash {config_hash}), folding the log as it grows")
            presence = await _wait_for_agent(bus, "demo")
            p = presence
            _say(f"agent {p.agent} online: version {p.version}, host {p.host}, labels {p.labels}")
            signer = Signer.from_file(operator_key)
            job_id = new_id()
            _say(f"submitting job {job_id}, signed by operator key {signer.public_key[:12]}…")
            follower = await JobFollower(bus, "demo", job_id, OutputPrinter(prefix=False)).start()
            request = JobRequest(command=ScriptCommand(script=DEMO_SCRIPT), timeout_s=30)
            data = JobSubmitted(
                job_id=job_id, agent="demo", request=request, submitted_by="demo-operator"
            )
            await publish_signed(
                bus,
                data,
                "demo-operator",
                signer,
                bus.subjects.job_event("demo", job_id, "submitted"),
            )
            async with asyncio.timeout(30):
                await follower.done.wait()
            await follower.close()
            view = follower.view
            assert view is not None
            size = view.stdout_bytes + view.stderr_bytes
            if view.duration_s is None:
                _say(f"result: {view.status}: {view.reason}")
                return 1
            _say(
                f"result: {view.status}, exit code {view.exit_code}, "
                f"{view.duration_s:.3f}s on the agent, {size} bytes of output"
            )
            known = await _master_view(bus, job_id, follower.projection.seq)
            _say(
                f"the master's projection agrees: job {known['status']}, exit {known['exit_code']}"
            )
            await _print_trail(bus)
        finally:
            for proc in (agent, master):
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(15):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        elapsed = time.monotonic() - started
        _say(f"stopped the master, the agent and the server; the demo took {elapsed:.1f}s")
        return EXIT_OK if view.status == "succeeded" else 4


async def _master_view(bus: Bus, job_id: str, seq: int) -> dict[str, Any]:
    """The master's record of the job, once it has folded the log up to ``seq``."""
    async with asyncio.timeout(15):
        while True:
            status = await control(bus, bus.subjects.master_control("status"), attempts=3)
            if status.data["seq"] >= seq:
                break
            await asyncio.sleep(0.05)  # the master is a few events behind: ask again
    reply = await control(bus, bus.subjects.master_control("job"), {"job_id": job_id})
    return reply.data


async def _wait_for_agent(bus: Bus, agent: str) -> Presence:
    kv = await bus.kv(bus.subjects.presence_bucket)
    try:
        async with asyncio.timeout(_AGENT_START_S), kv.watch(agent) as updates:
            async for entry in updates:
                if entry is not None and not entry.deleted and entry.value:
                    return decode_model(entry.value, Presence)
    except TimeoutError:
        raise FleetError(f"the demo agent did not come online within {_AGENT_START_S:g}s") from None
    raise FleetError("presence watch ended before the agent came online")


async def _print_trail(bus: Bus) -> None:
    _say("the event trail, read back from the log and verified:")
    driver = RecordDriver(checks=[signature_check()])
    for record in await read_log(bus, bus.subjects.events_stream, bus.subjects.all_events):
        entry = driver.feed(record)
        envelope, event = entry.envelope, entry.event
        if envelope is None:
            print(f"  {record.seq:>3}  UNDECODABLE on {record.subject}")
            continue
        problems = "; ".join(p.text for p in entry.problems)
        verified = f"NOT VERIFIED: {problems}" if problems else "signed ✓"
        detail = ""
        if isinstance(event, Event) and event.type == "job.finished":
            detail = json.dumps(
                {k: getattr(event.data, k) for k in ("status", "exit_code", "duration_s")}
            )
        when, kind, source = iso(envelope.ts), envelope.type, envelope.source
        print(f"  {record.seq:>3}  {when}  {kind:<18} by {source:<14} {verified}  {detail}")
