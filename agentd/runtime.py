"""The agent runtime: one agent identity's jobs, presence and control, in one event loop.

The daemon (:mod:`agentd.daemon`) is a thin shell around this object; tests and
benchmarks host many runtimes in one process through the same code, each with its own
identity, consumers, presence key and journal.

The log is the queue. Two durable consumers read this agent's subjects: submissions,
fetched only while a slot is free (``max_jobs``), and cancel requests, fetched always,
so a cancel reaches a running job even when every slot is busy.

A job is journaled before its message is acknowledged, so a crash can neither lose it
nor run it twice (see :mod:`agentd.journal`). Every job that reaches the agent ends in
exactly one ``job.finished`` with a named status, including the ones it refuses.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from agentd.command import CommandRejected, ResolvedCommand, resolve_command
from agentd.config import AgentConfig
from agentd.contain import kill_job_leftovers, remove_stale_cgroups
from agentd.journal import Journal
from agentd.logbuffer import recent_log_lines
from agentd.output import JobOutput
from agentd.process import base_environment, kill_leftovers, spawn, start_ticks
from agentd.runas import Identity, PamServiceMissing, lookup, pam_allows
from agentd.supervise import Outcome, StopRequest, supervise
from agentd.trust import grants_user, load_trust, refusal
from bus import (
    BadMessageError,
    Bus,
    FleetError,
    SignatureError,
    Signer,
    UsageError,
    decode_envelope,
    decode_model,
    encode_model,
    sign_envelope,
    verify_envelope,
)
from bus.codec import decode_data
from bus.command import fleetbus_version
from bus.tasks import wait_any
from schemas import (
    AgentConfigChanged,
    AgentOffline,
    AgentOnline,
    ControlReply,
    ControlRequest,
    Envelope,
    Event,
    EventData,
    JobCancelRequested,
    JobFinished,
    JobStarted,
    JobSubmitted,
    Presence,
    UnknownEvent,
    event_name,
    make_envelope,
)
from schemas.ids import id_time_ns
from schemas.presence import AgentState
from updater.agent import Updater, UpdaterOptions

logger = logging.getLogger(__name__)

_FETCH_WAIT_S = 5.0
_ACK_WAIT_S = 60.0
_ERROR_PAUSE_S = 1.0
_SETTABLE = frozenset(
    {
        "max_jobs",
        "labels",
        "log_level",
        "heartbeat_s",
        "job_kill_grace_s",
        "shutdown_grace_s",
        "max_output_bytes",
        "auto_update",
    }
)


@dataclass
class _RunningJob:
    job_id: str
    stop: StopRequest = field(default_factory=StopRequest)
    task: asyncio.Task[None] | None = None


@dataclass
class Counters:
    """What this agent has done since it started, for ``status``."""

    started: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    malformed: int = 0
    duplicates_skipped: int = 0


def effective_user() -> str:
    """The name of the user the agent (and so, in ``self`` mode, every job) runs as."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


