"""Who may say what: the one authorisation policy for recorded events. Pure: no I/O.

A valid signature says only that some key signed an event. This module decides whether
that key's owner may say *that*: a job event for agent X only from X's key (or from the
master for the outcomes the master owns), a submission only from an operator or headless
user speaking in their own name, registrations and checkpoints only from the master, and
always on the subject the data names. The master's fold, ``fleet replay`` and ``fleet
audit --verify`` all ask :func:`authorise`, so what the master folds, what a replay
rebuilds and what an audit accepts can never disagree.

Keys come from the master's configured registry (:class:`Principals`) and from the log
itself: ``agent.registered`` events (signed by the master) name an agent's key. An agent
that is not registered is known by the first key it signed with (trust on first use),
unless the registry is *strict* (``fleet audit --verify --trust``), where every signer
must be registered. A key known as one principal can never speak as another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from schemas.events import event_name
from schemas.ids import version_token

Role = Literal["master", "agent", "operator", "headless", "unregistered"]

MASTER_OUTCOMES: frozenset[str] = frozenset({"abandoned", "expired", "cancelled"})
"""The ``job.finished`` statuses the master may record: a job whose agent is gone
(abandoned), one that waited past its expiry, one cancelled before its agent took it."""


@dataclass(frozen=True, slots=True)
class Problem:
    """Why an event does not count. ``kind`` is a short stable label for summaries."""

    kind: str
    text: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.text}"


@dataclass(frozen=True, slots=True)
class Speaker:
    """Who signed an event, as far as the registry knows."""

    role: Role
    name: str

    def __str__(self) -> str:
        return self.name if self.role == "unregistered" else f"{self.role} {self.name}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The policy's answer: allowed (``problem`` is None) or not, and what it teaches.

    ``learns`` is an agent whose key this event introduces (trust on first use): the
    caller records it once the event is folded, e.g. with :meth:`Principals.learn_agent`.
    """

    problem: Problem | None = None
    learns: tuple[str, str] | None = None

    @property
    def allowed(self) -> bool:
        return self.problem is None


@dataclass
class Principals:
    """The registry of principals: who holds which key, by role.

    ``agents``, ``operators`` and ``headless`` map a principal id to its public key, as
    the master's config lists them; ``learned`` holds agents' keys taken from the log.
    """

    master_id: str = "master"
    master_keys: frozenset[str] = frozenset()
    agents: dict[str, str] = field(default_factory=dict)
    operators: dict[str, str] = field(default_factory=dict)
    headless: dict[str, str] = field(default_factory=dict)
    strict: bool = False
    """Every signer must be registered: no trust on first use."""
    prefix: str = "fleet"
    learned: dict[str, str] = field(default_factory=dict)
    previous: dict[str, Speaker] = field(default_factory=dict)
    """Keys principals held before a rotation (``previous_keys`` in the config): the
    events signed with them still verify as theirs."""

    def __post_init__(self) -> None:
        self._owners: dict[str, Speaker] = dict(self.previous)
        for agent, key in self.learned.items():
            self._owners[key] = Speaker("agent", agent)
        for role, table in (
            ("agent", self.agents),
            ("operator", self.operators),
            ("headless", self.headless),
        ):
            for name, key in table.items():
                self._owners[key] = Speaker(role, name)  # type: ignore[arg-type]
        for key in self.master_keys:
            self._owners[key] = Speaker("master", self.master_id)

    @property
    def registered(self) -> bool:
        """True when the configuration names any principal besides the master."""
        return bool(self.agents or self.operators or self.headless)

    def owner(self, key: str) -> Speaker | None:
        """The principal holding ``key``, if known."""
        return self._owners.get(key)

    def key_of(self, name: str) -> str | None:
        """The key principal ``name`` is known by, if any (configured keys first)."""
        for table in (self.agents, self.operators, self.headless, self.learned):
            if name in table:
                return table[name]
        if name == self.master_id and self.master_keys:
            return next(iter(sorted(self.master_keys)))
        return None

    def is_agent(self, name: str) -> bool:
        return name in self.agents or name in self.learned

    def learn_agent(self, agent: str, key: str) -> None:
        """Record an agent's key from the log (a registration, or its first event).

        A configured key always wins over what the log says.
        """
        if agent in self.agents:
            return
        old = self.learned.get(agent)
        if old is not None and self._owners.get(old) == Speaker("agent", agent):
            del self._owners[old]
        self.learned[agent] = key
        self._owners.setdefault(key, Speaker("agent", agent))


