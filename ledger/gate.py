"""The gate in front of the fold: which recorded events count, in log order.

An event counts when its signature verifies, its signer may say it
(:func:`ledger.policy.authorise`) and it fits the log so far: a job event other than
``job.submitted`` is about a job that was submitted, to the agent it names; a job is
submitted once and ends once (a second ``job.finished`` is a lie by one of its two
writers, whoever wrote it); an agent's update events are about a release that was
published. What does not count is never folded, only counted and reported: no one can grow the
master's memory with events about jobs that do not exist, and the verifiers fail on a
log that says two things.

:func:`guard` puts the gate on a :class:`~ledger.driver.RecordDriver`; the master, ``fleet
replay`` and ``fleet audit --verify`` all do, with the same registry, so they agree.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from ledger.driver import Entry, Problem, RecordDriver
from ledger.policy import Principals, Verdict, authorise, second_outcome
from ledger.policy import Problem as PolicyProblem
from ledger.verify import signature_check
from ledger.views import JobView
from schemas import Envelope

_AGENT_UPDATE_EVENTS = frozenset(
    {
        "update.token_acquired",
        "update.token_released",
        "update.applied",
        "update.failed",
        "update.rolled_back",
    }
)


def admit(
    envelope: Envelope,
    signer: str,
    principals: Principals,
    jobs: Mapping[str, JobView],
    releases: Collection[str] = (),
) -> Verdict:
    """May this event (whose signature by ``signer`` verified) be folded after ``jobs``
    and the ``releases`` (versions) folded so far?"""
    data = envelope.data
    verdict = authorise(
        type=envelope.type,
        subject=envelope.subject,
        source=envelope.source,
        signer=signer,
        data=data,
        principals=principals,
    )
    if not verdict.allowed:
        return verdict
    if envelope.type in _AGENT_UPDATE_EVENTS:
        version = data.get("version")
        if version not in releases:
            text = f"{envelope.type} for release {version!r}, which was never published"
            return Verdict(PolicyProblem("unknown release", text))
        return verdict
    if not envelope.type.startswith("job."):
        return verdict
    job_id = data.get("job_id")
    job = jobs.get(job_id) if isinstance(job_id, str) else None
    if envelope.type == "job.submitted":
        if job is not None:
            return Verdict(PolicyProblem("second submission", f"job {job_id} was submitted before"))
    elif job is None:
        text = f"{envelope.type} for job {job_id}, which was never submitted"
        return Verdict(PolicyProblem("unknown job", text))
    elif job.agent != data.get("agent"):
        text = f"{envelope.type} names agent {data.get('agent')!r}; job {job_id} is {job.agent}'s"
        return Verdict(PolicyProblem("not allowed", text))
    elif envelope.type == "job.finished" and job.finished:
        return Verdict(second_outcome(str(job_id), job.status, data.get("status")))
    return verdict


class PolicyCheck:
    """A driver check applying :func:`admit` to every signed event, and learning agents'
    keys from the events it lets through (their registrations and first events)."""

    def __init__(self, driver: RecordDriver, principals: Principals) -> None:
        self.driver = driver
        self.principals = principals
        self.learn_from_projection()

    def learn_from_projection(self) -> None:
        """Take agents' keys from the driver's projection (after loading a snapshot)."""
        for agent, view in self.driver.projection.agents.items():
            if view.public_key is not None:
                self.principals.learn_agent(agent, view.public_key)

    def __call__(self, entry: Entry) -> Problem | None:
        envelope = entry.envelope
        if envelope is None or entry.problems or envelope.signer is None:
            return None  # the signature check has said what is wrong
        projection = self.driver.projection
        verdict = admit(
            envelope, envelope.signer, self.principals, projection.jobs, projection.rollouts
        )
        if verdict.problem is not None:
            where = f"{envelope.type} by {envelope.source}"
            return Problem(entry.seq, verdict.problem.kind, f"{where}: {verdict.problem.text}")
        if verdict.learns is not None:
            agent, key = verdict.learns
            self.principals.learn_agent(agent, key)
            # Kept in the projection too, so a snapshot remembers whose key it was.
            self.driver.projection.agent(agent).public_key = key
        if envelope.type == "agent.registered":
            registered, its_key = envelope.data.get("agent"), envelope.data.get("public_key")
            if isinstance(registered, str) and isinstance(its_key, str):
                self.principals.learn_agent(registered, its_key)
        return None


def guard(driver: RecordDriver, principals: Principals, *, signatures: bool = True) -> PolicyCheck:
    """Make ``driver`` check signatures (unless it already does) and the policy, and
    refuse (count, not fold) every event that fails."""
    if signatures:
        driver.add_check(signature_check())
    check = PolicyCheck(driver, principals)
    driver.add_check(check)
    driver.refuse = True
    return check
