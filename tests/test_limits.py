"""Limits: every event field that carries data has a maximum, and the master's memory is
bounded whatever one agent publishes."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from agents import FLEET, submit
from deployment import Deployment, run_cli
from pydantic import ValidationError

from schemas import AgentOnline, ArgvCommand, JobFinished, JobRequest, SettingsChanged, new_id
from schemas.events import MAX_OUTPUT_TAIL
from schemas.jobs import MAX_ARG_CHARS, MAX_ENV_VALUE, MAX_PATH_CHARS, MAX_SCRIPT_CHARS


def request(**kw: Any) -> dict[str, Any]:
    return {"command": {"kind": "argv", "argv": ["true"]}, **kw}


@pytest.mark.parametrize(
    "too_big",
    [
        request(command={"kind": "argv", "argv": ["x" * (MAX_ARG_CHARS + 1)]}),
        request(command={"kind": "script", "script": "x" * (MAX_SCRIPT_CHARS + 1)}),
        request(command={"kind": "module", "module": "m", "args": ["x"] * 4097}),
        request(env={"A": "x" * (MAX_ENV_VALUE + 1)}),
        request(env={"A" * 256: "x"}),
        request(cwd="/" + "x" * MAX_PATH_CHARS),
        request(labels={f"k{i}": "v" for i in range(65)}),
    ],
    ids=["arg", "script", "args", "env value", "env name", "cwd", "labels"],
)
def test_a_request_beyond_its_limits_is_refused(too_big: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        JobRequest.model_validate(too_big)


def test_event_fields_have_maxima() -> None:
    job = new_id()
    JobFinished(job_id=job, agent="a", status="failed", output_tail="x" * MAX_OUTPUT_TAIL)
    with pytest.raises(ValidationError):
        JobFinished(job_id=job, agent="a", status="failed", output_tail="x" * (MAX_OUTPUT_TAIL + 1))
    with pytest.raises(ValidationError):
        AgentOnline(agent="a", version="1", host="h", labels={f"k{i}": "v" for i in range(65)})
    with pytest.raises(ValidationError):
        SettingsChanged(key="update.x", value="x" * 1025, changed_by="alice")


# Only under the generated config: its max_payload and an operator's reading grants are
# what could cut such events short; the open server would run the very same code.
@pytest.mark.parametrize("deployment", ["generated"], indirect=True)
async def test_audit_and_replay_read_events_near_the_max_payload(deployment: Deployment) -> None:
    # 120 submissions of ~900 KB each: more than a server lets a reader fall behind by,
    # within the generated config's max_payload, read back by an operator.
    d = deployment
    big = ArgvCommand(argv=["echo", *(["x" * MAX_ARG_CHARS] * 7)])
    bus, jobs = await d.as_("tester"), set()
    for _ in range(120):
        jobs.add(await submit(bus, d["tester"].signer, "web-1", JobRequest(command=big)))

    async def fleet(*args: str) -> subprocess.CompletedProcess[str]:
        return await run_cli(FLEET, *args, env=d.env("tester"))

    listed = await fleet("audit", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {json.loads(line)["data"]["job_id"] for line in listed.stdout.splitlines()} == jobs
    assert "unexpected EOF" not in listed.stderr
    replayed = await fleet("replay", "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert {j["job_id"] for j in json.loads(replayed.stdout)["jobs"]} == jobs
    assert "unexpected EOF" not in replayed.stderr
