"""Requests to the master that name their caller: what headless users may ask.

A headless principal asks on ``<prefix>.ctl.master.<op>.<caller>`` and the generated
server permissions let it publish only with its own name as ``<caller>``, so the master
knows who asks without trusting anything in the request. Through it a headless user
logs in (throttled per user *and* caller, so one principal cannot lock another out) and
reads the result of its own jobs, never anyone else's: headless users have no consumers
and no direct reads of the log.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from bus import Subjects
from schemas.fields import AgentId, Token

JOB_OUTPUT = "job-output"
AGENT_STATE = "agent-state"


class JobRecord(Protocol):
    """What ``job-output`` needs of a job's view in the projection."""

    @property
    def submitted_by(self) -> str | None: ...

    @property
    def finished(self) -> bool: ...

    def to_json(self, *, tail: bool = False) -> dict[str, Any]: ...


class JobOutputRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    job_id: Token


class AgentStateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    agent: AgentId


class AgentRecord(Protocol):
    """What ``agent-state`` needs of an agent's view in the projection."""

    @property
    def unsupported(self) -> str | None: ...


def parse_control(subjects: Subjects, subject: str) -> tuple[str, str | None]:
    """``(op, caller)`` of a master control subject; caller None for the unnamed form.

    Raises:
        ValueError: not a master control subject.
    """
    head = subjects.master_control_all.removesuffix("*")
    if not subject.startswith(head):
        raise ValueError(f"not a master control subject: {subject!r}")
    op, _, caller = subject.removeprefix(head).partition(".")
    return op, (caller or None)


def job_output(
    jobs: Mapping[str, JobRecord], caller: str | None, args: dict[str, Any]
) -> dict[str, Any]:
    """The caller's own job: status, exit code, times and output tail.

    Raises:
        ValueError: no caller named, or no such job submitted by the caller (one message
            for both, so a caller learns nothing of other users' jobs).
        pydantic.ValidationError: a malformed request.
    """
    request = JobOutputRequest.model_validate(args)
    if caller is None:
        raise ValueError(
            f"{JOB_OUTPUT} must name its caller: <prefix>.ctl.master.{JOB_OUTPUT}.<you>"
        )
    job = jobs.get(request.job_id)
    if job is None or job.submitted_by != caller:
        raise ValueError(f"no job {request.job_id} of {caller}")
    doc = job.to_json(tail=True)
    doc["finished"] = job.finished
    return doc


def agent_state(agents: Mapping[str, AgentRecord], args: dict[str, Any]) -> dict[str, Any]:
    """Whether an agent may be sent a job: ``{"agent", "known", "unsupported"}``.

    What a headless user signing its own jobs (no master in the submission) asks before
    submitting, so that it too sends no job to an unsupported agent.

    Raises:
        pydantic.ValidationError: a malformed request.
    """
    request = AgentStateRequest.model_validate(args)
    view = agents.get(request.agent)
    return {
        "agent": request.agent,
        "known": view is not None,
        "unsupported": None if view is None else view.unsupported,
    }