class AgentRuntime:
    """One agent. ``await run()`` until :meth:`stop`; ``ready`` is set once it consumes."""

    def __init__(
        self,
        bus: Bus,
        config: AgentConfig,
        signer: Signer,
        *,
        on_restart: Callable[[], None] | None = None,
        install_root: Path | None = None,
        version: str | None = None,
    ) -> None:
        self.bus = bus
        self.config = config
        self.signer = signer
        self.id = config.id
        self._installed_version = version
        self.version = config.version or version or fleetbus_version()
        self.host = socket.gethostname()
        self.counters = Counters()
        self.ready = asyncio.Event()
        self._on_restart = on_restart
        self._subjects = bus.subjects
        self._journal = Journal(config.journal_path)
        self._jobs: dict[str, _RunningJob] = {}
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._started_at = time.time_ns()
        self._user = effective_user()
        self._tg: asyncio.TaskGroup | None = None
        if config.run_as_mode == "root" and os.geteuid() != 0:
            raise UsageError("run_as_mode = root needs the agent to run as root")
        self._trust = load_trust(config.trust_file) if config.trust_file else None
        if self._trust is None:
            logger.warning("no trust_file: this agent runs any request, signed or not")
        self._update_state: AgentState = "ready"
        self._update_text: str | None = None
        self._presence_changed = asyncio.Event()
        self._install_root = install_root
        self.updater = Updater(
            bus,
            self.id,
            self._updater_options(),
            emit=self._emit,
            show=self._show_update,
            restart=on_restart,
        )

    def _updater_options(self) -> UpdaterOptions:
        return UpdaterOptions(
            version=self.version,
            stamped=self.config.version is not None,
            auto_update=self.config.auto_update,
            release_keys=frozenset(self.config.release_keys),
            data_dir=self.config.data_dir,
            root=self._install_root,
            rate_bytes_s=self.config.update_rate_bytes_s,
        )

    def _show_update(self, state: AgentState, text: str | None) -> None:
        if (state, text) != (self._update_state, self._update_text):
            self._update_state, self._update_text = state, text
            self._presence_changed.set()

    # --- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop taking jobs; running ones get ``shutdown_grace_s`` before being abandoned.

        Safe to call from a signal handler.
        """
        self._stopping.set()
        self._slot_free.set()

    def reload(self, config: AgentConfig) -> None:
        """Apply a new configuration. Identity, server and storage need a restart."""
        fixed = ("id", "server", "data_dir", "nkey_file", "prefix")
        ignored = [k for k in fixed if getattr(config, k) != getattr(self.config, k)]
        if ignored:
            logger.warning("reload: %s change only on restart", ", ".join(ignored))
            config = config.model_copy(update={k: getattr(self.config, k) for k in ignored})
        self._trust = load_trust(config.trust_file) if config.trust_file else None
        self.config = config
        self.version = config.version or self._installed_version or fleetbus_version()
        self.updater.options = self._updater_options()
        self.updater.nudge()
        self._slot_free.set()  # max_jobs may have grown
        logger.info("configuration reloaded")

    async def run(self) -> None:
        """Serve until :meth:`stop`, then drain, withdraw presence and return."""
        await self._recover()
        jobs_sub, cancels_sub = await self._subscribe()
        control = await self.bus.nc.subscribe(
            self._subjects.control_all(self.id), cb=self._on_control
        )
        await self._emit(
            AgentOnline(
                agent=self.id, version=self.version, host=self.host, labels=self.config.labels
            )
        )
        logger.info(
            "→ agent %s ready (version %s, max_jobs %d)",
            self.id,
            self.version,
            self.config.max_jobs,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                heartbeat = tg.create_task(self._heartbeat(), name="heartbeat")
                consumers = [
                    tg.create_task(self._consume_jobs(jobs_sub), name="jobs"),
                    tg.create_task(self._consume_cancels(cancels_sub), name="cancels"),
                    tg.create_task(self._run_updater(), name="updater"),
                ]
                self.ready.set()
                await self._stopping.wait()
                self.updater.stop()
                for task in consumers:
                    task.cancel()
                await self._drain_jobs()
                self._idle.set()
                await heartbeat
        finally:
            await self._withdraw(jobs_sub, cancels_sub, control)
        logger.info("← agent %s stopped", self.id)

    async def _run_updater(self) -> None:
        """The updater, kept from taking the agent down with it: a bug there stops
        updates for a while, never jobs."""
        while not self._stopping.is_set():
            try:
                await self.updater.run()
                return
            except Exception:
                logger.exception("! the updater failed; updates resume in 30s")
                self._show_update("ready", "the updater failed; see the agent's log")
            await wait_any(self._stopping, timeout=30)

    async def _withdraw(self, *subs: Any) -> None:
        for sub in subs:
            try:
                await sub.unsubscribe()
            except (nats.errors.Error, OSError) as exc:
                logger.debug("unsubscribe: %s", exc)
        try:
            kv = await self.bus.key_value(self._subjects.presence_bucket)
            await kv.delete(self.id)
            await self._emit(
                AgentOffline(agent=self.id, reason="agent shut down", last_seen=time.time_ns())
            )
        except (FleetError, nats.errors.Error, OSError) as exc:
            logger.warning("could not withdraw presence: %s", exc)
        self._journal.close()

    async def _drain_jobs(self) -> None:
        running = [j.task for j in self._jobs.values() if j.task is not None]
        if not running:
            return
        logger.info(
            "waiting up to %gs for %d running jobs", self.config.shutdown_grace_s, len(running)
        )
        _, pending = await asyncio.wait(running, timeout=self.config.shutdown_grace_s)
        for job in list(self._jobs.values()):
            job.stop.set("abandon", "the agent shut down before the job finished")
        if pending:
            await asyncio.wait(pending)

    # --- consuming ------------------------------------------------------------------------

    async def _subscribe(self) -> tuple[Any, Any]:
        stream = self._subjects.events_stream
        subs = []
        for kind, subject in zip(
            ("jobs", "cancels"), self._subjects.agent_job_filters(self.id), strict=True
        ):
            durable = f"agent_{self.id}_{kind}"
            await self.bus.js.add_consumer(
                stream,
                api.ConsumerConfig(
                    durable_name=durable,
                    filter_subject=subject,
                    deliver_policy=api.DeliverPolicy.ALL,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=_ACK_WAIT_S,
                    max_deliver=-1,
                    max_ack_pending=1000,
                ),
            )
            subs.append(await self.bus.js.pull_subscribe_bind(durable=durable, stream=stream))
        return subs[0], subs[1]

    async def _fetch(self, sub: Any, batch: int) -> list[Msg]:
        """Fetch up to ``batch`` messages; an empty list on timeout or when stopping."""
        fetch = asyncio.create_task(sub.fetch(batch=batch, timeout=_FETCH_WAIT_S))
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not fetch.done():
                return []
            msgs: list[Msg] = fetch.result()
            return msgs
        except nats.errors.TimeoutError:
            return []
        finally:
            for task in (fetch, stopping):
                task.cancel()
            await asyncio.gather(fetch, stopping, return_exceptions=True)

    async def _consume_jobs(self, sub: Any) -> None:
        while not self._stopping.is_set():
            while len(self._jobs) >= self.config.max_jobs and not self._stopping.is_set():
                self._slot_free.clear()
                await self._slot_free.wait()
            if self._stopping.is_set():
                return
            try:
                for msg in await self._fetch(sub, self.config.max_jobs - len(self._jobs)):
                    await self._accept(msg)
            except (FleetError, nats.errors.Error, OSError) as exc:
                # The bus is down or busy; the consumer keeps our place. Try again soon.
                logger.warning("fetching jobs: %s", exc or repr(exc))
                await asyncio.sleep(_ERROR_PAUSE_S)

    async def _consume_cancels(self, sub: Any) -> None:
        while not self._stopping.is_set():
            try:
                for msg in await self._fetch(sub, 16):
                    await self._cancel(msg)
            except (FleetError, nats.errors.Error, OSError) as exc:
                logger.warning("fetching cancels: %s", exc or repr(exc))
                await asyncio.sleep(_ERROR_PAUSE_S)

    async def _decode(
        self, msg: Msg, expected: type[EventData]
    ) -> tuple[str, Event[Any] | UnknownEvent] | None:
        """Decode a message on this agent's job subjects, or report and drop it.

        Returns ``(job_id, event)``, or None when the message was malformed (it was
        terminated, so it is never redelivered, and counted).
        """
        parsed = self._subjects.parse_job_event(msg.subject)
        job_id = parsed[1] if parsed else "?"
        try:
            envelope = decode_envelope(msg.data, self.bus.settings.max_msg_size)
            if envelope.subject != msg.subject:
                raise BadMessageError(f"envelope subject {envelope.subject} is not {msg.subject}")
            if envelope.type != expected.TYPE:
                raise BadMessageError(f"{envelope.type} on a {expected.TYPE} subject")
        except BadMessageError as exc:
            await self._malformed(msg, str(exc))
            return None
        if envelope.signed:
            try:
                verify_envelope(envelope, subject=msg.subject)
            except SignatureError as exc:
                if (
                    expected is JobSubmitted
                    and _valid_job_id(job_id)
                    and not self._journal.knows(job_id)
                ):
                    await self._finish(job_id, "rejected", reason=f"bad signature: {exc}")
                    await _ack(msg)
                else:
                    await self._malformed(msg, str(exc))
                return None
        try:
            decoded = decode_data(envelope)
        except BadMessageError as exc:
            logger.error("! job %s: %s", job_id, exc)
            if expected is JobSubmitted and _valid_job_id(job_id):
                await self._finish(job_id, "rejected", reason=f"invalid job request: {exc}")
                await msg.ack()
                return None
            await self._malformed(msg, str(exc))
            return None
        data = decoded.data if isinstance(decoded, Event) else None
        if isinstance(data, JobSubmitted | JobCancelRequested) and (
            data.job_id != job_id or data.agent != self.id
        ):
            await self._malformed(msg, "job id or agent in the data do not match the subject")
            return None
        return job_id, decoded

    async def _malformed(self, msg: Msg, reason: str) -> None:
        self.counters.malformed += 1
        seq = msg.metadata.sequence.stream if msg.reply else "?"
        logger.error(
            "! malformed message on %s (stream seq %s): %s; dropped", msg.subject, seq, reason
        )
        try:
            await msg.term()
        except nats.errors.Error as exc:
            logger.debug("term: %s", exc)

    async def _accept(self, msg: Msg) -> None:
        result = await self._decode(msg, JobSubmitted)
        if result is None:
            return
        job_id, decoded = result
        if self._journal.knows(job_id) or job_id in self._jobs:
            self.counters.duplicates_skipped += 1
            logger.warning(
                "! job %s was already taken here (a replay?); not running it again", job_id
            )
            await msg.ack()
            return
        if isinstance(decoded, UnknownEvent):
            await self._finish(job_id, "rejected", reason=decoded.describe())
            await msg.ack()
            return
        stored_ns = (
            int(msg.metadata.timestamp.timestamp() * 1e9) if msg.metadata.timestamp else None
        )
        signed_ns = decoded.envelope.ts
        if stored_ns is not None and abs(stored_ns - signed_ns) > self.config.replay_window_s * 1e9:
            lag = (stored_ns - signed_ns) / 1e9
            await self._finish(
                job_id,
                "rejected",
                reason=f"stored {lag:.0f}s after it was signed, outside the "
                f"{self.config.replay_window_s:g}s validity window (a replayed request?)",
            )
            await msg.ack()
            return
        assert isinstance(decoded.data, JobSubmitted)
        running = _RunningJob(job_id)
        self._jobs[job_id] = running
        assert self._tg is not None
        running.task = self._tg.create_task(
            self._run_job(msg, decoded.envelope, decoded.data, running)
        )

    async def _cancel(self, msg: Msg) -> None:
        result = await self._decode(msg, JobCancelRequested)
        if result is None:
            return
        job_id, decoded = result
        running = self._jobs.get(job_id)
        signer = decoded.envelope.signer
        if self._trust is not None and (signer is None or self._trust.for_key(signer) is None):
            logger.warning("! cancel of job %s ignored: not signed by a trusted key", job_id)
            await msg.ack()
            return
        if running is not None and isinstance(decoded, Event):
            data = decoded.data
            detail = f"cancelled by {data.requested_by}" + (
                f": {data.reason}" if data.reason else ""
            )
            logger.info("cancel job %s (%s)", job_id, detail)
            running.stop.set("cancel", detail)
        # A cancel for a job not running here: finished already, or not fetched yet (the
        # submission path looks for it before starting).
        await msg.ack()

    # --- running a job --------------------------------------------------------------------

    async def _cancelled_before_start(self, job: JobSubmitted) -> JobCancelRequested | None:
        subject = self._subjects.job_event(self.id, job.job_id, "cancel_requested")
        try:
            raw = await self.bus.js.get_last_msg(self._subjects.events_stream, subject, direct=True)
        except nats.js.errors.NotFoundError:
            return None
        try:
            envelope = decode_envelope(raw.data or b"")
            event = decode_data(envelope)
        except BadMessageError:
            return None
        if self._trust is not None:
            # The same rule as a live cancel: only a trusted key may stop a job.
            try:
                signer = verify_envelope(envelope, subject=subject)
            except SignatureError:
                return None
            if self._trust.for_key(signer) is None:
                logger.warning(
                    "! cancel of job %s ignored: not signed by a trusted key", job.job_id
                )
                return None
        return (
            event.data
            if isinstance(event, Event) and isinstance(event.data, JobCancelRequested)
            else None
        )

    async def _run_job(
        self, msg: Msg, envelope: Envelope, job: JobSubmitted, running: _RunningJob
    ) -> None:
        command: ResolvedCommand | None = None
        try:
            prepared = await self._prepare(msg, envelope, job)
            if prepared is not None:
                command, identity = prepared
                await self._execute(msg, job, command, running, identity)
        except Exception:  # a bug must end this job, not the agent
            logger.exception("! job %s failed inside the agent", job.job_id)
            await self._finish(job.job_id, "failed", reason="internal error in the agent")
            await _ack(msg)
        finally:
            if command is not None:
                command.cleanup()
            self._jobs.pop(job.job_id, None)
            self._slot_free.set()

    async def _prepare(
        self, msg: Msg, envelope: Envelope, job: JobSubmitted
    ) -> tuple[ResolvedCommand, Identity | None] | None:
        """Everything that can end a job before it starts. None if it ended."""
        request = job.request
        if self._trust is not None:
            reason = refusal(self._trust, envelope, job)
            if reason is not None:
                await self._finish(job.job_id, "rejected", reason=reason)
                await msg.ack()
                return None
        if request.expires_at is not None and time.time_ns() > request.expires_at:
            waited = (time.time_ns() - id_time_ns(job.job_id)) / 1e9
            await self._finish(
                job.job_id,
                "expired",
                reason=f"not started before its expiry (waited {waited:.0f}s)",
            )
            await msg.ack()
            return None
        cancel = await self._cancelled_before_start(job)
        if cancel is not None:
            await self._finish(
                job.job_id,
                "cancelled",
                reason=f"cancelled by {cancel.requested_by} before it started",
            )
            await msg.ack()
            return None
        identity = None
        if request.run_as and request.run_as != self._user and self.config.run_as_mode == "root":
            identity = await self._authorize_run_as(envelope, job)
            if identity is None:
                await msg.ack()
                return None
        owner = (identity.uid, identity.gid) if identity else None
        try:
            return resolve_command(request.command, self.config, job.job_id, owner), identity
        except CommandRejected as exc:
            await self._finish(job.job_id, "rejected", reason=str(exc))
            await msg.ack()
            return None

    async def _authorize_run_as(self, envelope: Envelope, job: JobSubmitted) -> Identity | None:
        """The identity to run as, after an nkey grant or PAM; None (and rejected) if not.

        The caller learns only "authentication failed": never whether the user exists.
        """
        user = job.request.run_as
        assert user is not None
        identity = lookup(user)
        if identity is not None and grants_user(self._trust, envelope, user):
            logger.info("job %s runs as %s by an nkey grant", job.job_id, user)
            return identity
        password = b""
        if job.request.credential is not None:
            try:
                password = self.signer.open_sealed(job.request.credential)
            except SignatureError:
                password = b""
        # An empty password never reaches PAM (nullok would let it in).
        if identity is not None and password:
            try:
                if await asyncio.to_thread(pam_allows, self.config.pam_service, user, password):
                    logger.info("job %s runs as %s after PAM", job.job_id, user)
                    return identity
            except PamServiceMissing as exc:
                logger.error("! %s", exc)
                await self._finish(job.job_id, "rejected", reason=str(exc))
                return None
        logger.warning("! job %s: running as %s refused: authentication failed", job.job_id, user)
        await self._finish(job.job_id, "rejected", reason="authentication failed")
        return None

    async def _execute(
        self,
        msg: Msg,
        job: JobSubmitted,
        command: ResolvedCommand,
        running: _RunningJob,
        identity: Identity | None,
    ) -> None:
        request = job.request
        self._journal.record(job.job_id, "starting")
        if identity is None:
            env, as_user = base_environment(request.env, job.job_id), None
        else:
            env = identity.environment(request.env, job.job_id)
            as_user = (identity.uid, identity.gid, identity.groups)
        cwd = request.cwd or env["HOME"]
        begun = time.monotonic()
        try:
            proc = await spawn(command.argv, env=env, cwd=cwd, as_user=as_user)
        except OSError as exc:
            await self._finish(
                job.job_id,
                "failed",
                reason=f"cannot start {command.argv[0]}: {exc.strerror or exc}",
            )
            await msg.ack()
            return
        self._journal.record(job.job_id, "running", pid=proc.pid, start_ticks=start_ticks(proc.pid))
        await msg.ack()  # the journal owns the job from here on
        self.counters.started += 1
        logger.info("→ job %s pid %d: %s", job.job_id, proc.pid, command.display)
        await self._emit(
            JobStarted(
                job_id=job.job_id,
                agent=self.id,
                pid=proc.pid,
                run_as=request.run_as,
                effective_user=identity.name if identity else self._user,
            )
        )
        output = JobOutput(
            self.bus.js,
            self._subjects.output(self.id, job.job_id),
            job.job_id,
            stream=self._subjects.output_stream,
            max_bytes=self.config.max_output_bytes,
            tail_bytes=self.config.output_tail_bytes,
        )
        async with output:
            outcome = await supervise(
                proc,
                output,
                timeout_s=request.timeout_s,
                stop=running.stop,
                grace_s=self.config.job_kill_grace_s,
            )
        await self._finish_outcome(job, outcome, output, time.monotonic() - begun)

    async def _finish_outcome(
        self, job: JobSubmitted, outcome: Outcome, output: JobOutput, duration: float
    ) -> None:
        summary = output.summary()
        reason = outcome.reason
        if summary.lost_chunks:
            reason = f"{reason or outcome.status}; {summary.lost_chunks} output chunks lost"
        await self._finish(
            job.job_id,
            outcome.status,
            reason=reason if outcome.status != "succeeded" or summary.lost_chunks else None,
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            duration_s=round(duration, 6),
            stdout_bytes=summary.stdout_bytes,
            stderr_bytes=summary.stderr_bytes,
            output_tail=summary.tail,
            output_chunks=summary.chunks,
            truncated=summary.truncated,
        )
        logger.info("← job %s %s in %.3fs", job.job_id, outcome.status, duration)

    async def _finish(self, job_id: str, status: str, **fields: Any) -> None:
        """Publish the job's one ``finished`` event, then journal it."""
        data = JobFinished(job_id=job_id, agent=self.id, status=status, **fields)  # type: ignore[arg-type]
        for attempt in range(10):
            try:
                await self._emit(data)
                break
            except FleetError as exc:
                logger.error(
                    "! could not record job %s %s (attempt %d): %s",
                    job_id,
                    status,
                    attempt + 1,
                    exc,
                )
        else:
            # Left unfinished in the journal: reported as abandoned after a restart.
            return
        self._journal.record(job_id, "finished", status=status)
        self.counters.finished[status] = self.counters.finished.get(status, 0) + 1
        if status == "rejected":
            logger.warning("! job %s rejected: %s", job_id, fields.get("reason"))

    async def _recover(self) -> None:
        """Report jobs a crash left behind as abandoned, after killing what is left of them."""
        for entry in self._journal.unfinished():
            killed = kill_leftovers(entry.pid, entry.start_ticks) if entry.pid else 0
            killed += kill_job_leftovers(entry.job_id)  # what had left the group
            if await self._already_finished(entry.job_id):
                # The master recorded it abandoned while we were away: one record only.
                self._journal.record(entry.job_id, "finished", status="abandoned")
                continue
            reason = "the agent restarted while the job ran"
            if killed:
                reason += f"; {killed} leftover processes killed"
            logger.warning("job %s abandoned: %s", entry.job_id, reason)
            await self._finish(entry.job_id, "abandoned", reason=reason)
        remove_stale_cgroups()

    async def _already_finished(self, job_id: str) -> bool:
        subject = self._subjects.job_event(self.id, job_id, "finished")
        try:
            await self.bus.js.get_last_msg(self._subjects.events_stream, subject, direct=True)
        except nats.js.errors.NotFoundError:
            return False
        return True

    # --- events, presence, control ----------------------------------------------------------

    async def _emit(self, data: EventData) -> None:
        name = event_name(data.TYPE)
        if data.TYPE.startswith("job."):
            subject = self._subjects.job_event(self.id, data.job_id, name)  # type: ignore[attr-defined]
        elif data.TYPE.startswith("update."):
            subject = self._subjects.update_event(data.version, name, agent=self.id)  # type: ignore[attr-defined]
        else:
            subject = self._subjects.agent_event(self.id, name)
        envelope = make_envelope(data, source=self.id, subject=subject)
        await self.bus.publish_event(sign_envelope(envelope, self.signer))

    def presence(self) -> Presence:
        return Presence(
            agent=self.id,
            version=self.version,
            host=self.host,
            labels=self.config.labels,
            state="draining" if self._stopping.is_set() else self._update_state,
            running=sorted(self._jobs),
            max_jobs=self.config.max_jobs,
            public_key=self.signer.public_key,
            started_at=self._started_at,
            ts=time.time_ns(),
            update=self._update_text,
        )

    async def _heartbeat(self) -> None:
        kv = await self.bus.key_value(self._subjects.presence_bucket)
        while not self._idle.is_set():
            try:
                await kv.put(self.id, encode_model(self.presence()))
            except (FleetError, nats.errors.Error, OSError) as exc:
                logger.warning("heartbeat: %s", exc)
            # Next beat after heartbeat_s, or at once when the update state changed.
            self._presence_changed.clear()
            await wait_any(self._idle, self._presence_changed, timeout=self.config.heartbeat_s)

    def status(self) -> dict[str, Any]:
        """What ``status`` answers: presence plus counters."""
        return {
            **self.presence().model_dump(),
            "user": self._user,
            "run_as_mode": self.config.run_as_mode,
            "counters": {
                "started": self.counters.started,
                "finished": dict(self.counters.finished),
                "malformed": self.counters.malformed,
                "duplicates_skipped": self.counters.duplicates_skipped,
            },
        }

    async def _on_control(self, msg: Msg) -> None:
        op = msg.subject.rsplit(".", 1)[-1]
        try:
            request = decode_model(msg.data, ControlRequest) if msg.data else ControlRequest()
            reply = ControlReply(ok=True, data=await self._control(op, request.args))
        except (FleetError, ValueError) as exc:
            reply = ControlReply(ok=False, error=str(exc))
        except Exception:
            logger.exception("! control %s", op)
            reply = ControlReply(ok=False, error=f"{op} failed inside the agent; see its log")
        if msg.reply:
            try:
                await msg.respond(encode_model(reply))
            except (FleetError, nats.errors.Error) as exc:
                logger.warning("control %s: cannot reply: %s", op, exc)

    async def _control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "status":
            return self.status()
        if op == "config-get":
            return self.config.model_dump(mode="json")
        if op == "config-set":
            return await self._set_config(args)
        if op == "log":
            lines = args.get("lines", 200)
            if not isinstance(lines, int) or lines < 1:
                raise ValueError("lines must be a positive integer")
            return {"lines": recent_log_lines(lines)}
        if op == "restart":
            if self._on_restart is None:
                raise ValueError("this agent cannot restart itself (not run by fleet-agentd)")
            self._on_restart()
            return {"restarting": True}
        raise ValueError(
            f"unknown operation {op!r}; known: status, config-get, config-set, log, restart"
        )

    async def _set_config(self, args: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(args) - _SETTABLE)
        if unknown:
            settable = ", ".join(sorted(_SETTABLE))
            raise ValueError(f"cannot set {', '.join(unknown)} at run time; settable: {settable}")
        if not args:
            raise ValueError("nothing to set")
        new = AgentConfig.model_validate({**self.config.model_dump(), **args})
        self.reload(new)
        logging.getLogger().setLevel(new.log_level)
        await self._emit(AgentConfigChanged(agent=self.id, keys=sorted(args), changed_by="control"))
        return {"changed": sorted(args)}


def _valid_job_id(job_id: str) -> bool:
    try:
        id_time_ns(job_id)
    except ValueError:
        return False
    return True


async def _ack(msg: Msg) -> None:
    try:
        await msg.ack()
    except nats.errors.Error as exc:
        logger.debug("ack: %s", exc)
