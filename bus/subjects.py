"""Subject builders, stream and bucket names: the bus's address book.

Pure functions and constants; nothing here talks to a server. Every token that goes into
a subject is validated, so no caller can build a subject that reaches another agent's
jobs through a ``.``, ``*`` or ``>`` hidden in an id.

Names follow ``../shared/design.md`` for the default prefix ``fleet``. Another prefix
gives a separate fleet on the same server: subjects ``<prefix>.…``, streams
``<PREFIX>_EVENTS``, buckets ``<prefix>-presence``.
"""

from __future__ import annotations

from dataclasses import dataclass

from bus.errors import InvalidTokenError
from schemas import ids

DEFAULT_PREFIX = "fleet"

# The job events an agent takes (live, and on catching up): the log is also its queue.
AGENT_CONSUMED_EVENTS = ("submitted", "cancel_requested")

JS_API = "$JS.API"
"""The JetStream API's subject prefix (no domain)."""


def js_api(domain: str | None = None) -> str:
    """The JetStream API's subject prefix: ``$JS.API``, or ``$JS.<domain>.API`` for a
    client that reaches the hub's JetStream through a leaf node (the leaf server runs
    none itself; the hub maps its domain's prefix onto its own API).

    Raises:
        InvalidTokenError: ``domain`` is not a safe subject token.
    """
    if domain is None:
        return JS_API
    return f"$JS.{check_token(domain, 'JetStream domain')}.API"


def in_domain(subject: str, domain: str | None) -> str:
    """``subject`` with its ``$JS.API`` prefix moved into ``domain`` (others unchanged)."""
    if domain is None or not (subject == JS_API or subject.startswith(JS_API + ".")):
        return subject
    return js_api(domain) + subject[len(JS_API) :]


def published_in_domain(subject: str, domain: str | None) -> str:
    """Where a client in ``domain`` publishes ``subject``: its API requests, and its KV
    writes too (they cross a leaf link only as ``$JS.<domain>.API.$KV.…``, which the hub
    maps back); everything else unchanged."""
    if domain is not None and subject.startswith("$KV."):
        return f"{js_api(domain)}.{subject}"
    return in_domain(subject, domain)


def consumer_create_subject(
    stream: str, consumer: str, filter_subject: str, *, domain: str | None = None
) -> str:
    """``$JS.API.CONSUMER.CREATE.<stream>.<consumer>.<filter>``: the filtered create.

    The server refuses a request on this subject whose config has another filter, so a
    permission on it pins both the consumer's name and its filter (one
    ``filter_subject`` only: a ``filter_subjects`` list is not checked, nats-server #6180).
    """
    check_token(stream, "stream")
    check_token(consumer, "consumer")
    return f"{js_api(domain)}.CONSUMER.CREATE.{stream}.{consumer}.{filter_subject}"


def _consumer_api(operation: str, stream: str, consumer: str, domain: str | None) -> str:
    stream, consumer = check_token(stream, "stream"), check_token(consumer, "consumer")
    return f"{js_api(domain)}.CONSUMER.{operation}.{stream}.{consumer}"


def consumer_next_subject(stream: str, consumer: str, *, domain: str | None = None) -> str:
    """``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``: a pull request."""
    return _consumer_api("MSG.NEXT", stream, consumer, domain)


def consumer_info_subject(stream: str, consumer: str, *, domain: str | None = None) -> str:
    """``$JS.API.CONSUMER.INFO.<stream>.<consumer>``."""
    return _consumer_api("INFO", stream, consumer, domain)


def consumer_delete_subject(stream: str, consumer: str, *, domain: str | None = None) -> str:
    """``$JS.API.CONSUMER.DELETE.<stream>.<consumer>`` (what no agent or user may send)."""
    return _consumer_api("DELETE", stream, consumer, domain)


CONTROL_REPLIES = "ctl"
"""The token under a principal's inbox where answers to its control requests come."""


def control_reply_filter(inbox: str, target: str) -> str:
    """``<inbox>.ctl.<target>.*``: the answers from ``target`` to the control requests of
    the principal whose replies come to ``inbox`` (what a site's leaf link may send back
    for its agents, and nothing else of others' inboxes)."""
    return f"{inbox}.{CONTROL_REPLIES}.{check_token(target, 'control target')}.*"


