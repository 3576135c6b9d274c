"""``fleet audit``: undecodable events are listed, never hidden; --follow streams."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

from agents import FLEET, fleet_env, job_request, submit
from natsserver import NatsServer

from bus import Bus, Signer


async def test_undecodable_events_are_listed_and_fail_verification(
    nats_server: NatsServer, bus: Bus, operator: tuple[Path, Signer]
) -> None:
    await submit(bus, operator[1], "web-1", job_request(["true"]))
    await bus.js.publish("fleet.evt.job.web-1.JUNK.submitted", b"\xc1 not msgpack")
    env = fleet_env(nats_server.url, operator[0])

    async def audit(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            [FLEET, "audit", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    listed = await audit()
    assert listed.returncode == 0
    assert "job.submitted" in listed.stdout
    assert "UNDECODABLE" in listed.stdout

    as_json = await audit("--json")
    docs = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert docs[0]["type"] == "job.submitted"
    assert docs[0]["source"] == "tester"
    assert docs[0]["verified"] is None  # not asked to verify
    assert "undecodable" in docs[1]

    verified = await audit("--verify")
    assert verified.returncode == 5
    assert "1 undecodable" in verified.stderr


async def test_follow_prints_new_events_as_they_come(
    nats_server: NatsServer, bus: Bus, operator: tuple[Path, Signer]
) -> None:
    follow = await asyncio.create_subprocess_exec(
        FLEET,
        "audit",
        "--follow",
        "--json",
        "--type",
        "job.*",
        env=fleet_env(nats_server.url, operator[0]),
        stdout=subprocess.PIPE,
    )
    try:
        assert follow.stdout is not None
        job = await submit(bus, operator[1], "web-1", job_request(["true"]))
        line = await asyncio.wait_for(follow.stdout.readline(), 30)
        doc = json.loads(line)
        assert doc["type"] == "job.submitted"
        assert doc["data"]["job_id"] == job
    finally:
        follow.terminate()
        await follow.wait()
