"""Attacks on each other's consumers and output, against a server running the generated
config, with real agents, master, operator CLI and headless client."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import nats
import nats.js.errors
import pytest
from agents import FLEET, MASTER, finished
from deployment import Cast, Deployment, refused, run_cli
from natsserver import NatsServer
from samples import sample_envelope

from bus import (
    Bus,
    FleetError,
    PayloadTooLargeError,
    connect,
    read_seed_file,
    write_seed_file,
)
from bus.request import control
from bus.subjects import consumer_create_subject
from schemas import JobFinished, new_id

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HEADLESS = str(Path(sys.executable).parent / "fleet-headless")
MAX_PAYLOAD = 256 * 1024
PASSWORD = "correct horse battery staple"
EVENTS = "FLEET_EVENTS"
WHOLE_LOG = "fleet.evt.>"


async def api(bus: Bus, subject: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = await bus.nc.request(subject, json.dumps(body).encode(), timeout=5)
    doc: dict[str, Any] = json.loads(reply.data)
    return doc


def consumer_body(name: str, **config: object) -> dict[str, Any]:
    return {
        "stream_name": EVENTS,
        "config": {"name": name, "durable_name": name, "ack_policy": "explicit", **config},
    }


async def test_no_principal_reaches_another_s_consumers_or_output(
    server_factory: Callable[..., NatsServer],
    cast: Cast,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    d = Deployment(
        tmp_path,
        server_factory,
        cast,
        generated=True,
        max_payload=MAX_PAYLOAD,
        ops_init_cli=True,  # `fleet ops init` itself, as the admin: no other role may
        request=request,
    )
    async with d:
        url, admin = d.url, d.bus
        operator = d.env("tester")
        s_jobs, s_filter = ("agent_web-1_jobs", "fleet.evt.job.web-1.*.submitted")
        their_jobs = ("agent_web-2_jobs", "fleet.evt.job.web-2.*.submitted")
        trusted = [d[n].public_key for n in ("tester", "master", "batch")]  # mallory is not
        agents = [d.agent(a, trusted=trusted) for a in ("web-1", "web-2")]
        master = d.master()
        for agent in agents:
            await agent.started(admin)
        master.start()
        await master.wait_ready(admin)

        # The headless user runs a job and waits for it, all through its own grants.
        mine = await run_cli(
            HEADLESS, "-s", url, "-a", "nkey", "-u", "batch", "-p", str(d["batch"].key_file),
            "--agent", "web-1", "-t", "-1", "-v", "-c", "echo mine",
        )  # fmt: skip
        assert mine.returncode == 0, mine.stderr + master.log()[-2000:]
        my_job = mine.stderr.split("job ")[1].split()[0]
        # And with a password, logging in through the master as itself.
        added = await run_cli(
            MASTER, "user", "add", "batch", "--password-stdin", "-c", str(master.config_path),
            stdin=PASSWORD,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        users = json.loads((master.dir / "data" / "users.json").read_text())
        hashed = tmp_path / "batch.secret"
        write_seed_file(hashed, bcrypt.hashpw(PASSWORD.encode(), users["batch"]["salt"].encode()))
        challenged = await run_cli(
            HEADLESS, "-s", url, "-u", "batch", "-p", str(hashed), "--agent", "web-1",
            "-t", "-1", "-c", "true", env=d.env("batch"),
        )  # fmt: skip
        assert challenged.returncode == 0, challenged.stderr + master.log()[-2000:]
        theirs = await run_cli(
            FLEET, "run", "-a", "web-2", "--async", "--json", "--", "echo", "theirs",
            env=operator,
        )  # fmt: skip
        assert theirs.returncode == 0, theirs.stderr
        their_job = json.loads(theirs.stdout)["jobs"][0]["job_id"]
        await finished(admin, "web-2", their_job)

        # --- agent web-1 against its own consumer's filter and web-2's events --------
        async with await connect(d.settings("web-1")) as bus:
            pinned = consumer_create_subject(EVENTS, s_jobs, s_filter)
            # The one create subject it may use: the server holds the body to it.
            widened = await api(bus, pinned, consumer_body(s_jobs, filter_subject=WHOLE_LOG))
            assert widened["error"]["err_code"] == 10131, widened
            listed = await api(
                bus, pinned, consumer_body(s_jobs, filter_subjects=[WHOLE_LOG])
            )  # a filter list is not checked by permissions: the server refuses it here
            assert listed["error"]["err_code"] == 10137, listed
            await refused(
                bus,
                f"$JS.API.CONSUMER.CREATE.{EVENTS}",  # the name would come from the body
                f"$JS.API.CONSUMER.CREATE.{EVENTS}.{s_jobs}",
                f"$JS.API.CONSUMER.CREATE.{EVENTS}.{s_jobs}.{WHOLE_LOG}",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{EVENTS}.{s_jobs}",
                consumer_create_subject(EVENTS, *their_jobs),
                f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS}.{their_jobs[0]}",
                f"$JS.API.CONSUMER.DELETE.{EVENTS}.{their_jobs[0]}",
                f"$JS.API.DIRECT.GET.{EVENTS}.fleet.evt.job.web-2.{their_job}.finished",
            )
            # An oversized event is refused before it is sent, with a fleetbus error.
            huge = JobFinished.model_construct(
                job_id=my_job, agent="web-1", status="succeeded", output_tail="x" * MAX_PAYLOAD
            )
            with pytest.raises(PayloadTooLargeError, match="exceeds the limit"):
                await bus.publish_event(sample_envelope(huge, source="web-1"))
        # A client that skips that check is cut off by the server; nothing is stored.
        closed = asyncio.Event()

        async def on_closed() -> None:
            closed.set()

        raw = await nats.connect(
            url,
            nkeys_seed_str=read_seed_file(d["web-1"].key_file).decode(),
            inbox_prefix="_INBOX_web-1",
            allow_reconnect=False,
            closed_cb=on_closed,
        )
        raw._max_payload = 4 * MAX_PAYLOAD
        nowhere = admin.subjects.output("web-1", new_id())
        await raw.publish(nowhere, b"x" * (MAX_PAYLOAD + 1))
        await asyncio.wait_for(closed.wait(), 30)
        assert "maximum payload" in str(raw.last_error)
        with pytest.raises(nats.js.errors.NotFoundError):
            await admin.js.get_last_msg("FLEET_OUTPUT", nowhere)

        # --- the headless user against consumers and others' output -----------------
        async with await connect(d.settings("batch")) as bus:
            s = bus.subjects
            await refused(
                bus,
                f"$JS.API.CONSUMER.DELETE.{EVENTS}.{s_jobs}",
                f"$JS.API.CONSUMER.CREATE.{EVENTS}",
                f"$JS.API.CONSUMER.CREATE.{EVENTS}.peek.{WHOLE_LOG}",
                "$JS.API.CONSUMER.CREATE.FLEET_OUTPUT",
                f"$JS.API.DIRECT.GET.{EVENTS}.fleet.evt.job.web-2.{their_job}.finished",
                "$JS.API.STREAM.MSG.GET.FLEET_OUTPUT",
                s.master_control("job"),
                s.master_control_by("job-output", "mallory"),  # asking as someone else
            )
            own = await control(bus, s.master_control_by("job-output", "batch"), {"job_id": my_job})
            assert own.data["status"] == "succeeded"
            assert own.data["output_tail"] == "mine\n"
            with pytest.raises(FleetError, match=f"no job {their_job} of batch"):
                await control(
                    bus, s.master_control_by("job-output", "batch"), {"job_id": their_job}
                )
        async with await connect(d.settings("mallory")) as bus:
            with pytest.raises(FleetError, match=f"no job {my_job} of mallory"):
                await control(
                    bus,
                    bus.subjects.master_control_by("job-output", "mallory"),
                    {"job_id": my_job},
                )

        # --- the operator against the agents' consumers and the headless logins -------
        async with await connect(d.settings("tester")) as bus:
            await refused(
                bus,
                f"$JS.API.CONSUMER.DELETE.{EVENTS}.{s_jobs}",
                f"$JS.API.CONSUMER.CREATE.{EVENTS}",
                f"$JS.API.CONSUMER.CREATE.{EVENTS}.{s_jobs}.{WHOLE_LOG}",
                consumer_create_subject(EVENTS, s_jobs, s_filter),
                f"$JS.API.CONSUMER.DURABLE.CREATE.{EVENTS}.{s_jobs}",
                f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS}.{s_jobs}",
                f"$JS.ACK.{EVENTS}.{s_jobs}.1.1.1.1.1",
                bus.subjects.master_control_by("auth-submit", "batch"),
            )

        # Every attack left the agent's consumer as it was, and the agent working.
        info = await admin.js.consumer_info(EVENTS, s_jobs)
        assert info.config.filter_subject == s_filter
        again = await run_cli(FLEET, "run", "-a", "web-1", "--", "echo", "still", env=operator)
        assert again.returncode == 0, again.stderr
        assert again.stdout == "still\n"
        # Every operator command works within the operator's grants.
        for command in (
            ["agents", "--json"],
            ["jobs", "--json"],
            ["job", "show", their_job, "--json"],
            ["job", "logs", their_job],
            ["job", "wait", their_job],
            ["audit", "--json"],
            ["replay", "--json"],
            ["update", "status", "--json"],
        ):
            done = await run_cli(FLEET, *command, env=operator)
            assert done.returncode == 0, (command, done.stderr)
            assert "denied" not in done.stderr, (command, done.stderr)
        for agent in agents:
            assert "denied" not in agent.log(), agent.log()[-3000:]
        assert "denied" not in master.log(), master.log()[-3000:]
