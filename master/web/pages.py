"""The status page's JSON: pages of agents, jobs and rollouts, read from the projection.

Pure functions of a :class:`~ledger.projection.Projection` and query parameters; every
list is paged (``offset``, ``limit`` capped at :data:`MAX_LIMIT`) so a fleet of 10,000
agents or a million jobs never goes to a browser at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any

from ledger.projection import Projection
from ledger.views import AgentView, JobView, RolloutView

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


def paging(query: Mapping[str, str]) -> tuple[int, int]:
    """``offset`` and ``limit`` from a query, bounded.

    Raises:
        ValueError: not whole numbers.
    """
    offset = int(query.get("offset") or 0)
    limit = int(query.get("limit") or DEFAULT_LIMIT)
    return max(0, offset), min(max(1, limit), MAX_LIMIT)


def agent_row(p: Projection, agent: AgentView) -> dict[str, Any]:
    """An agent as the page shows it: the view, plus its update state in the rollout of
    the target version."""
    doc = agent.to_json()
    doc["host"] = agent.host
    rollout = p.rollouts.get(p.target) if p.target else None
    if agent.version is not None and agent.version == p.target:
        doc["update"] = "current"
    elif rollout is not None:
        doc["update"] = rollout.agents.get(agent.id, "pending")
    else:
        doc["update"] = None
    return doc


def agents_page(p: Projection, query: Mapping[str, str]) -> dict[str, Any]:
    """Agents sorted by id; ``q`` matches a part of the id, ``online`` is ``1`` or ``0``."""
    offset, limit = paging(query)
    needle = query.get("q", "")
    online = query.get("online", "")
    rows: Iterable[AgentView] = sorted(p.agents.values(), key=lambda a: a.id)
    if needle:
        rows = (a for a in rows if needle in a.id)
    if online in ("0", "1"):
        rows = (a for a in rows if a.online == (online == "1"))
    matched = list(rows)
    return {
        "total": len(matched),
        "offset": offset,
        "items": [agent_row(p, a) for a in matched[offset : offset + limit]],
    }


def job_row(job: JobView) -> dict[str, Any]:
    return job.to_json()


def job_matches(job: JobView, query: Mapping[str, str]) -> bool:
    """Whether a job passes the page's filters (``agent``, ``status``, ``user``)."""
    if query.get("agent") and job.agent != query["agent"]:
        return False
    if query.get("status") and job.status != query["status"]:
        return False
    user = query.get("user")
    return not user or user in (job.submitted_by, job.run_as, job.effective_user)


def jobs_page(p: Projection, query: Mapping[str, str]) -> dict[str, Any]:
    """Jobs newest first (the order the log first named them), filtered, one page."""
    offset, limit = paging(query)
    matched = (j for j in reversed(p.jobs.values()) if job_matches(j, query))
    items = [job_row(j) for j in islice(matched, offset, offset + limit)]
    # Counting every match would walk the whole history on each page: say only
    # whether there is more.
    more = next(matched, None) is not None
    return {"offset": offset, "items": items, "more": more}


def rollout_row(p: Projection, rollout: RolloutView) -> dict[str, Any]:
    doc = rollout.to_json()
    counts: dict[str, int] = {}
    for state in rollout.agents.values():
        counts[state] = counts.get(state, 0) + 1
    doc["counts"] = counts
    doc["target"] = p.target == rollout.version
    doc["fleet"] = len(p.agents)
    return doc


def rollouts_page(p: Projection) -> dict[str, Any]:
    """Every rollout, the newest announced first."""
    rows = sorted(p.rollouts.values(), key=lambda r: r.announced_at or 0, reverse=True)
    return {"items": [rollout_row(p, r) for r in rows]}


def summary(p: Projection, *, ready: bool, configured: int) -> dict[str, Any]:
    """The header line: how many agents are online, the fold's position, the target."""
    online = sum(1 for a in p.agents.values() if a.online)
    return {
        "seq": p.seq,
        "events": p.events,
        "ready": ready,
        "agents": len(p.agents),
        "online": online,
        "configured": configured,
        "jobs": len(p.jobs),
        "target": p.target,
    }