def check_token(value: object, what: str = "token") -> str:
    """Return ``value`` if it is a safe subject token.

    Raises:
        InvalidTokenError: it is empty, too long, not a string, or has a character
            outside ``[A-Za-z0-9_-]`` (so no ``.``, ``*``, ``>`` or whitespace).
    """
    problem = ids.token_problem(value, what)
    if problem is not None:
        raise InvalidTokenError(problem)
    assert isinstance(value, str)
    return value


def check_agent_id(value: object) -> str:
    """Return ``value`` if it is a valid, unreserved agent id, else raise InvalidTokenError."""
    problem = ids.agent_id_problem(value)
    if problem is not None:
        raise InvalidTokenError(problem)
    assert isinstance(value, str)
    return value


def version_token(version: str) -> str:
    """A release version as a subject token (``1.2.0`` → ``1_2_0``).

    Raises:
        InvalidTokenError: the version cannot be made into a safe token.
    """
    try:
        return ids.version_token(version)
    except ValueError as exc:
        raise InvalidTokenError(str(exc)) from None


@dataclass(frozen=True)
class Subjects:
    """Every subject, stream and bucket name for one fleet prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        check_token(self.prefix, "subject prefix")

    # --- streams and buckets -----------------------------------------------------------

    @property
    def events_stream(self) -> str:
        return f"{self.prefix.upper().replace('-', '_')}_EVENTS"

    @property
    def output_stream(self) -> str:
        return f"{self.prefix.upper().replace('-', '_')}_OUTPUT"

    @property
    def presence_bucket(self) -> str:
        return f"{self.prefix}-presence"

    @property
    def config_bucket(self) -> str:
        return f"{self.prefix}-config"

    @property
    def tokens_bucket(self) -> str:
        return f"{self.prefix}-tokens"

    @property
    def locks_bucket(self) -> str:
        return f"{self.prefix}-locks"

    MASTER_LEASE_KEY = "master.lease"
    """The active master's lease in :attr:`locks_bucket` (no one else may write
    ``master.>`` there)."""

    @staticmethod
    def master_presence_key(name: str) -> str:
        """``master.presence.<name>`` in :attr:`locks_bucket`: one master's heartbeat."""
        return f"master.presence.{check_token(name, 'master name')}"

    @property
    def bundles_bucket(self) -> str:
        return f"{self.prefix}-bundles"

    @property
    def snapshots_bucket(self) -> str:
        return f"{self.prefix}-snapshots"

    # --- JetStream's own names for KV buckets and object stores ---------------------------
    # Built here so no other module spells out ``KV_``, ``OBJ_``, ``$KV.`` or ``$O.``.

    @staticmethod
    def kv_stream(bucket: str) -> str:
        """The stream behind a KV bucket."""
        return f"KV_{bucket}"

    @staticmethod
    def kv_key(bucket: str, key: str) -> str:
        """The subject a KV key is stored on (``key`` may be a wildcard)."""
        return f"$KV.{bucket}.{key}"

    @staticmethod
    def object_stream(bucket: str) -> str:
        """The stream behind an object store."""
        return f"OBJ_{bucket}"

    @staticmethod
    def object_chunks(bucket: str, nuid: str) -> str:
        """The subject an object's chunks are stored on."""
        return f"$O.{bucket}.C.{nuid}"

    # --- the event log ------------------------------------------------------------------

    @property
    def all_events(self) -> str:
        """Filter for the whole event log."""
        return f"{self.prefix}.evt.>"

    def job_event(self, agent: str, job_id: str, event: str) -> str:
        """``<prefix>.evt.job.<agent>.<job_id>.<event>``."""
        return (
            f"{self.prefix}.evt.job.{check_agent_id(agent)}."
            f"{check_token(job_id, 'job id')}.{check_token(event, 'event name')}"
        )

    def job_events(self, agent: str = "*", job_id: str = "*") -> str:
        """Filter for job events; ``*`` (the default) for any agent or job."""
        a = agent if agent == "*" else check_agent_id(agent)
        j = job_id if job_id == "*" else check_token(job_id, "job id")
        return f"{self.prefix}.evt.job.{a}.{j}.*"

    def agent_job_filters(self, agent: str) -> list[str]:
        """What an agent subscribes to live: its own submissions and cancels."""
        check_agent_id(agent)
        return [f"{self.prefix}.evt.job.{agent}.*.{event}" for event in AGENT_CONSUMED_EVENTS]

    def agent_catchup(self, agent: str) -> tuple[str, str]:
        """``(consumer name, filter subject)`` of an agent's short-lived catch-up reader:
        every event of its own jobs."""
        return f"agent_{check_agent_id(agent)}_catchup", f"{self.prefix}.evt.job.{agent}.>"

    def agent_catchup_create(self, agent: str) -> str:
        """The one filtered-create subject an agent may use: its catch-up reader."""
        name, filter_subject = self.agent_catchup(agent)
        return consumer_create_subject(self.events_stream, name, filter_subject)

    def agent_event(self, agent: str, event: str) -> str:
        """``<prefix>.evt.agent.<agent>.<event>``."""
        return f"{self.prefix}.evt.agent.{check_agent_id(agent)}.{check_token(event, 'event name')}"

    def update_event(self, version: str, event: str, agent: str | None = None) -> str:
        """``<prefix>.evt.update.<version>[.<agent>].<event>`` (version dots become ``_``)."""
        middle = version_token(version)
        if agent is not None:
            middle = f"{middle}.{check_agent_id(agent)}"
        return f"{self.prefix}.evt.update.{middle}.{check_token(event, 'event name')}"

    def settings_event(self, event: str) -> str:
        """``<prefix>.evt.settings.<event>``: fleet-wide settings changes."""
        return f"{self.prefix}.evt.settings.{check_token(event, 'event name')}"

    def auth_event(self, event: str) -> str:
        """``<prefix>.evt.auth.<event>``: logins of headless users."""
        return f"{self.prefix}.evt.auth.{check_token(event, 'event name')}"

    def audit_event(self, event: str) -> str:
        """``<prefix>.evt.audit.<event>``: the master's checkpoints."""
        return f"{self.prefix}.evt.audit.{check_token(event, 'event name')}"

    # --- output, control ------------------------------------------------------------------

    @property
    def all_output(self) -> str:
        return f"{self.prefix}.out.>"

    def output(self, agent: str, job_id: str) -> str:
        """``<prefix>.out.<agent>.<job_id>``: one job's stdout/stderr chunks."""
        return f"{self.prefix}.out.{check_agent_id(agent)}.{check_token(job_id, 'job id')}"

    def control(self, agent: str, op: str) -> str:
        """``<prefix>.ctl.<agent>.<op>``: request/reply to one agent."""
        return f"{self.prefix}.ctl.{check_agent_id(agent)}.{check_token(op, 'operation')}"

    def control_all(self, agent: str) -> str:
        """Every control operation of one agent (what the agent subscribes to)."""
        return f"{self.prefix}.ctl.{check_agent_id(agent)}.*"

    @property
    def master_control_all(self) -> str:
        """Every query to the master (what the master subscribes to)."""
        return f"{self.prefix}.ctl.master.*"

    def master_control(self, op: str) -> str:
        """``<prefix>.ctl.master.<op>``: request/reply to the master."""
        return f"{self.prefix}.ctl.master.{check_token(op, 'operation')}"

    @property
    def master_control_by_all(self) -> str:
        """Every query to the master that names its caller (what the master subscribes to)."""
        return f"{self.prefix}.ctl.master.*.*"

    def master_control_by(self, op: str, caller: str) -> str:
        """``<prefix>.ctl.master.<op>.<caller>``: a request that names who sends it.

        The server's permissions let each headless principal publish only with its own
        name here, so the master knows the caller without trusting the request.
        """
        return f"{self.master_control(op)}.{check_token(caller, 'caller')}"

    # --- parsing ------------------------------------------------------------------------

    def parse_job_event(self, subject: str) -> tuple[str, str, str] | None:
        """``(agent, job_id, event)`` of a job-event subject, or None if it is not one."""
        parts = subject.split(".")
        if len(parts) != 6 or parts[0] != self.prefix or parts[1:3] != ["evt", "job"]:
            return None
        return parts[3], parts[4], parts[5]

    def parse_output(self, subject: str) -> tuple[str, str] | None:
        """``(agent, job_id)`` of an output subject, or None if it is not one."""
        parts = subject.split(".")
        if len(parts) != 4 or parts[0] != self.prefix or parts[1] != "out":
            return None
        return parts[2], parts[3]