def authorise(
    *,
    type: str,
    subject: str,
    source: str,
    signer: str,
    data: dict[str, Any],
    principals: Principals,
) -> Verdict:
    """May ``signer`` publish this event? The signature itself must be checked before.

    Args:
        type: the envelope's event type (``job.finished``).
        subject: the subject it was stored on (equal to the signed one).
        source: the principal the envelope claims to come from.
        signer: the public key whose signature verified.
        data: the event's data, as stored.
        principals: the registry.
    """
    speaker = principals.owner(signer)
    if speaker is None:
        if principals.strict:
            text = f"{signer[:12]}… (claiming {source}) is not trusted: not in the registry"
            return _no("unknown signer", text)
        claimed = principals.key_of(source)
        if claimed is not None:
            return _no(
                "impersonation", f"claims {source}, signed by {signer[:12]}…, not {claimed[:12]}…"
            )
        speaker = Speaker("unregistered", source)
    elif speaker.name != source:
        return _no("impersonation", f"claims {source}, signed by {speaker}")
    problem = _subject_problem(type, subject, data, principals.prefix)
    if problem is None:
        problem = _role_problem(type, data, speaker, principals)
    if problem is not None:
        return Verdict(problem)
    agent = data.get("agent")
    if (
        speaker.role == "unregistered"
        and type in _AGENT_SPEAKS  # an agent's first words, not someone's about it
        and isinstance(agent, str)
        and speaker.name == agent
        and not principals.is_agent(agent)
    ):
        return Verdict(learns=(agent, signer))
    return Verdict()


def second_outcome(job_id: str, recorded_status: str | None, new_status: object) -> Problem:
    """The problem of a ``job.finished`` for a job that already has an outcome."""
    return Problem(
        "second outcome",
        f"job {job_id} already ended {recorded_status}; a second job.finished says {new_status}",
    )


def _no(kind: str, text: str) -> Verdict:
    return Verdict(Problem(kind, text))


def _subject_problem(type: str, subject: str, data: dict[str, Any], prefix: str) -> Problem | None:
    """The subject's tokens must say what the data says (agent, job, version, event)."""
    domain = type.split(".", 1)[0]
    head = f"{prefix}.evt.{domain}."
    if not subject.startswith(head):
        return Problem("subject", f"{type} stored on {subject}, outside {head}>")
    tokens = subject[len(head) :].split(".")
    if tokens[-1] != event_name(type):
        return Problem("subject", f"{type} stored on {subject}: the subject names another event")
    expected: list[tuple[str, object]]
    if domain == "job":
        expected = [("agent", data.get("agent")), ("job_id", data.get("job_id"))]
    elif domain == "agent":
        expected = [("agent", data.get("agent"))]
    elif domain == "update":
        try:
            version: object = version_token(str(data.get("version")))
        except ValueError:
            version = data.get("version")
        expected = [("version", version)]
        if len(tokens) == 3:
            expected.append(("agent", data.get("agent")))
    else:
        expected = []
    if len(tokens) != len(expected) + 1:
        return Problem("subject", f"{type} stored on {subject}: not the shape {domain} events have")
    for (name, value), token in zip(expected, tokens, strict=False):
        if token != value:
            return Problem("subject", f"{type} on {subject} says {name} {value!r} in its data")
    return None


_MASTER_ONLY = frozenset(
    {
        "agent.registered",
        "agent.deregistered",
        "update.rollout_halted",
        "audit.checkpoint",
        "auth.denied",
    }
)
_AGENT_ONLY = frozenset(
    {
        "job.started",
        "agent.online",
        "agent.config_changed",
        "agent.unsupported",
        "update.token_acquired",
        "update.token_released",
        "update.applied",
        "update.failed",
        "update.rolled_back",
    }
)
_AGENT_SPEAKS = _AGENT_ONLY | {"job.finished", "job.late_result", "agent.offline"}
"""What an agent says itself: the events whose first signer may introduce its key."""
_OPERATOR_ONLY = frozenset({"update.published", "update.announced"})
_BY_FIELD = {"job.submitted": "submitted_by", "job.cancel_requested": "requested_by"}


def _role_problem(
    type: str, data: dict[str, Any], who: Speaker, principals: Principals
) -> Problem | None:
    master = who.role == "master" or (
        who.role == "unregistered" and who.name == principals.master_id
    )
    agent = data.get("agent")
    own_agent = who.role in ("agent", "unregistered") and who.name == agent and not master
    operator = who.role == "operator" or (
        who.role == "unregistered" and not master and not principals.is_agent(who.name)
    )
    submitter = operator or who.role == "headless"

    def refuse(what: str) -> Problem:
        return Problem("not allowed", f"{who} may not publish {what}")

    if type in _MASTER_ONLY:
        return None if master else refuse(type)
    if type in _AGENT_ONLY:
        return None if own_agent else refuse(f"{type} for agent {agent}")
    if type in _OPERATOR_ONLY:
        return None if operator else refuse(type)
    if type in _BY_FIELD:
        by = data.get(_BY_FIELD[type])
        if master:
            return None  # on a headless user's behalf, after checking their proof
        if not submitter:
            return refuse(type)
        if by != who.name:
            return Problem("impersonation", f"{type} by {who} says {_BY_FIELD[type]}={by!r}")
        return None
    if type == "job.finished":
        status = data.get("status")
        if own_agent or (master and status in MASTER_OUTCOMES):
            return None
        return refuse(f"job.finished ({status}) for agent {agent}")
    if type in ("job.late_result", "agent.offline"):
        return None if own_agent or master else refuse(f"{type} for agent {agent}")
    if type == "settings.changed":
        if not (operator or master):
            return refuse(type)
        by = data.get("changed_by")
        return (
            None
            if by == who.name
            else Problem("impersonation", f"settings.changed by {who} says changed_by={by!r}")
        )
    # A type this code does not know (a newer producer's): its meaning, and so who may
    # say it, is unknown here; it is folded into nothing, only counted as not understood.
    # Its subject must still say what its data says.
    return None
