"""What the log says about a job before it starts: an outcome already recorded (the master
expired or cancelled it while the agent was away) or a cancel.

If the log cannot be asked (an outage), :class:`NotNow` says so: the job stays queued
and is offered again later. Unknown is not failed.
"""

from __future__ import annotations

import asyncio
import logging

from agentd.context import AgentContext
from bus import BadMessageError, FleetError, SignatureError, decode_envelope, verify_envelope
from bus.codec import decode_data
from bus.log import last_message
from schemas import Envelope, Event, JobCancelRequested, JobFinished, JobSubmitted

logger = logging.getLogger(__name__)


class NotNow(Exception):
    """The job cannot be decided now (the bus is away): leave it queued."""


async def _last_event(ctx: AgentContext, job: JobSubmitted, name: str) -> Envelope | None:
    """The job's last event called ``name`` in the log, or None.

    Raises:
        NotNow: the log could not be read.
    """
    subject = ctx.bus.subjects.job_event(ctx.id, job.job_id, name)
    try:
        record = await last_message(ctx.bus, ctx.bus.subjects.events_stream, subject)
    except FleetError as exc:
        raise NotNow(f"cannot read {name} from the log: {exc}") from exc
    if record is None:
        return None
    try:
        envelope = decode_envelope(record.data)
        if envelope.subject != subject:
            raise BadMessageError(f"envelope subject {envelope.subject} is not {subject}")
    except BadMessageError as exc:
        logger.error("! job %s: unreadable %s in the log: %s", job.job_id, name, exc)
        return None
    return envelope


async def recorded_outcome(ctx: AgentContext, job: JobSubmitted) -> JobFinished | None:
    """The job's outcome if one is recorded already (by the master while we were away).

    Raises:
        NotNow: the log could not be read.
    """
    envelope = await _last_event(ctx, job, "finished")
    if envelope is None:
        return None
    try:
        event = decode_data(envelope)
    except BadMessageError:
        event = None
    if isinstance(event, Event) and isinstance(event.data, JobFinished):
        return event.data
    # Something holds the subject, so ours could never be recorded: do not run.
    return JobFinished(job_id=job.job_id, agent=ctx.id, status="abandoned", reason="unreadable")


async def cancel_before_start(ctx: AgentContext, job: JobSubmitted) -> JobCancelRequested | None:
    """A cancel of the job already in the log, if a trusted key asked for it.

    Raises:
        NotNow: the log could not be read.
    """
    envelope = await _last_event(ctx, job, "cancel_requested")
    if envelope is None:
        return None
    try:
        event = decode_data(envelope)
    except BadMessageError:
        return None
    if ctx.trust is not None:
        # The same rule as a live cancel: only a trusted key may stop a job.
        try:
            signer = verify_envelope(envelope, subject=envelope.subject)
        except SignatureError:
            return None
        if ctx.trust.for_key(signer) is None:
            logger.warning("! cancel of job %s ignored: not signed by a trusted key", job.job_id)
            return None
    return (
        event.data
        if isinstance(event, Event) and isinstance(event.data, JobCancelRequested)
        else None
    )


async def before_start(
    ctx: AgentContext, job: JobSubmitted
) -> tuple[JobFinished | None, JobCancelRequested | None]:
    """The job's recorded outcome and a trusted cancel of it, both asked at once: two reads
    of the log on every job's path to its start, each a round trip to the server.

    Raises:
        NotNow: the log could not be read.
    """
    outcome, cancel = await asyncio.gather(
        recorded_outcome(ctx, job), cancel_before_start(ctx, job), return_exceptions=True
    )
    # Both have ended by now (nothing left running). A recorded outcome settles the job
    # whatever became of the other read, as when the cancel was only asked after it.
    if isinstance(outcome, BaseException):
        raise outcome
    if outcome is not None:
        return outcome, None
    if isinstance(cancel, BaseException):
        raise cancel
    return None, cancel
