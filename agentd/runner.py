"""Running one admitted job: the last checks before it starts, the process, its outcome.

Before it starts, the log is asked whether the job already has an outcome or a cancel
(:mod:`agentd.beforestart`); if it cannot be asked, the job is left queued and offered
again after a backoff.

A job is journaled ``starting`` (durably: the agent's one fsync per job) before it is
spawned and ``running`` (with its pid) before its message is acknowledged: from then on
the journal owns it, so a crash can neither lose it nor run it twice. Its ``started`` is
published beside the running process, retried through outages; a process is never left
unwatched because the bus is away.
"""

from __future__ import annotations

import asyncio
import logging
import time

from agentd.admit import Admit
from agentd.authorize import RunAsPolicy, authorize_run_as
from agentd.beforestart import NotNow, before_start
from agentd.command import CommandRejected, ResolvedCommand, resolve_command
from agentd.contain import kill_job_leftovers, remove_stale_cgroups
from agentd.context import AgentContext, RunningJob
from agentd.output import JobOutput
from agentd.process import base_environment, kill_leftovers, spawn, start_ticks
from agentd.record import Recorder
from agentd.runas import Identity, home_or_root
from agentd.supervise import Outcome, supervise
from agentd.trust import Refused
from bus.retry import Backoff
from schemas import JobStarted, JobSubmitted

logger = logging.getLogger(__name__)

_REQUEUE = Backoff(initial=1.0, cap=60.0)
"""Pauses before a job that could not be checked is offered again."""


