"""What the master answers on ``fleet.ctl.master.<op>``: queries of the projection and
the headless users' challenge (``auth-*``) and results (``job-output``), which they send
as ``fleet.ctl.master.<op>.<caller>`` (see :mod:`master.callers`).

Requests are answered one at a time, as they come; the serving stops with the master.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from bus import FleetError, decode_model, encode_model
from bus.codec import pack
from bus.serve import serve
from ledger.views import RolloutView
from master.auth import AuthFailed
from master.callers import AGENT_STATE, JOB_OUTPUT, agent_state, job_output, parse_control
from schemas import ControlReply, ControlRequest
from schemas.auth import AuthStart, AuthSubmit
from schemas.registry import summarize_validation_error

if TYPE_CHECKING:
    from ledger.projection import Projection
    from master.controller import Master

logger = logging.getLogger(__name__)

_STATE_REPLY_LIMIT = 800 * 1024
QUERIES = ("jobs", "job", "agents", "rollouts", "state", "status")


async def serve_queries(master: Master) -> None:
    """Answer control requests until the master stops acting (only the active master
    answers: a login's challenge and its proof must reach the same master)."""
    max_size = master.bus.settings.max_msg_size

    async def handle(subject: str, data: bytes) -> bytes:
        try:
            return encode_model(await answer(master, subject, data), max_size=max_size)
        except FleetError as exc:  # the answer is too large to send
            return encode_model(ControlReply(ok=False, error=str(exc)))

    service = await serve(master.bus, master.subjects.master_control_all, handle)
    try:
        # Headless users' requests name their caller: `<prefix>.ctl.master.<op>.<caller>`.
        by_caller = await serve(master.bus, master.subjects.master_control_by_all, handle)
        try:
            await master.off_duty.wait()
        finally:
            await by_caller.stop()
    finally:
        await service.stop()


async def answer(master: Master, subject: str, data: bytes) -> ControlReply:
    """The reply to one request; an error reply for anything that goes wrong."""
    try:
        op, caller = parse_control(master.subjects, subject)
        control = decode_model(data, ControlRequest) if data else ControlRequest()
        if op.startswith("auth-"):
            reply = await authenticate(master, op, control.args, caller)
        elif op == JOB_OUTPUT:
            reply = job_output(master.projection.jobs, caller, control.args)
        elif op == AGENT_STATE:
            reply = agent_state(master.projection.agents, control.args)
        else:
            reply = query(master, op, control.args)
        return ControlReply(ok=True, data=reply)
    except AuthFailed as exc:
        return ControlReply(ok=False, error=str(exc))
    except ValidationError as exc:
        return ControlReply(ok=False, error=f"bad request: {summarize_validation_error(exc)}")
    except (FleetError, ValueError) as exc:
        return ControlReply(ok=False, error=str(exc))


async def authenticate(
    master: Master, op: str, args: dict[str, Any], caller: str | None = None
) -> dict[str, Any]:
    """One step of a headless user's challenge."""
    auth = master.auth
    if op == "auth-salt":
        return {"salt": auth.salt(str(AuthStart.model_validate(args).user))}
    if op == "auth-start":
        return auth.start(AuthStart.model_validate(args)).model_dump()
    if op == "auth-submit":
        return (await auth.submit(AuthSubmit.model_validate(args), caller)).model_dump()
    raise ValueError(f"unknown operation {op!r}")


def query(master: Master, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """Answer a query from the projection (``fleet.ctl.master.<op>``).

    Raises:
        ValueError: an unknown query, or no such job.
    """
    p = master.projection
    if op == "jobs":
        return _jobs(p, args)
    if op == "job":
        job = p.jobs.get(str(args.get("job_id")))
        if job is None:
            raise ValueError(f"no job {args.get('job_id')}")
        return job.to_json(tail=True)
    if op == "agents":
        return {"agents": [a.to_json() for a in sorted(p.agents.values(), key=lambda a: a.id)]}
    if op == "rollouts":
        rollouts: list[RolloutView] = sorted(p.rollouts.values(), key=lambda r: r.version)
        return {"rollouts": [r.to_json() for r in rollouts]}
    if op == "state":
        state = p.to_state()
        chain = master.chain
        doc: dict[str, Any] = {"seq": p.seq, "chain": chain.hex, "count": chain.count}
        if len(pack(state, max_size=2**31)) <= _STATE_REPLY_LIMIT:
            doc["state"] = state
        return doc
    if op == "status":
        return {
            "seq": p.seq,
            "events": p.events,
            "unverified": master.unverified,
            "refused": dict(master.driver.counts),
            "config_hash": master.config.config_hash(),
            "ready": master.ready.is_set(),
            "name": master.config.name,
            "role": master.leadership.role,
        }
    raise ValueError(f"unknown query {op!r}; known: {', '.join(QUERIES)}")


def _jobs(p: Projection, args: dict[str, Any]) -> dict[str, Any]:
    jobs = sorted(p.jobs.values(), key=lambda j: j.job_id)
    if args.get("agent"):
        jobs = [j for j in jobs if j.agent == args["agent"]]
    if args.get("status"):
        jobs = [j for j in jobs if j.status == args["status"]]
    limit = int(args.get("limit") or 0)
    if limit:
        jobs = jobs[-limit:]
    return {
        "jobs": [j.to_json() for j in jobs],
        "agents": [a.to_json() for a in sorted(p.agents.values(), key=lambda a: a.id)],
        "seq": p.seq,
    }
