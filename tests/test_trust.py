"""The agent's trust file and replay protection, with real agent processes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agents import AgentProcess, finished, job_events, job_request, submit, wait_event

from bus import Bus, Signer, generate_seed, sign_envelope
from bus.codec import encode_envelope
from bus.request import control
from schemas import (
    JobCancelRequested,
    JobRequest,
    JobSubmitted,
    ModuleCommand,
    make_envelope,
    new_id,
)

Agents = Callable[..., AgentProcess]


def trust_file(path: Path, *grants: str) -> Path:
    path.write_text("\n".join(grants))
    return path


def grant(key: str, **fields: object) -> str:
    lines = ["[[grant]]", f'key = "{key}"']
    for name, value in fields.items():
        if isinstance(value, bool):
            lines.append(f"{name} = {'true' if value else 'false'}")
        elif isinstance(value, list):
            lines.append(
                f"{name} = [{', '.join(repr(v).replace(chr(39), chr(34)) for v in value)}]"
            )
        else:
            lines.append(f'{name} = "{value}"')
    return "\n".join(lines) + "\n"


async def test_only_granted_keys_run_what_they_are_granted(
    bus: Bus, agent_factory: Agents, operator: tuple[Path, Signer], tmp_path: Path
) -> None:
    alice = operator[1]
    modules_only = Signer(generate_seed())
    master = Signer(generate_seed())
    trust = trust_file(
        tmp_path / "trust.toml",
        grant(alice.public_key, name="alice", commands=True, modules=["*"], users=["deploy"]),
        grant(modules_only.public_key, name="bob", modules=["hello"]),
        grant(master.public_key, name="master", modules=["hello"], on_behalf_of=["batch"]),
    )
    await agent_factory(
        "web-1", trust_file=str(trust), modules={"hello": {"argv": ["echo", "hi"]}}
    ).started(bus)

    async def outcome(
        signer: Signer | None, request: JobRequest, source: str = "tester", user: str | None = None
    ) -> tuple[str, str]:
        job = new_id()
        data = JobSubmitted(job_id=job, agent="web-1", request=request, submitted_by=user or source)
        envelope = make_envelope(
            data, source=source, subject=bus.subjects.job_event("web-1", job, "submitted")
        )
        await bus.publish_event(sign_envelope(envelope, signer) if signer else envelope)
        done = await finished(bus, "web-1", job)
        return done.status, done.reason or ""

    assert (await outcome(alice, job_request(["true"])))[0] == "succeeded"
    module = JobRequest(command=ModuleCommand(module="hello"))
    assert (await outcome(modules_only, module))[0] == "succeeded"

    refused = [
        (None, job_request(["true"]), "not signed"),
        (Signer(generate_seed()), job_request(["true"]), "is not trusted"),
        (modules_only, job_request(["true"]), "bob may run modules only"),
        (alice, job_request(["true"], run_as="root"), "alice may not run jobs as root"),
    ]
    for signer, request, why in refused:
        status, reason = await outcome(signer, request)
        assert status == "rejected"
        assert why in reason
    # Speaking for a headless user needs on_behalf_of in the grant: the master's rights
    # come from this file on the agent, never from the master itself.
    status, reason = await outcome(alice, module, user="batch")
    assert (status, "alice may not submit jobs on behalf of batch" in reason) == ("rejected", True)
    assert (await outcome(master, module, source="master", user="batch"))[0] == "succeeded"
    status, reason = await outcome(master, module, source="master", user="eve")
    assert (status, "on behalf of eve" in reason) == ("rejected", True)


async def test_forged_signature_is_rejected_and_nothing_runs(
    bus: Bus, agent_factory: Agents, operator: tuple[Path, Signer], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    await agent_factory("web-1").started(bus)
    job = new_id()
    data = JobSubmitted(
        job_id=job, agent="web-1", request=job_request(["touch", str(marker)]), submitted_by="x"
    )
    envelope = sign_envelope(
        make_envelope(data, source="x", subject=bus.subjects.job_event("web-1", job, "submitted")),
        operator[1],
    )
    forged = envelope.model_copy(update={"data": {**envelope.data, "submitted_by": "root"}})
    await bus.js.publish(forged.subject, encode_envelope(forged))
    done = await finished(bus, "web-1", job)
    assert done.status == "rejected"
    assert "bad signature" in (done.reason or "")
    assert not marker.exists()


async def test_replayed_requests_are_refused(
    bus: Bus, agent_factory: Agents, operator: tuple[Path, Signer], tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    await agent_factory("web-1", replay_window_s=5.0).started(bus)
    job = await submit(bus, operator[1], "web-1", job_request(script=f"echo run >> {runs}"))
    await finished(bus, "web-1", job)
    # The same signed bytes, stored again: the same job id is never run twice.
    [submitted] = [e for e in await job_events(bus, job) if e.type == "job.submitted"]
    await bus.js.publish(submitted.subject, encode_envelope(submitted))
    # A request signed long before it reaches the log: outside the validity window.
    old = new_id()
    data = JobSubmitted(
        job_id=old,
        agent="web-1",
        request=job_request(script=f"echo old >> {runs}"),
        submitted_by="tester",
    )
    stale = make_envelope(
        data,
        source="tester",
        subject=bus.subjects.job_event("web-1", old, "submitted"),
        ts=time.time_ns() - 60 * 10**9,
    )
    await bus.publish_event(sign_envelope(stale, operator[1]))
    done = await finished(bus, "web-1", old)
    assert done.status == "rejected"
    assert "outside the 5s validity window" in (done.reason or "")
    assert runs.read_text() == "run\n"
    status = await control(bus, bus.subjects.control("web-1", "status"), signer=operator[1])
    assert status.data["counters"]["duplicates_skipped"] == 1


@pytest.mark.slow
async def test_cancels_from_untrusted_keys_are_ignored(
    bus: Bus, agent_factory: Agents, operator: tuple[Path, Signer], tmp_path: Path
) -> None:
    trust = trust_file(tmp_path / "trust.toml", grant(operator[1].public_key, commands=True))
    await agent_factory("web-1", trust_file=str(trust)).started(bus)
    job = await submit(bus, operator[1], "web-1", job_request(["sleep", "30"]))
    await wait_event(bus, "web-1", job, "started")
    mallory = Signer(generate_seed())
    subject = bus.subjects.job_event("web-1", job, "cancel_requested")
    cancel = make_envelope(
        JobCancelRequested(job_id=job, agent="web-1", requested_by="mallory"),
        source="mallory",
        subject=subject,
    )
    await bus.publish_event(sign_envelope(cancel, mallory))
    # The trusted operator's cancel, published after, is the one that stops the job.
    real = make_envelope(
        JobCancelRequested(job_id=job, agent="web-1", requested_by="tester"),
        source="tester",
        subject=subject,
    )
    await bus.publish_event(sign_envelope(real, operator[1]))
    done = await finished(bus, "web-1", job)
    assert done.status == "cancelled"
    assert "cancelled by tester" in (done.reason or "")


def test_the_example_trust_file_is_valid() -> None:
    from agentd.trust import load_trust

    example = Path(__file__).resolve().parent.parent / "ops" / "trust.toml"
    assert load_trust(example).grant == []  # every grant is commented out


async def test_an_untrusted_cancel_waiting_in_the_log_does_not_stop_a_job(
    bus: Bus, agent_factory: Agents, operator: tuple[Path, Signer], tmp_path: Path
) -> None:
    trust = trust_file(tmp_path / "trust.toml", grant(operator[1].public_key, commands=True))
    agent = agent_factory("late", trust_file=str(trust))
    job = await submit(bus, operator[1], "late", job_request(["echo", "ran"]))
    subject = bus.subjects.job_event("late", job, "cancel_requested")
    mallory = Signer(generate_seed())
    data = JobCancelRequested(job_id=job, agent="late", requested_by="mallory")
    await bus.publish_event(
        sign_envelope(make_envelope(data, source="mallory", subject=subject), mallory)
    )
    await agent.started(bus)  # finds the job and, before starting it, the stranger's cancel
    done = await finished(bus, "late", job)
    assert done.status == "succeeded"
    assert done.output_tail == "ran\n"