class JobRunner:
    """Runs admitted jobs for one agent."""

    def __init__(self, ctx: AgentContext, recorder: Recorder) -> None:
        self._ctx = ctx
        self._recorder = recorder

    async def run(self, admitted: Admit, running: RunningJob) -> None:
        """Run one job to its end; whatever happens, it ends with one ``finished``."""
        job = admitted.job
        command: ResolvedCommand | None = None
        try:
            prepared = await self._prepare(running, admitted)
            if prepared is not None:
                command, identity = prepared
                await self._execute(job, command, running, identity)
        except NotNow as exc:
            delay = _REQUEUE.delay(running.delivery.delivered - 1)
            logger.warning(
                "↻ job %s left queued: %s; offered again in %.1fs", job.job_id, exc, delay
            )
            await running.delivery.nak(delay)
        except Exception:  # a bug must end this job, not the agent
            logger.exception("! job %s failed inside the agent", job.job_id)
            await self._recorder.finish(job.job_id, "failed", reason="internal error in the agent")
            await running.delivery.ack()
        finally:
            if command is not None:
                command.cleanup()
            self._ctx.jobs.pop(job.job_id, None)
            self._ctx.slot_free.set()

    async def _prepare(
        self, running: RunningJob, admitted: Admit
    ) -> tuple[ResolvedCommand, Identity | None] | None:
        """Everything that can end a job before it starts. None if it ended."""
        job = admitted.job
        with self._ctx.counters.timed("before_start", self._ctx.id):
            outcome, cancel = await before_start(self._ctx, job)
        if outcome is not None:
            logger.warning(
                "! job %s already ended %s in the log (%s); not running it",
                job.job_id,
                outcome.status,
                outcome.reason or "no reason given",
            )
            self._ctx.journal.record(job.job_id, "finished", status=outcome.status)
            await running.delivery.ack()
            return None
        if cancel is not None:
            reason = f"cancelled by {cancel.requested_by} before it started"
            await self._end_unstarted(running, job, "cancelled", reason)
            return None
        who = await self._authorize_run_as(admitted)
        if isinstance(who, Refused):
            # Not left queued when the record fails: a sealed password is used up by now,
            # so a second offer could only be refused as a replay.
            await self._recorder.finish(job.job_id, "rejected", reason=who.reason)
            await running.delivery.ack()
            return None
        identity = who
        owner = (identity.uid, identity.gid) if identity else None
        try:
            command = resolve_command(job.request.command, self._ctx.config, job.job_id, owner)
        except CommandRejected as exc:
            await self._end_unstarted(running, job, "rejected", str(exc))
            return None
        return command, identity

    async def _end_unstarted(
        self, running: RunningJob, job: JobSubmitted, status: str, reason: str
    ) -> None:
        """End a job that never started; if that cannot be recorded, leave it queued."""
        if not await self._recorder.finish(job.job_id, status, reason=reason):
            raise NotNow(f"its end ({status}) could not be recorded")
        await running.delivery.ack()

    async def _authorize_run_as(self, admitted: Admit) -> Identity | Refused | None:
        """Who the job runs as (None: the agent's own user), or why it must not run.

        Every admitted job comes here, whatever the mode: the grant settles the user
        and a job carrying a sealed password always goes through PAM.
        """
        config = self._ctx.config
        policy = RunAsPolicy(
            agent_id=self._ctx.id,
            agent_user=self._ctx.user,
            mode=config.run_as_mode,
            default_user=config.default_run_as or None,
            pam_service=config.pam_service,
        )
        result = await authorize_run_as(
            admitted.grant, admitted.job, policy, self._ctx.signer, self._ctx.seals
        )
        return result if isinstance(result, Refused) else result.identity

    async def _execute(
        self,
        job: JobSubmitted,
        command: ResolvedCommand,
        running: RunningJob,
        identity: Identity | None,
    ) -> None:
        ctx = self._ctx
        request = job.request
        ctx.journal.record(job.job_id, "starting")
        # The one fsync awaited per job: lost with the machine after the spawn, this entry
        # would let the unacknowledged job run a second time.
        with ctx.counters.timed("journal", ctx.id):
            await ctx.journal.durable()
        if identity is None:
            env, as_user = base_environment(request.env, job.job_id), None
        else:
            env = identity.environment(request.env, job.job_id)
            as_user = (identity.uid, identity.gid, identity.groups)
        # Accounts like nobody have a home that does not exist: start those in /.
        cwd = request.cwd or home_or_root(env["HOME"])
        begun = time.monotonic()
        try:
            with ctx.counters.timed("spawn", ctx.id):
                proc = await spawn(command.argv, env=env, cwd=cwd, as_user=as_user)
        except OSError as exc:
            # CPython names the directory when the child's chdir failed: say so, and do
            # not blame the command.
            bad_cwd = exc.filename is not None and exc.filename == cwd
            what = f"working directory {cwd}" if bad_cwd else command.argv[0]
            await self._recorder.finish(
                job.job_id,
                "failed",
                reason=f"cannot start {what}: {exc.strerror or exc}",
            )
            await running.delivery.ack()
            return
        # Not awaited durable: "starting" already makes the journal own the job, and a
        # power loss that took this pid took the process with it (leftovers are still
        # found by their job tag, see agentd.contain).
        ctx.journal.record(job.job_id, "running", pid=proc.pid, start_ticks=start_ticks(proc.pid))
        await running.delivery.ack()  # the journal owns the job from here on
        ctx.counters.started += 1
        logger.info("→ job %s pid %d: %s", job.job_id, proc.pid, command.display)
        started = JobStarted(
            job_id=job.job_id,
            agent=ctx.id,
            pid=proc.pid,
            run_as=request.run_as,
            effective_user=identity.name if identity else ctx.user,
        )
        output = JobOutput(
            ctx.bus,
            ctx.bus.subjects.output(ctx.id, job.job_id),
            job.job_id,
            stream=ctx.bus.subjects.output_stream,
            max_bytes=ctx.config.max_output_bytes,
            tail_bytes=ctx.config.output_tail_bytes,
            signer=ctx.signer,
        )
        async with asyncio.TaskGroup() as tg:
            # Recorded beside the running process: an outage delays the record, it
            # never leaves the process unwatched.
            announce = tg.create_task(self._announce(started))
            async with output:
                with ctx.counters.timed("run", ctx.id):
                    outcome = await supervise(
                        proc,
                        output,
                        timeout_s=request.timeout_s,
                        stop=running.stop,
                        grace_s=ctx.config.job_kill_grace_s,
                    )
        if not announce.result():
            logger.error("! job %s: its start could not be recorded", job.job_id)
        await self._finish_outcome(job, outcome, output, time.monotonic() - begun)

    async def _announce(self, started: JobStarted) -> bool:
        with self._ctx.counters.timed("started", self._ctx.id):
            return await self._recorder.publish_job_event(started, "started")

    async def _finish_outcome(
        self, job: JobSubmitted, outcome: Outcome, output: JobOutput, duration: float
    ) -> None:
        summary = output.summary()
        reason = outcome.reason
        if summary.lost_chunks:
            reason = f"{reason or outcome.status}; {summary.lost_chunks} output chunks lost"
        # The local truth first: if the log cannot take the outcome before the agent
        # stops, the next start records this, not "abandoned". Not awaited durable: it
        # survives the agent's death, and the stop fsyncs it; only a power loss before
        # the next group commit turns it into "abandoned", an honest report then.
        self._ctx.journal.record(
            job.job_id, "ended", status=outcome.status, exit_code=outcome.exit_code, reason=reason
        )
        with self._ctx.counters.timed("finished", self._ctx.id):
            await self._recorder.finish(
                job.job_id,
                outcome.status,
                ran=True,
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

    async def recover(self) -> None:
        """Record what a crash or a stop left unrecorded: an outcome the journal knows,
        else ``abandoned`` after killing what is left of the job.

        An outcome already in the log (the master's ``abandoned`` while we were away)
        stays the one; ours becomes a late result if the job had ended here.
        """
        for entry in self._ctx.journal.unfinished():
            if entry.state == "ended" and entry.status is not None:
                logger.warning(
                    "job %s %s: recorded now, after a restart", entry.job_id, entry.status
                )
                await self._recorder.finish(
                    entry.job_id,
                    entry.status,
                    ran=True,
                    exit_code=entry.exit_code,
                    reason=entry.reason,
                )
                continue
            killed = kill_leftovers(entry.pid, entry.start_ticks) if entry.pid else 0
            killed += kill_job_leftovers(entry.job_id)  # what had left the group
            reason = "the agent restarted while the job ran"
            if killed:
                reason += f"; {killed} leftover processes killed"
            logger.warning("job %s abandoned: %s", entry.job_id, reason)
            await self._recorder.finish(entry.job_id, "abandoned", reason=reason)
        remove_stale_cgroups(self._ctx.journal.jobs)
