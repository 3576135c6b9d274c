"""One valid instance of every event type, for round trips and recorded logs."""

from __future__ import annotations

from bus import Subjects
from schemas import (
    AgentConfigChanged,
    AgentDeregistered,
    AgentOffline,
    AgentOnline,
    AgentRegistered,
    AgentUnsupported,
    ArgvCommand,
    AuditCheckpoint,
    AuthDenied,
    Envelope,
    EventData,
    JobCancelRequested,
    JobFinished,
    JobLateResult,
    JobRequest,
    JobStarted,
    JobSubmitted,
    SettingsChanged,
    UpdateAnnounced,
    UpdateApplied,
    UpdateFailed,
    UpdatePublished,
    UpdateRolledBack,
    UpdateRolloutHalted,
    UpdateTokenAcquired,
    UpdateTokenReleased,
    event_name,
    make_envelope,
    new_id,
)

PUB = "UCXNMSR5ZJQJH2XSTTJQIRMMCSRHKQR5LXDJQFGQ4RUEPT3QEWM2HH2L"
JOB = "01JB3Z0000000000000000000A"
AGENT = "web-01"
VERSION = "0.2.0"


def sample_data() -> list[EventData]:
    request = JobRequest(
        command=ArgvCommand(argv=["/bin/echo", "hello"]),
        env={"LANG": "C.UTF-8"},
        cwd="/tmp",
        run_as="deploy",
        timeout_s=30.0,
        expires_at=1_900_000_000_000_000_000,
        labels={"team": "ops"},
    )
    return [
        JobSubmitted(job_id=JOB, agent=AGENT, request=request, submitted_by="alice"),
        JobCancelRequested(job_id=JOB, agent=AGENT, requested_by="alice", reason="wrong host"),
        JobStarted(job_id=JOB, agent=AGENT, pid=4242, run_as="deploy", effective_user="deploy"),
        JobFinished(
            job_id=JOB,
            agent=AGENT,
            status="failed",
            exit_code=3,
            duration_s=1.5,
            stdout_bytes=10,
            stderr_bytes=2,
            output_tail="bye\n",
            reason="exit status 3",
        ),
        JobLateResult(job_id=JOB, agent=AGENT, status="succeeded", exit_code=0),
        AgentRegistered(agent=AGENT, public_key=PUB, labels={"role": "web"}),
        AgentDeregistered(agent=AGENT),
        AgentOnline(agent=AGENT, version=VERSION, host="web-01.example", labels={"role": "web"}),
        AgentOffline(agent=AGENT, reason="heartbeat expired", last_seen=1_800_000_000_000_000_000),
        AgentConfigChanged(agent=AGENT, keys=["max_jobs"], changed_by="alice"),
        AgentUnsupported(agent=AGENT, version="0.1.0", target=VERSION, reason="auto_update off"),
        UpdatePublished(
            version=VERSION,
            object_name="fleetbus-0.2.0",
            sha256="ab" * 32,
            size=1000,
            release_key=PUB,
        ),
        UpdateAnnounced(version=VERSION, canary=1, max_failures=2),
        UpdateTokenAcquired(version=VERSION, agent=AGENT, slot=0),
        UpdateTokenReleased(version=VERSION, agent=AGENT, slot=0),
        UpdateApplied(version=VERSION, agent=AGENT, previous="0.1.0"),
        UpdateFailed(version=VERSION, agent=AGENT, stage="verify", reason="bad digest"),
        UpdateRolledBack(version=VERSION, agent=AGENT, restored="0.1.0", reason="no heartbeat"),
        UpdateRolloutHalted(version=VERSION, failures=3, max_failures=2, reason="too many"),
        SettingsChanged(key="update.paused", value=True, changed_by="alice", version=VERSION),
        AuditCheckpoint(count=10, through_seq=12, last_id=JOB, chain="cd" * 32),
        AuthDenied(user="batch", reason="authentication failed"),
    ]


def subject_for(data: EventData, subjects: Subjects | None = None) -> str:
    """The subject an event of this data is published on, by the design's rules."""
    s = subjects or Subjects()
    name = event_name(data.TYPE)
    agent = getattr(data, "agent", None)
    if data.TYPE.startswith("job."):
        return s.job_event(agent, data.job_id, name)  # type: ignore[attr-defined]
    if data.TYPE.startswith("agent."):
        return s.agent_event(agent, name)  # type: ignore[arg-type]
    if data.TYPE.startswith("audit."):
        return s.audit_event(name)
    if data.TYPE.startswith("auth."):
        return s.auth_event(name)
    if data.TYPE.startswith("settings."):
        return s.settings_event(name)
    return s.update_event(data.version, name, agent)  # type: ignore[attr-defined]


def sample_envelope(data: EventData, source: str = "alice") -> Envelope:
    return make_envelope(data, source=source, subject=subject_for(data), event_id=new_id())
