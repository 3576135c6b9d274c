"""The gate in front of the fold: which recorded events count, in log order.

An event counts when its signer may say it (:func:`ledger.policy.authorise`) and it fits
the log so far: a job event other than ``job.submitted`` is about a job that was
submitted, a job is submitted once, and a job ends once (a second ``job.finished`` is a
lie by one of the two writers, whoever wrote it). What does not count is never folded,
only counted and reported, so no one can grow the master's memory by publishing events
about jobs that do not exist, and the verifiers fail on a log that says two things.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from ledger.policy import Principals, Problem, Verdict, authorise, second_outcome
from schemas import Envelope


class JobState(Protocol):
    """What the gate needs to know of a folded job."""

    @property
    def status(self) -> str: ...

    @property
    def finished(self) -> bool: ...


class Gate:
    """Admits or refuses signed events one by one; :meth:`admitted` after each fold."""

    def __init__(self, principals: Principals) -> None:
        self.principals = principals

    def admit(self, envelope: Envelope, signer: str, jobs: Mapping[str, JobState]) -> Verdict:
        """May this event (whose signature by ``signer`` verified) be folded now?"""
        data = envelope.data
        verdict = authorise(
            type=envelope.type,
            subject=envelope.subject,
            source=envelope.source,
            signer=signer,
            data=data,
            principals=self.principals,
        )
        if not verdict.allowed or not envelope.type.startswith("job."):
            return verdict
        job_id = data.get("job_id")
        job = jobs.get(job_id) if isinstance(job_id, str) else None
        if envelope.type == "job.submitted":
            if job is not None:
                return Verdict(Problem("second submission", f"job {job_id} was submitted before"))
        elif job is None:
            text = f"{envelope.type} for job {job_id}, which was never submitted"
            return Verdict(Problem("unknown job", text))
        elif envelope.type == "job.finished" and job.finished:
            return Verdict(second_outcome(str(job_id), job.status, data.get("status")))
        return verdict

    def admitted(self, envelope: Envelope, verdict: Verdict) -> None:
        """Learn what a folded event teaches: an agent's key, from its registration or
        its first event."""
        if verdict.learns is not None:
            self.principals.learn_agent(*verdict.learns)
        if envelope.type == "agent.registered":
            agent, key = envelope.data.get("agent"), envelope.data.get("public_key")
            if isinstance(agent, str) and isinstance(key, str):
                self.principals.learn_agent(agent, key)

    def learn_from(self, agent_keys: Mapping[str, str | None]) -> None:
        """Take agents' keys from a projection restored from a snapshot."""
        for agent, key in agent_keys.items():
            if key is not None:
                self.principals.learn_agent(agent, key)
